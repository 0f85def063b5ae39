"""W4A8 GEMM (Triton): packed int4 group-scaled weights x int8 per-token activations.

No GPU has an int4 x int8 MMA (and Hopper has no int4 MMA at all), so the nibbles are
sign-extended to int8 in registers and the math runs on the int8 tensor cores. Each quantization
group's int32 partial dot is scaled by w_scale[n, g] into an fp32 accumulator; x_scale[m]
multiplies once at the end:

y[m, n] = x_scale[m] * sum_g w_scale[n, g] * sum_{k in g} xq[m, k] * wq[n, k]  (+ bias[n])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.autotune import launch, m_bucket
from diffq.kernels.tl_helpers import contiguous_range, store_tile, tile_ids, unpack_int4, wrapped_rows_cols


@triton.jit
def _w4a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_ym,
    G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq int8 [M, K], xs fp32 [M], w packed uint8 [N, K//2], ws [N, K//G] -> y [M, N]."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rk = contiguous_range(BLOCK_K)
    rkh = contiguous_range(BLOCK_K // 2)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rkh[None, :]
    s_ptrs = ws_ptr + rn.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(K // G):
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for _kk in tl.static_range(G // BLOCK_K):
            a = tl.load(x_ptrs)
            b = unpack_int4(tl.load(w_ptrs))
            part = tl.dot(a, tl.trans(b), part, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 2
        sw = tl.load(s_ptrs + g).to(tl.float32)
        acc += part.to(tl.float32) * sw[None, :]
    sx = tl.load(xs_ptr + rm)
    out = acc * sx[:, None]
    store_tile(y_ptr, out, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def w4a8_gemm_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq int8 [M, K], xscale fp32 [M, 1], qweight uint8 [N, K//2], wscale [N, K//G] -> [M, N]."""
    m, k = xq.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y

    launch(
        _w4a8_kernel, "w4a8",
        x_ptr=xq, xs_ptr=xscale, w_ptr=qweight, ws_ptr=wscale, b_ptr=bias if bias is not None else wscale,
        y_ptr=y, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=xq.stride(0), stride_wn=qweight.stride(0), stride_sn=wscale.stride(0), stride_ym=y.stride(0),
        G=group_size, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y
