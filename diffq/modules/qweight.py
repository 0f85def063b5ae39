"""Storage of a quantized weight matrix ``[N, K]``: codes (sub-byte widths bit-packed), stored
scales, optional zero points and NVFP4 global scale, and the way back to a dense matrix."""

from __future__ import annotations

import torch
from torch import nn

from diffq.formats import QTensor, QuantSpec, decode_scale, dequantize_parts, pack_bits, unpack_bits


def register_qweight(module: nn.Module, q: QTensor) -> None:
    """Store ``q`` on ``module`` as buffers qweight / wscale / [wzero] / [wscale_global]."""
    spec = q.spec
    codes = q.codes
    if spec.packed:
        codes = pack_bits(codes, spec.bits)
    module.register_buffer("qweight", codes.contiguous().clone())
    module.register_buffer("wscale", q.scale_stored.contiguous().clone())
    module.register_buffer("wzero", None if q.zero is None else q.zero.to(torch.uint8).contiguous().clone())
    module.register_buffer(
        "wscale_global", None if q.global_scale is None else q.global_scale.float().contiguous().clone()
    )
    module.wspec = spec


def weight_codes(module: nn.Module) -> torch.Tensor:
    """Unpacked codes [N, K]: int8 (signed int), uint8 (unsigned int / FP4), or FP8."""
    spec: QuantSpec = module.wspec
    if spec.packed:
        return unpack_bits(module.qweight, spec.bits, signed=spec.is_int and spec.symmetric)
    return module.qweight


def weight_scale(module: nn.Module) -> torch.Tensor:
    """fp32 effective scales [N | 1, groups | 1]."""
    return decode_scale(module.wscale, module.wspec, module.wscale_global)


def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight [N, K] in ``dtype`` (the reference path; kernels never materialise this)."""
    zero = None if module.wzero is None else module.wzero.float()
    return dequantize_parts(weight_codes(module), weight_scale(module), module.wspec, zero, dtype=dtype)
