"""Fingerprint of a base model's weights, so a quantized checkpoint is never loaded onto another.

Hashes every parameter's name, shape, dtype and up to 4096 evenly spaced values: cheap on an
SDXL-size model (no full pass over the weights) and different for any other checkpoint.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLES = 4096


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in sorted(model.state_dict().items()):
        if p.device.type == "meta":
            raise ValueError(f"cannot fingerprint meta tensor {name}")
        flat = p.detach().reshape(-1)
        if flat.numel() > SAMPLES:
            idx = torch.arange(SAMPLES, device=flat.device) * (flat.numel() - 1) // (SAMPLES - 1)
            flat = flat[idx]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()
