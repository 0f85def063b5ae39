"""FP4 W4A4 + low-rank (Triton): NVFP4 / MXFP4 weights and activations on ``tl.dot_scaled``.

Three kernels per layer call (the math is :mod:`diffq.kernels.fp4_reference`):

* :func:`_fp4_amax_kernel` (NVFP4 only): the abs-max of the smoothed input over the whole tensor,
  one ``atomic_max`` per program on the fp32 bits (non-negative floats order like their bits), so
  the per-tensor scale ``g = max(amax / 2688, 2^-32)`` exists before the first code: the core's
  rule, with no host synchronisation.
* :func:`_fp4_act_kernel`: smooth (``x / smooth.to(x.dtype)``, rounded to x's dtype, as
  ``QuantLinear.forward``), per-block scales in the format's type, E2M1 codes packed two per
  byte, and the low-rank down-projection ``x_s @ L1``; grid (row blocks x K splits), each split
  writing its partial ``down`` (the GEMM epilogue sums them in a fixed order). Divisions are IEEE
  (``div_rn``) where the core divides, so codes and scales are the core's bit for bit.
* :func:`_fp4_gemm_kernel`: ``acc += dot_scaled(xq, xs, "e2m1", wq^T, ws, "e2m1")`` over K, then
  ``acc * (g_x * g_w)`` (NVFP4), ``+ down @ L2`` and bias in the epilogue.

Operands as ``tl.dot_scaled`` wants them (and as the core already stores the weight): codes
uint8 ``[rows, K/2]`` packed along K (low nibble first), scales ``[rows, K/B]`` row-major:
float8e4nv for NVFP4 (B = 16; the MMA reads them as UE4M3: the core's scales are positive),
uint8 E8M0 for MXFP4 (B = 32). On sm_100 this compiles to ``tcgen05.mma ... block_scale``
(SASS ``UTCOMMA``), on sm_120 to the block-scaled ``mma.sync ... m16n8k64`` (``OMMA.SF``); on
sm_80-sm_90 Triton decodes both operands to bf16 (exact: an E2M1 value times an E4M3 or E8M0
scale has at most 6 significant bits) and runs the bf16 MMA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import (
    SCALE_MIN,
    e4m3_grid,
    pack_int4,
    round_to_bf16,
    store_tile,
    tile_ids,
    wrapped_rows_cols,
)

#: columns the activation kernels handle per step (a multiple of both block sizes)
CHUNK = 64


@triton.jit
def _like_input(v, DT: tl.constexpr):
    """fp32 -> the nearest ``DT`` value (bf16 / fp16 / fp32), as fp32."""
    if DT == tl.bfloat16:
        v = round_to_bf16(v)
    elif DT == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _smoothed(x_ptr, sm_ptr, rows, cols, rmask, kmask, stride_xm, HAS_SMOOTH: tl.constexpr):
    """Load x [R, C] -> fp32 of ``x / smooth.to(x.dtype)`` rounded to x's dtype (QuantLinear's x_s)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    xf = x.to(tl.float32)
    if HAS_SMOOTH:
        s = _like_input(tl.load(sm_ptr + cols, mask=kmask, other=1.0), x_ptr.dtype.element_ty)
        xf = _like_input(tl.math.div_rn(xf, s[None, :]), x_ptr.dtype.element_ty)
    return xf


@triton.jit
def e2m1_codes(y):
    """fp32 (already divided by the scale) -> int32 E2M1 sign-magnitude codes 0..15: the nearest
    of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (ties to the even magnitude index, saturating at 6), as
    ``diffq.formats.floating.e2m1_encode``; -0 and values rounding to 0 get code 0."""
    a = tl.abs(y)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    neg = (y < 0) & (idx > 0)
    return idx | (neg.to(tl.int32) << 3)


@triton.jit
def nv_tensor_scale(amax_bits_ptr):
    """NVFP4 per-tensor scale from the abs-max's fp32 bits: ``max(amax / 2688, 2^-32)``."""
    amax = tl.load(amax_bits_ptr).to(tl.float32, bitcast=True)
    return tl.maximum(tl.math.div_rn(amax, 2688.0), SCALE_MIN)


