"""Kernel-side copies of int4 weights, built once per layer and device from the core's buffers.

The core stores int4 weights packed two's-complement, element 2j in the low nibble of byte j
(``diffq.formats.packing``), and group scales [N, K // G] in fp16/fp32. The GEMMs want:

* **split-half** bytes (:func:`split_half`): for every 128-element block of a row, byte j
  (j < 64) holds element j in its low nibble and element 64 + j in its high nibble, so one
  ``[rows, 64]`` byte tile gives two ``[rows, 64]`` MMA operand tiles by masking (no interleave,
  no layout change); K is padded with zero codes to a multiple of 128.
* **sign-magnitude split-half** bytes (:func:`split_half_signmag`, the W4A4 FP8 route only): the
  same element pairs as ``[s_lo m_hi(3) s_hi m_lo(3)]`` so that a code in [-7, 7] becomes an
  exact E4M3 subnormal ``code * 2^-9`` with one mask.
* **group-major fp32 scales** (:func:`group_major_scales`) ``[groups_padded, N]``: one contiguous
  ``[BLOCK_N]`` vector per group, zero for the padding group.

These are derived data: the module keeps its buffers (checkpoints, the reference path and the
core never see the copies). The copy costs as much memory as the packed weights again (0.5 byte
per weight) and is built on first use, on the layer's device, without a host sync; it is cached
on the module (``module.__dict__["_diffq_kernels"]``), so a module that changes its weights in
place must drop that entry (``diffq.kernels.layer_dispatch.forget(module)``).
"""

from __future__ import annotations

import torch

from diffq.formats import unpack_int4

#: K granularity of the split-half layout
BLOCK = 128


def padded_k(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def _codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Core-packed uint8 [N, K//2] -> int8 codes [N, Kp] (zero-padded to a multiple of 128)."""
    codes = unpack_int4(qweight)
    kp = padded_k(k)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k))
    return codes


def split_half(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Core-packed int4 [N, K//2] -> split-half uint8 [N, Kp//2] (two's-complement nibbles)."""
    c = _codes(qweight, k).view(qweight.shape[0], -1, 2, 64).to(torch.uint8)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(qweight.shape[0], -1).contiguous()


def split_half_signmag(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Core-packed int4 with codes in [-7, 7] -> sign-magnitude split-half uint8 [N, Kp//2]
    (byte = sign_lo << 7 | mag_hi << 4 | sign_hi << 3 | mag_lo). The caller checks the range
    (:func:`fits_signmag`); a code -8 would alias."""
    c = _codes(qweight, k).view(qweight.shape[0], -1, 2, 64)
    sign = (c < 0).to(torch.uint8)
    mag = c.abs().to(torch.uint8) & 7
    lo, hi = (sign[:, :, 0], mag[:, :, 0]), (sign[:, :, 1], mag[:, :, 1])
    byte = (lo[0] << 7) | (hi[1] << 4) | (hi[0] << 3) | lo[1]
    return byte.reshape(qweight.shape[0], -1).contiguous()


def fits_signmag(qweight: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: no nibble is 0x8 (code -8). Stays on the device (no sync)."""
    return ~(((qweight & 0xF) == 8) | ((qweight >> 4) == 8)).any()


def group_major_scales(wscale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, K//G] fp16/fp32 -> fp32 [Kp//G (at least), N] with zero rows for padding groups."""
    groups = wscale.shape[1]
    padded = max(groups, padded_k(k) // group_size)
    out = wscale.float().t()
    if padded != groups:
        out = torch.nn.functional.pad(out, (0, 0, 0, padded - groups))
    return out.contiguous()
