"""W4A8 GEMM (Triton): packed int4 group-scaled weights x int8 per-token activations.

No GPU has an int4 x int8 MMA (and Hopper has no int4 MMA at all), so the math runs on the int8
tensor cores. Swapped operands: the tile computes y^T = W · x^T with the decoded weights as the
MMA's register operand (wgmma A from registers on sm_90), the int8 activation tile going from
global to shared memory to the tensor core untouched. Weights are the split-half repacked copy
of :mod:`diffq.kernels.repack` (per 128-element block, byte j holds element j and element 64 + j);
each byte gives two int8 operands with two bit operations per 4
bytes (:func:`~diffq.kernels.tl_helpers.nib_int8x16`), holding ``16 * code`` (exact; the 16 is
divided out of the activation scale at the end, a power of two). Each group's int32 partial dot
goes to fp32 once (``I2FP`` on sm_90, the magic-number add on sm_80 where ``I2F`` is
quarter-rate) and is scaled by its group scale into the fp32 accumulator; x_scale[m] multiplies
once at the end:

y[m, n] = x_scale[m] * sum_g w_scale[g, n] * sum_{k in g} xq[m, k] * wq[n, k]  (+ bias[n])

At G = 64 the per-group conversion + FFMA is two instructions per accumulator element per
64-deep MMA step, which on sm_90 is as long as the int8 MMA itself: this GEMM cannot be
MMA-bound at G = 64 (see BENCHMARKS.md, "Kernels"). Triton 3.8 only pipelines wgmma with fp32
accumulators asynchronously, so MMA/FP overlap comes from two or more CTAs per SM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import (
    contiguous_range,
    int_to_f32,
    nib_int8x16,
    store_tile_t,
    tile_ids,
    wrapped_rows_cols,
)  # fmt: skip


@triton.jit
def _w4a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    G: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq int8 [M, K], xs fp32 [M], w split-half uint8 [N, Kp//2], ws fp32 [Kp//G, N] -> y [M, N].

    Kp = K rounded up to 128; BLOCK_K a multiple of 128 and of G (G = 64 or a multiple of 128);
    EVEN: K % BLOCK_K == 0 (else the x tiles past K are masked)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rh = contiguous_range(64)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rh[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rh[None, :]
    s_ptrs = ws_ptr + rn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        for b in tl.static_range(BLOCK_K // 128):
            kb = b * 128
            wl, wh = nib_int8x16(tl.load(w_ptrs + kb // 2), ASM)
            if EVEN:
                xl = tl.load(x_ptrs + kb)
                xh = tl.load(x_ptrs + kb + 64)
            else:
                xl = tl.load(x_ptrs + kb, mask=(k0 + kb + rh < K)[None, :], other=0.0)
                xh = tl.load(x_ptrs + kb + 64, mask=(k0 + kb + 64 + rh < K)[None, :], other=0.0)
            if G == 64:  # the two halves are two groups
                g = (k0 + kb) // 64
                p0 = tl.dot(wl, tl.trans(xl), out_dtype=tl.int32)
                acc += int_to_f32(p0, MAGIC) * tl.load(s_ptrs + g * N)[:, None]
                p1 = tl.dot(wh, tl.trans(xh), out_dtype=tl.int32)
                acc += int_to_f32(p1, MAGIC) * tl.load(s_ptrs + (g + 1) * N)[:, None]
            else:
                if kb % G == 0:
                    part = tl.dot(wl, tl.trans(xl), out_dtype=tl.int32)
                else:
                    part = tl.dot(wl, tl.trans(xl), part, out_dtype=tl.int32)
                part = tl.dot(wh, tl.trans(xh), part, out_dtype=tl.int32)
                if (kb + 128) % G == 0:
                    acc += int_to_f32(part, MAGIC) * tl.load(s_ptrs + ((k0 + kb) // G) * N)[:, None]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    sx = tl.load(xs_ptr + rm) * 0.0625  # the weights were 16 * code
    store_tile_t(y_ptr, acc * sx[None, :], b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)
