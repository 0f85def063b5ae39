"""W8A8 GEMM (Triton): int8 per-token activations x int8 per-output-channel weights.

int8 x int8 -> int32 on the tensor cores (Ampere and newer), then one fp32 epilogue:
y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]). The activation codes come from
:func:`diffq.kernels.act_quant.quantize_rows` (a per-token scale needs the whole row first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.autotune import launch, m_bucket
from diffq.kernels.tl_helpers import tile_ids, to_output


@triton.jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq int8 [M, K], xs fp32 [M], w int8 [N, K], ws [N] -> y [M, N] (y's dtype)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sx = tl.load(xs_ptr + rm)
    sw = tl.load(ws_ptr + rn).to(tl.float32)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    tl.store(y_ptr + om.to(tl.int64)[:, None] * stride_ym + on[None, :], to_output(out, y_ptr.dtype.element_ty), mask=mask)


def launch_row_scaled_gemm(
    kernel, name: str, xq: torch.Tensor, xscale: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch a per-token x per-channel scaled GEMM kernel (``_w8a8_kernel`` or the FP8 one: they
    share this signature) on xq [M, K], xscale fp32 [M, 1], qweight [N, K], wscale [N] -> [M, N]."""
    m, k = xq.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(
        kernel, name, grid,
        x_ptr=xq, xs_ptr=xscale, w_ptr=qweight, ws_ptr=wscale, b_ptr=bias if bias is not None else wscale,
        y_ptr=y, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=xq.stride(0), stride_wn=qweight.stride(0), stride_ym=y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % 256 == 0,
    )  # fmt: skip
    return y


def w8a8_gemm_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq int8 [M, K], xscale fp32 [M, 1], qweight int8 [N, K], wscale [N, 1] -> [M, N] out_dtype."""
    return launch_row_scaled_gemm(_w8a8_kernel, "w8a8", xq, xscale, qweight, wscale, bias, out_dtype)
