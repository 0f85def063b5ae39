"""W8A8 and FP8 GEMM (Triton): 8-bit per-token activations x 8-bit per-output-channel weights.

int8 x int8 -> int32 on the tensor cores (Ampere and newer), or E4M3 x E4M3 -> fp32 (sm_89+),
then one fp32 epilogue:
y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]). The activation codes come from
:func:`diffq.kernels.activation_kernels.quantize_rows` (a per-token scale needs the whole row first).

FP8 accumulation precision is chosen explicitly: products of E4M3 values are exact in fp32, but
Hopper's FP8 wgmma adds them in a reduced-precision accumulator (Triton's default keeps the whole
K there). ``IMPRECISE = BLOCK_K`` (``max_num_imprecise_acc``) makes Triton add each BLOCK_K-deep
partial (128 products) into a full fp32 accumulator, the promotion interval cuBLAS and DeepSeek-V3
use: the rounding of one 128-term chunk remains, so the result is close to, not bit-equal to, an
fp32 sum. int8 sums are exact (int32). Triton 3.8 makes a wgmma loop asynchronous only for fp32
accumulators, so the FP8 loop overlaps MMA and loads and the int8 loop drains every iteration.
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import contiguous_range, store_tile, tile_ids, wrapped_rows_cols


@triton.jit
def _row_scaled_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IMPRECISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq [M, K], xs fp32 [M], w [N, K], ws [N] -> y [M, N] (y's dtype).

    INT_ACC: int8 operands, int32 accumulation (W8A8); otherwise float8e4nv operands with fp32
    accumulation promoted every IMPRECISE products (FP8; see the module docstring)."""
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
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=IMPRECISE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sx = tl.load(xs_ptr + rm)
    sw = tl.load(ws_ptr + rn).to(tl.float32)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    store_tile(y_ptr, out, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)
