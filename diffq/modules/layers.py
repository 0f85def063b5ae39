"""Which modules of a denoiser can be quantized, and a fingerprint of that structure."""

from __future__ import annotations

import hashlib

from torch import nn

from diffq.modules.quant_linear import QuantConv2d, QuantLinear


def is_quantizable(m: nn.Module) -> bool:
    """nn.Linear and ungrouped nn.Conv2d (plain classes or LoRA-free subclasses)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def quantizable_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, in definition order, for every Linear/Conv2d (or already quantized)."""
    return {
        n: m
        for n, m in denoiser.named_modules()
        if n and (is_quantizable(m) or isinstance(m, (QuantLinear, QuantConv2d)))
    }


def in_out(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def structure_fingerprint(denoiser: nn.Module) -> str:
    """sha256 over class name and (name, in, out) of every quantizable layer."""
    h = hashlib.sha256(type(denoiser).__name__.encode())
    for n, m in quantizable_layers(denoiser).items():
        i, o = in_out(m)
        h.update(f"{n}:{i}:{o};".encode())
    return h.hexdigest()


def quantized_modules(root: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """Qualified name -> every QuantLinear / QuantConv2d under ``root``."""
    return {n: m for n, m in root.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
