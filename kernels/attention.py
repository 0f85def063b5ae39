"""Quantized flash attention (Triton): INT8/INT4 Q·Kᵀ with smoothed K, FP8 E4M3 (or INT8, or fp16) P·V,
fp32 accumulation, online softmax; the quantization is fused into the kernel.

One program per (``block`` query rows, batch x head). It loads its Q tile once, quantizes it
(its own block scale, or the per-head scale) and then walks the keys ``block`` at a time: load
the K tile, subtract K's mean (smoothing), quantize it, integer MMA ``codes_q · codes_kᵀ -> int32``,
rescale to base-2 logits, add the mask, take the block's row max ``m_blk``, quantize
``PMAX · 2^(S - m_blk)`` to E4M3 / INT8 and V (per-channel scales from the prologue), one 8-bit
MMA ``P · V`` that starts from zero (so the tensor core only sums one block of keys, what
SageAttention2 calls two-level accumulation: Hopper's FP8 MMA accumulates in reduced precision),
then the fp32 online-softmax update ``acc = acc · 2^(m_old - m_new) + PV · 2^(m_blk - m_new)``
(and the same for the row sum of the P codes). The epilogue divides by the row sum and multiplies
by the V scales. The math, and the torch reference this kernel is tested against, are in
:mod:`diffq.kernels.attention_reference`; K's mean and V's per-channel scales (one reduction over
the tokens each) are computed there in torch before the launch.

Tiles: ``BLOCK_M = BLOCK_N = fmt.block`` (they are the quantization blocks), head dims padded to a
power of two >= 32 (masked). Needs sm_80+ (INT8 MMA); E4M3 P·V uses the FP8 MMA on sm_89+ and
fp16 operands holding the same E4M3 values on sm_80 (FP8_MMA=False: identical products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.errors import DiffqError, ShapeError
from diffq.kernels.attention_reference import (
    LOG2E,
    M_FLOOR,
    AttnFormat,
    additive_mask,
    check_operands,
    prologue,
)
from diffq.kernels.tl_helpers import SCALE_MIN, e4m3_grid, round_half_even, to_output

#: the kernel's INT8 MMA needs Ampere; FP8 P·V runs on the FP8 MMA from Ada / Hopper on
MIN_CAPABILITY = (8, 0)
FP8_MMA_CAPABILITY = (8, 9)
#: P·V format -> the kernel's PV_MODE
PV_MODES = {"int8": 0, "fp8": 1, "fp16": 2}
_LOG2E = tl.constexpr(LOG2E)
_M_FLOOR = tl.constexpr(M_FLOOR)


class AttentionKernelUnavailable(DiffqError, RuntimeError):
    """The Triton attention kernel cannot run here (no GPU, too old a GPU, no Triton)."""


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr):
    """fp32 x / scale -> symmetric integer codes in [-QMAX, QMAX] (int8), half to even."""
    return round_half_even(tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)).to(tl.int8)


@triton.jit
def _block_scale(x, QMAX: tl.constexpr):
    """One scale for a whole fp32 tile: max(amax / QMAX, SCALE_MIN)."""
    return tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / QMAX, SCALE_MIN)


@triton.jit
def _quant_attn_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, vs_ptr, qs_ptr, ks_ptr, mask_ptr, o_ptr,
    H, M, N, D, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ob, stride_oh, stride_om,
    QMAX: tl.constexpr, PV_MODE: tl.constexpr, SMOOTH_K: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_MASK: tl.constexpr, FP8_MMA: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """q [B, H, M, D], k / v [B, H, N, D] (unit stride on D), km / vs fp32 [B*H, D],
    qs / ks fp32 [B*H] (PER_HEAD), mask fp32 broadcast view [B, H, M, N] -> o [B, H, M, D].

    qk_scale = logit scale * log2(e). PV_MODE: 0 INT8 P and V, 1 E4M3, 2 fp16. FP8_MMA: multiply
    E4M3 P and V on the FP8 MMA (sm_89+), else as fp16 (every E4M3 value is an fp16 value: the
    same products, for Ampere)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, D_PAD)
    m_ok = rm < M
    d_ok = rd < D
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_off + rm.to(tl.int64)[:, None] * stride_qm + rd[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if PER_HEAD:
        sq = tl.load(qs_ptr + bh)
        sk = tl.load(ks_ptr + bh)
    else:
        sq = _block_scale(q, QMAX)
    qc = _codes(q, sq, QMAX)
    if SMOOTH_K:
        km = tl.load(km_ptr + bh * D + rd, mask=d_ok, other=0.0)
    vs = tl.load(vs_ptr + bh * D + rd, mask=d_ok, other=1.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m_base = mask_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + rm.to(tl.int64)[:, None] * stride_mm
    m_i = tl.full([BLOCK], _M_FLOOR, tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], tl.float32)
    for n0 in range(0, N, BLOCK):
        rn = n0 + tl.arange(0, BLOCK)
        n_ok = rn < N
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rn.to(tl.int64)[:, None] * stride_kn + rd[None, :], mask=kv_ok, other=0.0)
        k = k.to(tl.float32)
        if SMOOTH_K:
            k = tl.where(kv_ok, k - km[None, :], 0.0)
        if not PER_HEAD:
            sk = _block_scale(k, QMAX)
        kc = _codes(k, sk, QMAX)
        s = tl.dot(qc, tl.trans(kc), out_dtype=tl.int32).to(tl.float32) * (sq * sk * qk_scale)
        if HAS_MASK:
            bias = tl.load(m_base + rn.to(tl.int64)[None, :] * stride_mn, mask=m_ok[:, None] & n_ok[None, :],
                           other=0.0)
            s = s + bias.to(tl.float32) * _LOG2E
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_blk = tl.maximum(tl.max(s, 1), _M_FLOOR)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(m_blk - m_new)
        v = tl.load(v_base + rn.to(tl.int64)[:, None] * stride_vn + rd[None, :], mask=kv_ok, other=0.0)
        v = v.to(tl.float32) / vs[None, :]
        if PV_MODE == 1:
            p = e4m3_grid(448.0 * tl.exp2(s - m_blk[:, None]))
            vc = e4m3_grid(tl.minimum(tl.maximum(v, -448.0), 448.0))
            if FP8_MMA:
                pv = tl.dot(p.to(tl.float8e4nv), vc.to(tl.float8e4nv))
            else:
                pv = tl.dot(p.to(tl.float16), vc.to(tl.float16))
        elif PV_MODE == 2:
            p16 = tl.exp2(s - m_blk[:, None]).to(tl.float16)
            p = p16.to(tl.float32)
            pv = tl.dot(p16, tl.minimum(tl.maximum(v, -65504.0), 65504.0).to(tl.float16))
        else:
            p = round_half_even(127.0 * tl.exp2(s - m_blk[:, None]))
            vc = round_half_even(tl.minimum(tl.maximum(v, -127.0), 127.0))
            pv = tl.dot(p.to(tl.int8), vc.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
        acc = acc * alpha[:, None] + pv * w[:, None]
        l_i = l_i * alpha + tl.sum(p, 1) * w
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = (acc / l_i[:, None]) * vs[None, :]
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_ptr + o_off + rm.to(tl.int64)[:, None] * stride_om + rd[None, :],
             to_output(out, o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def is_interpreted() -> bool:
    """True when the kernel was decorated under ``TRITON_INTERPRET=1`` (numpy, on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_quant_attn_kernel, InterpretedFunction)


def kernel_unavailable_reason(fmt: AttnFormat, device: torch.device | str) -> str | None:
    """Why the Triton kernel cannot run ``fmt`` on ``device`` (None when it can)."""
    if is_interpreted():
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return f"the Triton attention kernel needs a CUDA tensor (got {device}); set TRITON_INTERPRET=1 on the CPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"the attention kernel needs compute capability >= 8.0 (INT8 MMA), this GPU is {cap[0]}.{cap[1]}"
    if fmt.block > 64 and cap < (9, 0):
        # 128 x 128 tiles spill ~35 KB per thread on sm_80 / sm_89 (benchmarks/attention_static.py)
        return f"block {fmt.block} spills registers on compute capability {cap[0]}.{cap[1]}; use attn_block=64"
    return None


def has_fp8_mma(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies E4M3 on its tensor cores (sm_89+; the interpreter: yes)."""
    if is_interpreted():
        return True
    return torch.cuda.get_device_capability(torch.device(device)) >= FP8_MMA_CAPABILITY


def launch_warps(block: int) -> int:
    """Warps per program (see benchmarks/attention_static.py for the register figures)."""
    return 4 if block <= 32 else 8


def head_pad(d: int) -> int:
    """The kernel's head-dim tile: the next power of two, at least 32 (the 8-bit MMA's K depth)."""
    return max(32, triton.next_power_of_2(d))


def quant_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: AttnFormat,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    fp8_mma: bool | None = None,
) -> torch.Tensor:
    """Launch the kernel: q [B, H, M, D], k / v [B, H, N, D], mask broadcastable to [B, H, M, N]
    (bool or additive) -> [B, H, M, D] in q.dtype. Same contract as
    :func:`diffq.kernels.attention_reference.attention_reference`.

    fp8_mma: multiply E4M3 P·V on the FP8 MMA (default: when the GPU has one) or as fp16 (Ampere);
    both give the same products."""
    check_operands(q, k, v, mask)
    why = kernel_unavailable_reason(fmt, q.device)
    if why is not None:
        raise AttentionKernelUnavailable(why)
    b, h, m, d = q.shape
    n = k.shape[2]
    if d > 256:
        raise ShapeError(f"the Triton attention kernel takes head dims up to 256, got {d}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pro = prologue(q, k, v, fmt)
    add = additive_mask(mask)
    mview = None if add is None else torch.broadcast_to(add, (b, h, m, n))
    o = torch.empty(b, h, m, d, device=q.device, dtype=q.dtype)
    vs = pro.v_scale
    zero = vs  # any fp32 tensor for the pointers a variant does not read
    mstrides = (0, 0, 0, 0) if mview is None else mview.stride()
    grid = (triton.cdiv(m, fmt.block), b * h)
    _quant_attn_kernel[grid](
        q, k, v, pro.k_mean if pro.k_mean is not None else zero, vs,
        pro.q_scale if pro.q_scale is not None else zero, pro.k_scale if pro.k_scale is not None else zero,
        mview if mview is not None else zero, o,
        h, m, n, d, float((d**-0.5 if scale is None else scale) * LOG2E),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstrides, o.stride(0), o.stride(1), o.stride(2),
        QMAX=fmt.qmax, PV_MODE=PV_MODES[fmt.pv], SMOOTH_K=fmt.smooth_k, PER_HEAD=fmt.granularity == "head",
        HAS_MASK=mview is not None, FP8_MMA=has_fp8_mma(q.device) if fp8_mma is None else fp8_mma,
        BLOCK=fmt.block, D_PAD=head_pad(d),
        num_warps=launch_warps(fmt.block), num_stages=2,
    )  # fmt: skip
    return o
