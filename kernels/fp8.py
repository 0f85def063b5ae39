"""FP8 (E4M3) GEMM (Triton): per-token E4M3 activations x per-channel E4M3 weights.

Needs FP8 tensor cores (sm_89 Ada, sm_90 Hopper and newer); elsewhere the dispatcher uses the
torch reference. fp8 x fp8 -> fp32 accumulate, epilogue ``acc * x_scale[m] * w_scale[n]``
(+ bias). ``torch._scaled_mm`` (cuBLASLt) is offered as an alternative backend by the dispatcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.tl_helpers import tile_ids, to_output
from diffq.kernels.w8a8 import launch_row_scaled_gemm


@triton.jit
def _fp8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq fp8e4nv [M, K], xs fp32 [M], w fp8e4nv [N, K], ws [N] -> y [M, N]."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sx = tl.load(xs_ptr + rm)
    sw = tl.load(ws_ptr + rn).to(tl.float32)
    out = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    tl.store(y_ptr + om.to(tl.int64)[:, None] * stride_ym + on[None, :], to_output(out, y_ptr.dtype.element_ty), mask=mask)


def fp8_gemm_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq E4M3 [M, K], xscale fp32 [M, 1], qweight E4M3 [N, K], wscale [N, 1] -> [M, N] out_dtype."""
    return launch_row_scaled_gemm(_fp8_kernel, "fp8", xq, xscale, qweight, wscale, bias, out_dtype)


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
