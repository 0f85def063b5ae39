"""W4A16 GEMM (Triton): packed int4 weights with per-group scales x 16/32-bit activations.

The weight tile is read as bytes (half the bytes of int8, a quarter of bf16: the point of the
format when the GEMM is memory-bound, i.e. small M), unpacked to int8 in registers, dequantized
with its group scale in the main loop and fed to a bf16/fp16 MMA with fp32 accumulation.
BLOCK_K divides the group size, so each K tile needs one scale per output column.

y[m, n] = sum_k x[m, k] * (code[n, k] * wscale[n, k // G]) (+ bias[n])
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.autotune import is_interpreted, launch, m_bucket
from diffq.kernels.tl_helpers import contiguous_range, store_tile, tile_ids, unpack_int4, wrapped_rows_cols


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_ym,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """x [M, K] fp16/bf16/fp32, w packed uint8 [N, K//2], ws [N, K//G] -> y [M, N] (x dtype).

    F32_DOT: upcast both operands to fp32 and use an IEEE fp32 dot (fp32 activations, and the
    interpreter, which has no bf16 matmul); otherwise the dequantized weight is cast to x.dtype.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rk = contiguous_range(BLOCK_K)
    rkh = contiguous_range(BLOCK_K // 2)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rkh[None, :]
    s_ptrs = ws_ptr + rn.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(K // G):
        sw = tl.load(s_ptrs + g).to(tl.float32)
        for _kk in tl.static_range(G // BLOCK_K):
            x = tl.load(x_ptrs)
            w = unpack_int4(tl.load(w_ptrs)).to(tl.float32) * sw[:, None]  # [BLOCK_N, BLOCK_K]
            if F32_DOT:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 2
    store_tile(y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def w4a16_triton(
    x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Launch on validated, contiguous inputs: x2 [M, K], qweight [N, K//2], wscale [N, K//G]."""
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    f32 = is_interpreted(_w4a16_kernel) or x2.dtype == torch.float32

    launch(
        _w4a16_kernel, "w4a16",
        x_ptr=x2, w_ptr=qweight, ws_ptr=wscale, b_ptr=bias if bias is not None else wscale, y_ptr=y,
        M=m, N=n, K=k, M_BUCKET=m_bucket(m),
        stride_xm=x2.stride(0), stride_wn=qweight.stride(0), stride_sn=wscale.stride(0), stride_ym=y.stride(0),
        G=group_size, HAS_BIAS=bias is not None, F32_DOT=f32,
    )  # fmt: skip
    return y
