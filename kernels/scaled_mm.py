"""FP8 (E4M3) GEMM through ``torch._scaled_mm`` (cuBLASLt), the alternative backend to Triton.

The Triton FP8 GEMM is the W8A8 kernel (:mod:`diffq.kernels.row_scaled`) with E4M3 operands and an
fp32 accumulator; both need FP8 tensor cores (sm_89 Ada, sm_90 Hopper and newer), elsewhere the
dispatcher uses the torch reference.
"""

from __future__ import annotations

import torch


def fp8_scaled_mm(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Same GEMM through ``torch._scaled_mm`` (cuBLASLt / CUTLASS, row-wise scales).

    Row-wise scaling needs a recent GPU (sm_89/sm_90 depending on the torch build), K and N
    multiples of 16 and a 16-bit output; raises RuntimeError otherwise (the caller falls back).
    """
    out = torch._scaled_mm(
        xq,
        qweight.t(),
        scale_a=xscale.float().contiguous(),
        scale_b=wscale.float().reshape(1, -1).contiguous(),
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
    )
    return out
