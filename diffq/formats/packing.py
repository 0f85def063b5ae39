"""Exact packing of 4-bit codes, two per byte.

Layout (fixed; kernels depend on it): along the last dimension, element ``2j`` goes to the low
nibble and element ``2j+1`` to the high nibble of byte ``j``:
``packed[..., j] = (codes[..., 2j] & 0xF) | ((codes[..., 2j+1] & 0xF) << 4)``.
Signed codes are two's-complement nibbles (-8..7); unsigned codes are 0..15.
"""

from __future__ import annotations

import torch

from diffq.errors import FormatError


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes: int8 in [-8, 7] or uint8 in [0, 15], shape [..., K] with K even -> uint8 [..., K // 2]."""
    if codes.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise FormatError(f"pack_int4 needs integer codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise FormatError(
            f"pack_int4 needs an even last dimension, got {tuple(codes.shape)}; pad the tensor or use 8-bit"
        )
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -8 or hi > 15 or (lo < 0 and hi > 7):
            raise FormatError(f"4-bit codes must lie in [-8, 7] or [0, 15], got range [{lo}, {hi}]")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """uint8 [..., K // 2] -> int8 [..., K] (signed: -8..7) or uint8 [..., K] (0..15)."""
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_int4 needs uint8 input, got {packed.dtype}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    if signed:
        return torch.where(out >= 8, out - 16, out).to(torch.int8)
    return out.to(torch.uint8)
