"""Activation quantization kernels (Triton): per-token int8 / FP8, and the fused SVDQuant input
stage (smooth -> per-group int4 codes + low-rank down-projection) that reads x once.

Why a separate kernel rather than fusing into the GEMM: a per-token scale needs the amax of the
whole row before the first code can be produced, while a GEMM tile sees only BLOCK_K columns at
a time; quantizing once also means every N-tile of the GEMM reads 1 byte per input element
instead of 2.

* :func:`_act_rows_kernel`: one pass when the row fits one tile (``BLOCK_K >= K``, up to 16384
  columns: the row stays in registers between its amax and its codes), two passes beyond.
* :func:`_act_groups_kernel`: one pass, one group per step; the grid is (row blocks) x (K
  splits) so that FLUX-size inputs launch several CTAs per SM (each split writes its partial
  ``down = (x / s) @ lr_down`` slice; the GEMM epilogue or the host sums the splits in a fixed
  order: deterministic).

Arithmetic: per element, multiplies only. ``x / smooth`` is ``x * (1 / smooth)`` (the reciprocal
is computed once per layer, IEEE), and codes are ``round(x * (1 / scale))`` with ``scale =
amax / qmax`` (one IEEE division per row or group, ``tl.math.div_rn``) and its IEEE reciprocal.
The torch reference (:mod:`diffq.kernels.reference`) uses the same rule, so the kernels match it
bit for bit; against the core's ``round(x / scale)`` a code can differ by one step only where
``x / scale`` lies within one fp32 ulp of a rounding boundary. Ties to even
(:func:`round_half_even`), E4M3 via :func:`e4m3_grid`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.kernels.tl_helpers import SCALE_MIN, e4m3_grid, pack_int4, round_half_even

#: widest row the one-pass per-token kernel keeps in registers
ONE_PASS_MAX_K = 16384
#: most K splits of the group kernel (the W4A4 GEMM epilogue sums that many partial down-projections)
MAX_SPLITS = 4


@triton.jit
def _row_codes(x, inv, QMAX: tl.constexpr, FP8: tl.constexpr):
    y = x * inv
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if FP8:
        q = e4m3_grid(y).to(tl.float8e4nv)
    else:
        q = round_half_even(y).to(tl.int8)
    return q


@triton.jit
def _act_rows_kernel(
    x_ptr, inv_sm_ptr, static_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr,
    ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x [M, K] (fp16/bf16/fp32) -> codes [M, K] (int8 or fp8e4nv), scale fp32 [M].

    inv_sm: fp32 [K] = 1 / smooth. STATIC: one scalar scale at static_ptr. ONE_PASS: BLOCK_K >= K."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rows = rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        kmask = rk < K
        m2 = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_sm_ptr + rk, mask=kmask, other=1.0)[None, :]
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.max(tl.abs(x), axis=1)
            scale = tl.math.div_rn(amax, tl.full([BLOCK_M], QMAX, tl.float32))
        scale = tl.maximum(scale, SCALE_MIN)
        tl.store(s_ptr + rm, scale, mask=mmask)
        inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        q = _row_codes(x, inv[:, None], QMAX, FP8)
        tl.store(q_ptr + rows[:, None] * stride_qm + rk[None, :], q, mask=m2)
    else:
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kmask = (k0 + rk) < K
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0,
                ).to(tl.float32)  # fmt: skip
                if HAS_SMOOTH:
                    x = x * tl.load(inv_sm_ptr + k0 + rk, mask=kmask, other=1.0)[None, :]
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            scale = tl.math.div_rn(amax, tl.full([BLOCK_M], QMAX, tl.float32))
        scale = tl.maximum(scale, SCALE_MIN)
        tl.store(s_ptr + rm, scale, mask=mmask)
        inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + rk) < K
            m2 = mmask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = x * tl.load(inv_sm_ptr + k0 + rk, mask=kmask, other=1.0)[None, :]
            q = _row_codes(x, inv[:, None], QMAX, FP8)
            tl.store(q_ptr + rows[:, None] * stride_qm + (k0 + rk)[None, :], q, mask=m2)


@triton.jit
def _act_groups_kernel(
    x_ptr, inv_sm_ptr, static_ptr, l1_ptr, q_ptr, s_ptr, d_ptr,
    M, K, R, stride_xm, stride_qm, stride_sm, stride_sg, stride_l1k, stride_ds, stride_dm,
    static_stride, groups_per_split,
    G: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, HAS_LR: tl.constexpr,
    LR_F32: tl.constexpr, OUT: tl.constexpr, S_FACTOR: tl.constexpr, PAD_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """x [M, K] -> int4 codes, group scales, partial down-projections; program (row block, split).

    OUT 0: packed int4 uint8 [M, K//2] (the format of ``diffq.formats.pack_int4``); 1: int8
    codes [M, K]; 2: E4M3 codes [M, K] (exact: integers in [-7, 7]). Scales are stored times
    S_FACTOR (an exact power of two: 1, 1/16 or 512 for the GEMM routes) at ``s_ptr + m *
    stride_sm + g * stride_sg`` (token-major or group-major). PAD_GROUP: also write a zero scale
    for group K // G (the GEMM's zero padding group). HAS_LR: split s writes
    ``(x / smooth)[:, its groups] @ lr_down[its rows]`` fp32 to ``d_ptr + s * stride_ds``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rows = rm.to(tl.int64)
    rg = tl.arange(0, G)
    rh = tl.arange(0, G // 2)
    rr = tl.arange(0, R_PAD)
    n_groups = K // G
    g0 = split * groups_per_split
    g1 = tl.minimum(g0 + groups_per_split, n_groups)
    down = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for g in range(g0, g1):
        rk = g * G + rg
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_sm_ptr + rk)[None, :]
        if HAS_LR:
            l1 = tl.load(l1_ptr + rk[:, None].to(tl.int64) * stride_l1k + rr[None, :], mask=rr[None, :] < R, other=0.0)
            if LR_F32:
                down = tl.dot(x, l1.to(tl.float32), down, input_precision="ieee")
            else:
                down = tl.dot(x.to(l1.dtype), l1, down)
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr + g * static_stride).to(tl.float32)
        else:
            scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([BLOCK_M], 7.0, tl.float32))
        scale = tl.maximum(scale, SCALE_MIN)
        tl.store(s_ptr + rows * stride_sm + g * stride_sg, scale * S_FACTOR, mask=mmask)
        inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
        y = tl.minimum(tl.maximum(x * inv[:, None], -7.0), 7.0)
        c = round_half_even(y)
        if OUT == 0:
            packed = pack_int4(c.to(tl.int32), BLOCK_M, G)
            tl.store(q_ptr + rows[:, None] * stride_qm + (g * (G // 2) + rh)[None, :], packed, mask=mmask[:, None])
        elif OUT == 1:
            tl.store(q_ptr + rows[:, None] * stride_qm + rk[None, :], c.to(tl.int8), mask=mmask[:, None])
        else:
            tl.store(q_ptr + rows[:, None] * stride_qm + rk[None, :], c.to(tl.float8e4nv), mask=mmask[:, None])
    if PAD_GROUP:  # noqa: SIM102  (a constexpr test, then a runtime one: Triton keeps them apart)
        if split == tl.num_programs(1) - 1:
            tl.store(s_ptr + rows * stride_sm + n_groups * stride_sg, tl.zeros([BLOCK_M], dtype=tl.float32), mask=mmask)
    if HAS_LR:
        tl.store(
            d_ptr + split * stride_ds + rows[:, None] * stride_dm + rr[None, :], down,
            mask=mmask[:, None] & (rr[None, :] < R),
        )  # fmt: skip


def rows_config(k: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_K, num_warps, one_pass) of :func:`_act_rows_kernel` for rows of K columns:
    the whole row in registers up to :data:`ONE_PASS_MAX_K` (about 32 fp32 per thread)."""
    bk = max(triton.next_power_of_2(k), 16)
    if bk <= ONE_PASS_MAX_K:
        bm = max(1, min(8, 4096 // bk))
        return bm, bk, min(16, max(4, bm * bk // 1024)), True
    return 1, 4096, 8, False


def groups_config(m: int, groups: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, splits, groups_per_split) of :func:`_act_groups_kernel`: enough programs for
    about four per SM, splitting K when the row blocks alone are too few (FLUX: 4608 tokens
    -> 144 row blocks x 4 splits)."""
    bm = 16 if m <= 16 else 32
    blocks = triton.cdiv(m, bm)
    splits = 1
    while splits < MAX_SPLITS and blocks * splits < 4 * sms and splits * 2 <= groups:
        splits *= 2
    per = triton.cdiv(groups, splits)
    return bm, triton.cdiv(groups, per), per