@triton.jit
def _ceil_log2(v):
    """Exact ``ceil(log2(max(v, 2^-127)))`` of fp32 v >= 0 from its bits (int32), as the core's
    ``frexp`` rule (``diffq.formats.floating.e8m0_scale``)."""
    bits = v.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    normal = ex - 127 + (man != 0).to(tl.int32)
    tiny = tl.where(man <= 0x400000, -127, -126)  # v < 2^-126: clamped to 2^-127, or in (2^-127, 2^-126)
    return tl.where(ex > 0, normal, tiny)


@triton.jit
def _pow2(e):
    """int32 e in [-127, 127] -> fp32 2^e (exact; 2^-127 is the subnormal 0x00400000)."""
    return tl.where(e >= -126, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_amax_kernel(
    x_ptr, sm_ptr, amax_ptr, M, K, stride_xm, chunks_per_split,
    HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, CB: tl.constexpr,
):  # fmt: skip
    """x [M, K] -> atomic max of |x / smooth| (fp32 bits) into amax_ptr (int32 [1], zeroed)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = rm.to(tl.int64)
    rc = tl.arange(0, CB)
    c0 = split * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, tl.cdiv(K, CB))
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(c0, c1):
        cols = c * CB + rc
        xs = _smoothed(x_ptr, sm_ptr, rows, cols, rm < M, cols < K, stride_xm, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
    tl.atomic_max(amax_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def _fp4_act_kernel(
    x_ptr, sm_ptr, amax_ptr, l1_ptr, q_ptr, s_ptr, d_ptr,
    M, K, R, stride_xm, stride_qm, stride_sm, stride_l1k, stride_ds, stride_dm, chunks_per_split,
    B: tl.constexpr, NV: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, LR_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, CB: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """x [M, K] -> packed E2M1 codes uint8 [M, K/2], block scales [M, K/B] (float8e4nv if NV,
    else uint8 E8M0), partial down-projections fp32 [splits, M, R] (HAS_LR); program (row block,
    split). NV: the tensor scale comes from ``amax_ptr`` (int32 fp32 bits, :func:`_fp4_amax_kernel`)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rows = rm.to(tl.int64)
    rc = tl.arange(0, CB)
    rh = tl.arange(0, CB // 2)
    rb = tl.arange(0, CB // B)
    rr = tl.arange(0, R_PAD)
    if NV:
        g = nv_tensor_scale(amax_ptr)
    c0 = split * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, tl.cdiv(K, CB))
    down = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for c in range(c0, c1):
        cols = c * CB + rc
        kmask = cols < K
        xs = _smoothed(x_ptr, sm_ptr, rows, cols, mmask, kmask, stride_xm, HAS_SMOOTH)
        if HAS_LR:
            l1 = tl.load(l1_ptr + cols[:, None].to(tl.int64) * stride_l1k + rr[None, :],
                         mask=kmask[:, None] & (rr[None, :] < R), other=0.0)  # fmt: skip
            if LR_F32:
                down = tl.dot(xs, l1.to(tl.float32), down, input_precision="ieee")
            else:
                down = tl.dot(xs.to(l1.dtype), l1, down)
        x3 = tl.reshape(xs, [BLOCK_M, CB // B, B])
        raw = tl.math.div_rn(tl.max(tl.abs(x3), axis=2), 6.0)  # [BLOCK_M, CB // B]
        if NV:
            v = e4m3_grid(tl.minimum(tl.maximum(tl.math.div_rn(raw, g), 2.0**-9), 448.0))
            stored = v.to(tl.float8e4nv)
            y3 = tl.math.div_rn(x3, (v * g)[:, :, None])
        else:
            e = tl.minimum(_ceil_log2(raw), 127)
            stored = (e + 127).to(tl.uint8)
            y3 = x3 * _pow2(-e)[:, :, None]  # x / 2^e exactly (a power-of-two reciprocal)
        codes = tl.reshape(e2m1_codes(y3), [BLOCK_M, CB])
        packed = pack_int4(codes, BLOCK_M, CB)
        hcols = c * (CB // 2) + rh
        tl.store(q_ptr + rows[:, None] * stride_qm + hcols[None, :], packed, mask=mmask[:, None] & (hcols < K // 2)[None, :])
        bcols = c * (CB // B) + rb
        tl.store(s_ptr + rows[:, None] * stride_sm + bcols[None, :], stored, mask=mmask[:, None] & (bcols < K // B)[None, :])
    if HAS_LR:
        tl.store(d_ptr + split * stride_ds + rows[:, None] * stride_dm + rr[None, :], down,
                 mask=mmask[:, None] & (rr[None, :] < R))  # fmt: skip


@triton.jit
def _fp4_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, amax_ptr, wg_ptr, d_ptr, l2_ptr, b_ptr, y_ptr,
    M, N, K, R, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ds, stride_dm, stride_l2r, stride_ym,
    B: tl.constexpr, NV: tl.constexpr, EVEN_K: tl.constexpr, HAS_LR: tl.constexpr, LR_F32: tl.constexpr,
    R_PAD: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq uint8 [M, K/2], xs [M, K/B], wq uint8 [N, K/2], ws [N, K/B] (float8e4nv if NV else
    uint8), NV: activation abs-max bits int32 [1] and weight tensor scale fp32 [1]; down partials
    fp32 [SPLITS, M, R], l2 [R, N], bias fp32 [N] -> y [M, N]. EVEN_K: K % BLOCK_K == 0.
    LR_F32: the low-rank dot in IEEE fp32 (the interpreter; compiled, an FMA dot spills the big
    tiles and Triton 3.8's "tf32x3" on sm_100 compiles to a trap, so fp32 branches are added by the
    launcher in torch instead), else a 16-bit MMA in L2's dtype."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K // 2)
    rs = tl.arange(0, BLOCK_K // B)
    rows = rm.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    xs_ptrs = xs_ptr + rows[:, None] * stride_xsm + rs[None, :]
    ws_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * stride_wsn + rs[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
            sa = tl.load(xs_ptrs)
            sb = tl.load(ws_ptrs)
        else:  # past K: zero codes (they add nothing whatever the scale; E8M0 127 = 1.0, never NaN)
            kmask = (k0 // 2 + rk < K // 2)[None, :]
            smask = (k0 // B + rs < K // B)[None, :]
            a = tl.load(x_ptrs, mask=kmask, other=0)
            b = tl.load(w_ptrs, mask=kmask, other=0)
            sa = tl.load(xs_ptrs, mask=smask, other=0.0 if NV else 127)
            sb = tl.load(ws_ptrs, mask=smask, other=0.0 if NV else 127)
        acc = tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1", acc)
        x_ptrs += BLOCK_K // 2
        w_ptrs += BLOCK_K // 2
        xs_ptrs += BLOCK_K // B
        ws_ptrs += BLOCK_K // B
    if NV:
        acc = acc * (nv_tensor_scale(amax_ptr) * tl.load(wg_ptr))
    if HAS_LR:
        rr = tl.arange(0, R_PAD)
        rmask = rr < R
        d = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for s in range(SPLITS):  # a loop, not unrolled: one partial live at a time (no spills on sm_120)
            d += tl.load(d_ptr + s * stride_ds + rows[:, None] * stride_dm + rr[None, :], mask=rmask[None, :], other=0.0)
        up = tl.load(l2_ptr + rr[:, None].to(tl.int64) * stride_l2r + rn[None, :], mask=rmask[:, None], other=0.0)
        if LR_F32:  # the interpreter's branch: round down to L2's dtype as the MMA path does
            acc = tl.dot(_like_input(d, l2_ptr.dtype.element_ty), up.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(d.to(up.dtype), up, acc)
    store_tile(y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def act_config(m: int, chunks: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, splits, chunks_per_split) of the activation kernels: about four programs per SM,
    splitting K when the row blocks alone are too few (FLUX 4608 tokens: 144 row blocks x 4)."""
    bm = 16 if m <= 16 else 32
    blocks = triton.cdiv(m, bm)
    splits = 1
    while splits < 4 and blocks * splits < 4 * sms and splits * 2 <= chunks:
        splits *= 2
    per = triton.cdiv(chunks, splits)
    return bm, triton.cdiv(chunks, per), per
