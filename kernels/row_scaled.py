"""W8A8 and FP8 GEMM (Triton): 8-bit per-token activations x 8-bit per-output-channel weights.

int8 x int8 -> int32 on the tensor cores (Ampere and newer), or E4M3 x E4M3 -> fp32 (sm_89+),
then one fp32 epilogue:
y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]). The activation codes come from
:func:`diffq.kernels.activation_kernels.quantize_rows` (a per-token scale needs the whole row first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.autotune import launch, m_bucket
from diffq.kernels.tl_helpers import contiguous_range, store_tile, tile_ids, wrapped_rows_cols


@triton.jit
def _row_scaled_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq [M, K], xs fp32 [M], w [N, K], ws [N] -> y [M, N] (y's dtype).

    INT_ACC: int8 operands, int32 accumulation (W8A8); otherwise float8e4nv operands with fp32
    accumulation (FP8, exact: products of E4M3 values fit fp32)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rk = contiguous_range(BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if INT_ACC else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        if INT_ACC:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sx = tl.load(xs_ptr + rm)
    sw = tl.load(ws_ptr + rn).to(tl.float32)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    store_tile(y_ptr, out, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def launch_row_scaled_gemm(
    kind: str, xq: torch.Tensor, xscale: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The per-token x per-channel scaled GEMM, ``kind`` "w8a8" (int8) or "fp8" (E4M3), on
    xq [M, K], xscale fp32 [M, 1], qweight [N, K], wscale [N] -> [M, N] out_dtype."""
    m, k = xq.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y

    launch(
        _row_scaled_kernel, kind,
        x_ptr=xq, xs_ptr=xscale, w_ptr=qweight, ws_ptr=wscale, b_ptr=bias if bias is not None else wscale,
        y_ptr=y, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=xq.stride(0), stride_wn=qweight.stride(0), stride_ym=y.stride(0),
        INT_ACC=kind == "w8a8", HAS_BIAS=bias is not None, EVEN_K=k % 256 == 0,
    )  # fmt: skip
    return y
