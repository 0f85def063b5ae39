"""A LoRA update on a quantized layer's 16-bit branch: the one place both LoRA paths write it.

A LoRA adds ``scale · B·A`` to a layer's weight (A ``[r, K]``, B ``[N, r]``; conv A ``[r, Cin, kh, kw]``,
B ``[N, r, 1, 1]``). QuantLinear / QuantConv2d already run ``(x_s · L1) · L2`` in 16 bits, with
``x_s = x / s`` (``s`` the smoothing factors), so the LoRA factors are appended to it:
``L1' = [L1 | diag(s)·Aᵀ]`` and ``L2' = [L2 ; scale·Bᵀ]``. The 4/8-bit codes never change, and putting
back the previous ``(L1, L2)`` tensors restores the layer bit for bit.
"""

from __future__ import annotations

import torch

from diffq.errors import DiffqError
from diffq.modules import QuantConv2d, QuantLinear, conv_weight_rows

QuantLayer = QuantLinear | QuantConv2d


def lora_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A rows ``[r, K']``, B ``[N, r]``) in fp32, conv factors flattened in the stored channel-fastest
    order (``K' = kh·kw·Cin``)."""
    if a.dim() == 4:
        a = conv_weight_rows(a)
    if b.dim() == 4:
        b = b.reshape(b.shape[0], b.shape[1])
    return a.float(), b.float()


def branch_factors(mod: QuantLayer, a_rows: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns ``diag(s)·Aᵀ`` ``[K', r]`` and rows ``scale·Bᵀ`` ``[r, N]`` a LoRA adds to ``mod``'s branch."""
    k = mod.in_features * mod.kernel_numel
    if a_rows.shape[1] != k or b.shape[0] != mod.out_features or b.shape[1] != a_rows.shape[0]:
        raise DiffqError(
            f"LoRA factors A {tuple(a_rows.shape)} / B {tuple(b.shape)} do not fit a layer of "
            f"{mod.in_features} inputs (x{mod.kernel_numel} kernel taps) and {mod.out_features} outputs"
        )
    down = a_rows.t().to(mod.qweight.device)
    if mod.smooth is not None:  # the branch sees x / s, the LoRA must see x
        cin = mod.smooth.numel()
        down = (down.reshape(-1, cin, down.shape[1]) * mod.smooth.float().view(1, cin, 1)).reshape(down.shape)
    return down, scale * b.t().to(down.device)


def append_to_branch(mod: QuantLayer, down: torch.Tensor, up: torch.Tensor) -> tuple:
    """Append LoRA factors to ``mod``'s branch; returns the previous ``(lr_down, lr_up)`` for
    :func:`restore_branch` (the old tensors themselves: nothing is modified in place)."""
    before = (mod.lr_down, mod.lr_up)
    if mod.lr_down is not None:
        down = torch.cat([mod.lr_down.float(), down.float()], dim=1)
        up = torch.cat([mod.lr_up.float(), up.float()], dim=0)
    mod.set_lowrank(down, up)
    return before


def restore_branch(mod: QuantLayer, before: tuple) -> None:
    mod.lr_down, mod.lr_up = before
