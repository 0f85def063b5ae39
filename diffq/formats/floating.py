"""Floating-point element formats (FP8 E4M3/E5M2, FP4 E2M1) and FP block-scale encodings.

FP8 rounding is torch's own cast (round-to-nearest-even) after saturation, because torch's FP8
casts produce NaN, not the max, on overflow. FP4 E2M1 has no torch dtype, so it is rounded here
to the nearest of its 8 magnitudes, ties to the even mantissa, and stored as a 4-bit
sign-magnitude code (bit 3 = sign, bits 0-2 = magnitude index).
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp4_e2m1": 6.0}

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2

E4M3_MIN_SUBNORMAL = 2.0**-9
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def round_fp8(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Saturate to the format's max and cast; returns the FP8 tensor (codes)."""
    m = FP_MAX[dtype]
    return x.clamp(-m, m).to(FP8_DTYPES[dtype])


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by the scale) -> the nearest E2M1 value, ties to the even
    mantissa, saturating at +-6.

    Arithmetic instead of a table search: the grid has step 0.5 below 2, 1 in [2, 4) and 2 from 4
    on, and round-half-to-even of ``|x| / step`` is the even-mantissa tie rule in each range
    (tests/test_formats.py checks it against a nearest-point search on every boundary and tie)."""
    mag = x.abs().clamp(max=6.0)
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(mag / step) * step, x)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by the scale) -> uint8 sign-magnitude codes 0..15, saturating at 6."""
    r = e2m1_round(x)
    mag = r.abs()
    # magnitude index: 0, .5, 1, 1.5 -> 0..3; 2, 3 -> 4, 5; 4, 6 -> 6, 7
    idx = torch.where(mag < 2.0, mag * 2.0, torch.where(mag < 4.0, mag + 2.0, mag * 0.5 + 4.0)).to(torch.uint8)
    sign = ((x < 0) & (idx > 0)).to(torch.uint8)
    return idx | (sign << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 sign-magnitude codes -> fp32 values."""
    c = codes.to(torch.int64)
    mag = E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def e4m3_scale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 block scales -> (stored FP8 E4M3 scales, their exact fp32 values). Never zero."""
    stored = s.clamp(E4M3_MIN_SUBNORMAL, 448.0).to(torch.float8_e4m3fn)
    value = stored.float()
    # a scale that rounds down to zero would divide by zero; the smallest subnormal is the floor
    value = torch.where(value > 0, value, torch.full_like(value, E4M3_MIN_SUBNORMAL))
    return value.to(torch.float8_e4m3fn), value


def e8m0_scale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scales -> (uint8 biased exponents, their fp32 power-of-two values).

    The exponent is rounded *up* (ceil(log2 s)) so that no element of the block saturates. It is
    read exactly from the float's bits (``frexp``): ``torch.log2`` rounds ``log2`` of a value a few
    ulps above a power of two down to that integer, which would pick a scale below ``s``.
    """
    mant, e = torch.frexp(s.float().clamp_min(2.0**E8M0_MIN_EXP))  # s = mant * 2^e, mant in [0.5, 1)
    e = torch.where(mant == 0.5, e - 1, e).float().clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return (e + 127).to(torch.uint8), torch.exp2(e)


def e8m0_decode(stored: torch.Tensor) -> torch.Tensor:
    return torch.exp2(stored.float() - 127)
