"""W4A16 GEMM (Triton): packed int4 weights with per-group scales x 16/32-bit activations.

Swapped operands: the tile computes y^T = W · x^T, so the dequantized weight is the MMA's
**register** operand (wgmma A from registers on sm_90; mma.sync on sm_80) and the activation tile
goes from global to shared memory to the tensor core untouched. The weights are the
split-half repacked copy of :mod:`diffq.kernels.repack` (per 128-element block, byte j holds
element j and element 64 + j) and are decoded to *exact* codes in the
activation dtype with the magic-exponent trick (:func:`~diffq.kernels.tl_helpers.nib_float`: no
int->float instruction). The group scale is applied to the fp32 partial sum of each group after
the MMA (one FFMA per accumulator element per group), so the tensor core multiplies exact codes
and the result is the reference's ``x @ (code * scale)^T`` up to fp32 summation order:

y[m, n] = sum_g wscale[g, n] * sum_{k in g} x[m, k] * code[n, k]  (+ bias[n])

Scales are group-major fp32 ``[groups, N]`` (one contiguous ``[BLOCK_N]`` vector per group; the
repacked copy pads K to a multiple of 128 with a zero group when K // G is odd and G = 64).
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import contiguous_range, nib_float, store_tile_t, tile_ids, wrapped_rows_cols


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    G: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr, ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """x [M, K] fp16/bf16/fp32, w split-half uint8 [N, Kp//2], ws fp32 [Kp//G, N] -> y [M, N].

    Kp = K rounded up to 128. BLOCK_K: K per loop iteration, a multiple of 128 and of G (G = 64
    or a multiple of 128). EVEN: K % BLOCK_K == 0 (else the x tiles past K are masked).
    F32_DOT: fp32 operands with an IEEE fp32 dot (fp32 activations, and the interpreter, which
    has no bf16 matmul)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rh = contiguous_range(64)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rh[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rh[None, :]
    s_ptrs = ws_ptr + rn
    op_dtype: tl.constexpr = tl.float32 if F32_DOT else x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for b in tl.static_range(BLOCK_K // 128):
            kb = b * 128
            wl, wh = nib_float(tl.load(w_ptrs + kb // 2), op_dtype, ASM)
            if EVEN:
                xl = tl.load(x_ptrs + kb).to(op_dtype)
                xh = tl.load(x_ptrs + kb + 64).to(op_dtype)
            else:
                xl = tl.load(x_ptrs + kb, mask=(k0 + kb + rh < K)[None, :], other=0.0).to(op_dtype)
                xh = tl.load(x_ptrs + kb + 64, mask=(k0 + kb + 64 + rh < K)[None, :], other=0.0).to(op_dtype)
            if G == 64:  # the two halves are two groups
                g = (k0 + kb) // 64
                acc += _dot(wl, xl, F32_DOT) * tl.load(s_ptrs + g * N)[:, None]
                acc += _dot(wh, xh, F32_DOT) * tl.load(s_ptrs + (g + 1) * N)[:, None]
            else:
                if kb % G == 0:
                    part = _dot(wl, xl, F32_DOT)
                else:
                    part = _dot_acc(wl, xl, part, F32_DOT)
                part = _dot_acc(wh, xh, part, F32_DOT)
                if (kb + 128) % G == 0:
                    acc += part * tl.load(s_ptrs + ((k0 + kb) // G) * N)[:, None]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    store_tile_t(y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _dot(w, x, F32_DOT: tl.constexpr):
    """[BN, k] weight codes x [BM, k] activations -> fp32 [BN, BM] (fresh accumulator)."""
    if F32_DOT:
        out = tl.dot(w, tl.trans(x), input_precision="ieee")
    else:
        out = tl.dot(w, tl.trans(x))
    return out


@triton.jit
def _dot_acc(w, x, acc, F32_DOT: tl.constexpr):
    if F32_DOT:
        out = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    else:
        out = tl.dot(w, tl.trans(x), acc)
    return out
