"""LoRA on a quantized pipeline without re-quantizing: the update rides on the 16-bit branch.

A LoRA adds ``scale · B·A`` to a layer's weight (A [r, K], B [N, r]). For a QuantLinear the
branch ``(x_s · L1) · L2`` already runs in 16 bits, so the LoRA factors are appended to it:
``L1' = [L1 | diag(s)·Aᵀ]`` and ``L2' = [L2 ; scale·Bᵀ]`` (``s`` the smoothing factors, because the
branch sees ``x / s``). The quantized codes never change, and removing the LoRA restores the
original branch exactly.

Accepted state-dict key styles (diffusers/PEFT): ``<prefix><module>.lora_A.weight`` /
``lora_B.weight`` and ``<module>.lora.down.weight`` / ``lora.up.weight``, optional ``.alpha``; the
prefix ``unet.`` / ``transformer.`` is stripped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffq.errors import CheckpointError, DiffqError
from diffq.modules import QuantConv2d, QuantLinear, conv_weight_rows
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.state import require_state

_PAIR = re.compile(r"^(?:(?:unet|transformer)\.)?(?P<mod>.+?)\.(?:lora_A|lora\.down)\.weight$")


def parse_lora(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """module name -> (A, B, alpha or None)."""
    out = {}
    for key, a in state.items():
        m = _PAIR.match(key)
        if not m:
            continue
        mod = m.group("mod")
        b_key = key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")
        if b_key not in state:
            raise CheckpointError(f"LoRA key {key} has no matching up/B weight {b_key}")
        alpha_key = key.rsplit(".", 2)[0] + ".alpha" if "lora.down" in key else f"{mod}.alpha"
        alpha = state.get(alpha_key)
        out[mod] = (a, state[b_key], None if alpha is None else float(alpha))
    if not out:
        raise CheckpointError("no LoRA weights found (expected keys ending in lora_A.weight / lora.down.weight)")
    return out


def _lora_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A rows [r, K'], B [N, r]) with conv factors flattened in the channel-fastest order."""
    if a.dim() == 4:
        a = conv_weight_rows(a)
        b = b.reshape(b.shape[0], b.shape[1])
    return a.float(), b.float()


@torch.no_grad()
def load_lora(pipe, lora: str | Path | dict[str, torch.Tensor], *, scale: float = 1.0) -> list[str]:
    """Apply a LoRA to a quantized (or partly quantized) denoiser; returns the layers it touched.

    Quantized layers get the update on their 16-bit branch; dense layers get it merged into their
    weight. Call :func:`unload_lora` to remove it.
    """
    weights = load_file(str(lora)) if not isinstance(lora, dict) else lora
    denoiser = adapter_for(pipe).denoiser(pipe)
    saved = require_state(denoiser, "diffq.lora.load_lora").lora_saved
    pairs = parse_lora(weights)
    touched = []
    for name, (a, b, alpha) in pairs.items():
        try:
            mod = denoiser.get_submodule(name)
        except AttributeError as e:
            raise DiffqError(f"LoRA targets {name!r}, which this denoiser does not have") from e
        a_rows, b = _lora_rows(a, b)
        s = scale * (alpha / a_rows.shape[0] if alpha is not None else 1.0)
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            if a_rows.shape[1] != mod.in_features * mod.kernel_numel:
                raise DiffqError(f"LoRA for {name} has input width {a_rows.shape[1]}, layer has {mod.in_features}")
            saved.setdefault(name, (mod.lr_down, mod.lr_up))
            down = a_rows.t()  # [K', r]
            if mod.smooth is not None:
                cin = mod.smooth.numel()
                down = (down.reshape(-1, cin, down.shape[1]) * mod.smooth.view(1, cin, 1)).reshape(down.shape)
            up = s * b.t()  # [r, N]
            if mod.lr_down is not None:
                down = torch.cat([mod.lr_down.float(), down], dim=1)
                up = torch.cat([mod.lr_up.float(), up], dim=0)
            mod.set_lowrank(down, up)
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            delta = (b @ a_rows) * s
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                delta = delta.reshape(mod.out_channels, kh, kw, mod.in_channels).permute(0, 3, 1, 2)
            saved.setdefault(name, mod.weight.detach().clone())
            mod.weight.add_(delta.to(mod.weight.dtype))
        else:
            raise DiffqError(f"LoRA target {name!r} is a {type(mod).__name__}, not a Linear/Conv2d")
        touched.append(name)
    return touched


@torch.no_grad()
def unload_lora(pipe) -> None:
    """Remove every LoRA applied with :func:`load_lora`, restoring the exact previous state."""
    denoiser = adapter_for(pipe).denoiser(pipe)
    saved = require_state(denoiser, "diffq.lora.unload_lora").lora_saved
    for name, old in saved.items():
        mod = denoiser.get_submodule(name)
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            mod.lr_down, mod.lr_up = old
        else:
            mod.weight.copy_(old)
    saved.clear()
