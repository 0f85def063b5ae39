"""Fingerprint of a base model's weights, so a quantized checkpoint is never loaded onto another.

Hashes every parameter's name, shape, dtype and up to 4096 evenly spaced values: cheap on an
SDXL-size model (no full pass over the weights) and different for any other checkpoint.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from diffq.errors import CheckpointError

SAMPLES = 4096

#: why a denoiser's weights can be on meta, and what to do instead (shared by every caller's error)
META_FIX = (
    "its weights are on the meta device (a model built on meta, or offloaded by enable_sequential_cpu_offload / "
    "a device_map): quantize or diffq.load a pipeline whose weights are loaded and enable offloading afterwards; "
    "to load a standalone diffq checkpoint without the full-precision weights use diffq.load_pipeline(dir, base=...)"
)


@torch.no_grad()
def tensors_fingerprint(class_name: str, items) -> str:
    """The fingerprint of ``(name, tensor)`` pairs (in name order) of a model class: what
    :func:`weights_fingerprint` hashes, for tensors that are read one at a time (a safetensors file)."""
    h = hashlib.sha256(class_name.encode())
    for name, p in items:
        flat = p.detach().reshape(-1)
        if flat.numel() > SAMPLES:
            idx = torch.arange(SAMPLES, device=flat.device) * (flat.numel() - 1) // (SAMPLES - 1)
            flat = flat[idx]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of ``model``'s weights (see the module docstring); CheckpointError when any are on meta."""
    items = sorted(model.state_dict().items())
    for name, p in items:
        if p.device.type == "meta":
            raise CheckpointError(f"cannot fingerprint {type(model).__name__} ({name}): {META_FIX}")
    return tensors_fingerprint(type(model).__name__, items)
