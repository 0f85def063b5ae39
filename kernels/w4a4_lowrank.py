"""W4A4 + low-rank GEMM (Triton): the main GEMM of an SVDQuant layer.

Hopper has no int4 MMA (and Triton emits none on Ampere either), so the int4 codes are widened
to an 8-bit MMA; this route choice is what QuantSummary should show (``layer_dispatch.
kernel_route``). Two routes, picked per GPU by :func:`diffq.kernels.dispatch.w4a4_route`:

* ``fp8`` (sm_89/sm_90): int4 codes in [-7, 7] (the core's symmetric range) are exact E4M3
  values. The activation kernel writes its codes as E4M3 bytes; the weights come from a
  sign-magnitude repack and decode to E4M3 subnormals ``code * 2^-9`` with one mask (low) or
  four bit operations per 4 bytes (high; :func:`~diffq.kernels.tl_helpers.nib_e4m3`). The MMA
  returns ``P' = 2^-9 P`` (P the integer group dot: |P| <= 49 G, under 2^12 units for G = 64 and
  2^13 for G = 128), and ``u = 2^9 x_scale`` makes ``P' * u = P * x_scale`` exactly *if* the
  FP8 tensor core's reduced-precision accumulator keeps that many significant bits (it is
  reported to keep about 14; not verified here, no GPU was lent) and honours E4M3 subnormals
  (part of the FP8 format; also unverified: ``DIFFQ_W4A4_ROUTE=int8`` switches to the int8 route).
  Hence "exact enough": the interpreter checks are bit-exact, a GPU may differ in the last bits.
  Weights holding -8 (outside the core's format) take the int8 route.
* ``int8`` (sm_80, and the bit-exact CPU check): int8 activation codes, weights as ``16 * code``
  int8 (:func:`~diffq.kernels.tl_helpers.nib_int8x16`), int32 group dots, ``u = x_scale / 16``.

Either way the tile computes y^T = W · x^T with the decoded weights as the register operand, and
each group adds ``t * w_scale[g, n]`` (t = the x-scaled group dot) to the fp32 accumulator; the
rank-r up-projection ``down @ lr_up`` (``down`` summed from the activation kernel's K-split
partials) and the bias run in the epilogue:

y[m, n] = sum_g x_scale[m, g] * w_scale[g, n] * dot_g(xq[m], wq[n]) + (down @ lr_up)[m, n] + bias[n]
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import (
    contiguous_range,
    int_to_f32,
    nib_e4m3,
    nib_int8x16,
    store_tile_t,
    tile_ids,
    wrapped_rows_cols,
)  # fmt: skip


@triton.jit
def _group_dot(wl, xl, part, FRESH: tl.constexpr, FP8_MMA: tl.constexpr):
    """[BN, 64] weight operand x [BM, 64] activation codes -> [BN, BM] (fp32 if FP8_MMA else int32)."""
    if FP8_MMA:  # Triton's default: the group (G <= 128 integer-valued products) stays in the
        # tensor core's accumulator, no fp32 promotion (its sum needs at most 13 significant bits)
        if FRESH:
            out = tl.dot(wl, tl.trans(xl))
        else:
            out = tl.dot(wl, tl.trans(xl), part)
    else:
        if FRESH:
            out = tl.dot(wl, tl.trans(xl), out_dtype=tl.int32)
        else:
            out = tl.dot(wl, tl.trans(xl), part, out_dtype=tl.int32)
    return out


@triton.jit
def _group_scale(part, u_ptr, g, M, rm, FP8_MMA: tl.constexpr, MAGIC: tl.constexpr):
    """Group dot -> fp32 ``dot * x_scale`` [BN, BM] (``P' * u`` with u = 2^9 x_scale for FP8,
    ``P16 * u`` with u = x_scale / 16 for int8: both exact power-of-two rescalings)."""
    u = tl.load(u_ptr + g * M + rm)
    if FP8_MMA:
        out = part * u[None, :]
    else:
        out = int_to_f32(part, MAGIC) * u[None, :]
    return out


@triton.jit
def _w4a4_kernel(
    x_ptr, u_ptr, w_ptr, ws_ptr, d_ptr, l2_ptr, b_ptr, y_ptr,
    M, N, K, R, stride_xm, stride_wn, stride_ds, stride_dm, stride_l2r, stride_ym,
    G: tl.constexpr, EVEN: tl.constexpr, FP8_MMA: tl.constexpr, HAS_LR: tl.constexpr, LR_F32: tl.constexpr,
    R_PAD: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    MAGIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq [M, K] (E4M3 if FP8_MMA else int8 codes), u fp32 [Kp//G, M], w split-half uint8
    [N, Kp//2], ws fp32 [Kp//G, N], down partials fp32 [SPLITS, M, R], l2 [R, N] -> y [M, N].

    Kp = K rounded up to 128; BLOCK_K a multiple of 128 and of G; EVEN: K % BLOCK_K == 0."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rh = contiguous_range(64)
    rows = rm.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + rh[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rh[None, :]
    s_ptrs = ws_ptr + rn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32 if FP8_MMA else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        for b in tl.static_range(BLOCK_K // 128):
            kb = b * 128
            p = tl.load(w_ptrs + kb // 2)
            if FP8_MMA:
                wl, wh = nib_e4m3(p, ASM)
            else:
                wl, wh = nib_int8x16(p, ASM)
            if EVEN:
                xl = tl.load(x_ptrs + kb)
                xh = tl.load(x_ptrs + kb + 64)
            else:
                xl = tl.load(x_ptrs + kb, mask=(k0 + kb + rh < K)[None, :], other=0.0)
                xh = tl.load(x_ptrs + kb + 64, mask=(k0 + kb + 64 + rh < K)[None, :], other=0.0)
            if G == 64:  # the two halves are two groups
                g = (k0 + kb) // 64
                t = _group_scale(_group_dot(wl, xl, part, True, FP8_MMA), u_ptr, g, M, rm, FP8_MMA, MAGIC)
                acc += t * tl.load(s_ptrs + g * N)[:, None]
                t = _group_scale(_group_dot(wh, xh, part, True, FP8_MMA), u_ptr, g + 1, M, rm, FP8_MMA, MAGIC)
                acc += t * tl.load(s_ptrs + (g + 1) * N)[:, None]
            else:
                part = _group_dot(wl, xl, part, kb % G == 0, FP8_MMA)
                part = _group_dot(wh, xh, part, False, FP8_MMA)
                if (kb + 128) % G == 0:
                    g = (k0 + kb) // G
                    t = _group_scale(part, u_ptr, g, M, rm, FP8_MMA, MAGIC)
                    acc += t * tl.load(s_ptrs + g * N)[:, None]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    if HAS_LR:
        rr = tl.arange(0, R_PAD)
        rmask = rr < R
        d = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            d += tl.load(d_ptr + s * stride_ds + rows[:, None] * stride_dm + rr[None, :], mask=rmask[None, :], other=0.0)
        up = tl.load(l2_ptr + rr[:, None].to(tl.int64) * stride_l2r + rn[None, :], mask=rmask[:, None], other=0.0)
        if LR_F32:
            acc = tl.dot(tl.trans(up.to(tl.float32)), tl.trans(d), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(up), tl.trans(d.to(up.dtype)), acc)
    store_tile_t(y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)
