"""Exact packing of sub-byte integer codes.

4-bit layout (fixed; kernels depend on it): along the last dimension, element ``2j`` goes to the
low nibble and element ``2j+1`` to the high nibble of byte ``j``:
``packed[..., j] = (codes[..., 2j] & 0xF) | ((codes[..., 2j+1] & 0xF) << 4)``.
Signed codes are two's-complement nibbles (-8..7); unsigned codes are 0..15.

Other widths (2, 3, 5, 6, 7 bits; no kernel reads them, the reference path unpacks them) use the
same rule generalised: the codes of a row form one little-endian bit stream, element ``i`` in bits
``[b*i, b*i + b)``. For b = 4 that is exactly the nibble layout above. A row of K codes takes
``K * b / 8`` bytes, so K must be a multiple of :func:`pack_multiple` (b=3: 8 codes in 3 bytes).
"""

from __future__ import annotations

import math

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
    if codes.numel() and not codes.is_meta:  # meta: shapes only (a model skeleton being built)
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


def pack_multiple(bits: int) -> int:
    """Smallest number of ``bits``-wide codes that fills whole bytes (4 bits: 2; 3 bits: 8)."""
    return 8 // math.gcd(bits, 8)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 7:
        raise FormatError(
            f"sub-byte packing takes 2..7 bits, got {bits!r}; 8-bit codes are stored as they are"
        )


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integers that fit ``bits`` (signed two's complement or unsigned), shape [..., K] with
    K a multiple of ``pack_multiple(bits)`` -> uint8 [..., K * bits // 8]."""
    _check_bits(bits)
    if bits == 4:
        return pack_int4(codes)
    if codes.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        raise FormatError(f"pack_bits needs integer codes, got {codes.dtype}")
    k, m = codes.shape[-1], pack_multiple(bits)
    if k % m:
        raise FormatError(
            f"{bits}-bit packing needs a last dimension divisible by {m}, got {tuple(codes.shape)}; "
            "pad the tensor or use 4 or 8 bits"
        )
    if codes.numel() and not codes.is_meta:  # meta: shapes only (a model skeleton being built)
        lo, hi = int(codes.min()), int(codes.max())
        half = 1 << (bits - 1)
        if lo < -half or hi > 2 * half - 1 or (lo < 0 and hi > half - 1):
            raise FormatError(
                f"{bits}-bit codes must lie in [{-half}, {half - 1}] or [0, {2 * half - 1}], got [{lo}, {hi}]"
            )
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    # Each run of m codes is m * bits bits = m * bits / 8 whole bytes: build it as one integer.
    c = c.reshape(*codes.shape[:-1], k // m, m)
    shifts = torch.arange(m, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # [..., k // m], at most 56 bits
    nbytes = m * bits // 8
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], k // m * nbytes).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, *, signed: bool = True) -> torch.Tensor:
    """uint8 [..., K * bits // 8] -> int8 [..., K] (signed) or uint8 [..., K] (unsigned)."""
    _check_bits(bits)
    if bits == 4:
        return unpack_int4(packed, signed=signed)
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_bits needs uint8 input, got {packed.dtype}")
    m = pack_multiple(bits)
    nbytes = m * bits // 8
    if packed.shape[-1] % nbytes:
        raise FormatError(
            f"{bits}-bit packed rows are multiples of {nbytes} bytes, got {tuple(packed.shape)}"
        )
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], packed.shape[-1] // nbytes, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1)
    shifts = torch.arange(m, dtype=torch.int64, device=packed.device) * bits
    out = ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    if signed:
        return torch.where(out >= 1 << (bits - 1), out - (1 << bits), out).to(torch.int8)
    return out.to(torch.uint8)
