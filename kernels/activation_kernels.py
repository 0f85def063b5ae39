"""Activation quantization kernels (Triton): per-token int8 / FP8, and the fused SVDQuant input
stage (smooth -> per-group int4 codes, packed, + low-rank down-projection) that reads x once.

Why a separate kernel rather than fusing into the GEMM: a per-token scale needs the amax of the
whole row before the first code can be produced, while a GEMM tile sees only BLOCK_K columns at
a time; quantizing once also means every N-tile of the GEMM reads 1 (or 0.5) byte per input
element instead of 2. The rows kernel makes two passes over a row (amax, then codes) so it works
for any K; the group kernel needs only one pass because a group fits in one tile.

Rounding matches the torch reference bit for bit: IEEE division (``tl.math.div_rn``, not
Triton's default approximate fp32 division), ties to even (:func:`round_half_even`), E4M3 via
:func:`e4m3_grid`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.formats.floating import FP_MAX
from diffq.kernels.autotune import is_interpreted
from diffq.kernels.tl_helpers import SCALE_MIN, e4m3_grid, pack_int4, round_half_even


@triton.jit
def _act_rows_kernel(
    x_ptr, smooth_ptr, static_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x [M, K] (fp16/bf16/fp32) -> codes [M, K] (int8 or fp8e4nv), scale fp32 [M]."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rows = rm.to(tl.int64)
    if STATIC:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            x = x.to(tl.float32)
            if HAS_SMOOTH:
                sm = tl.load(smooth_ptr + rk, mask=kmask, other=1.0).to(tl.float32)
                x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, BLOCK_K]))
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl.math.div_rn(amax, tl.full([BLOCK_M], QMAX, tl.float32))
    scale = tl.maximum(scale, SCALE_MIN)
    tl.store(s_ptr + rm, scale, mask=mmask)
    scale2 = tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K])
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        m2 = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + rk, mask=kmask, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, BLOCK_K]))
        y = tl.math.div_rn(x, scale2)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if FP8:
            q = e4m3_grid(y).to(tl.float8e4nv)
        else:
            q = round_half_even(y).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * stride_qm + rk[None, :], q, mask=m2)


@triton.jit
def _act_groups_lowrank_kernel(
    x_ptr, smooth_ptr, static_ptr, l1_ptr, q_ptr, s_ptr, d_ptr,
    M, K, R, stride_xm, stride_qm, stride_sm, stride_l1k, stride_dm, static_stride,
    G: tl.constexpr, QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr,
    HAS_LR: tl.constexpr, LR_F32: tl.constexpr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):  # fmt: skip
    """x [M, K] -> packed int4 codes uint8 [M, K//2], group scales fp32 [M, K//G],
    and (HAS_LR) down = (x / smooth) @ l1, fp32 [M, R]; x is read once, one group per step."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rows = rm.to(tl.int64)
    rg = tl.arange(0, G)
    rh = tl.arange(0, G // 2)
    rr = tl.arange(0, R_PAD)
    down = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for g in range(K // G):
        rk = g * G + rg
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + rk).to(tl.float32)
            x = tl.math.div_rn(x, tl.broadcast_to(sm[None, :], [BLOCK_M, G]))
        if HAS_LR:
            l1 = tl.load(l1_ptr + rk[:, None].to(tl.int64) * stride_l1k + rr[None, :], mask=rr[None, :] < R, other=0.0)
            if LR_F32:
                down = tl.dot(x, l1.to(tl.float32), down, input_precision="ieee")
            else:
                down = tl.dot(x.to(l1.dtype), l1, down)
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr + g * static_stride).to(tl.float32)
        else:
            amax = tl.max(tl.abs(x), axis=1)
            scale = tl.math.div_rn(amax, tl.full([BLOCK_M], QMAX, tl.float32))
        scale = tl.maximum(scale, SCALE_MIN)
        tl.store(s_ptr + rows * stride_sm + g, scale, mask=mmask)
        y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, G]))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        c = round_half_even(y).to(tl.int32)
        packed = pack_int4(c, BLOCK_M, G)
        tl.store(q_ptr + rows[:, None] * stride_qm + (g * (G // 2) + rh)[None, :], packed, mask=mmask[:, None])
    if HAS_LR:
        tl.store(d_ptr + rows[:, None] * stride_dm + rr[None, :], down, mask=mmask[:, None] & (rr[None, :] < R))


def quantize_rows(
    x2: torch.Tensor,
    *,
    fmt: str,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization on the Triton path. x2 [M, K] contiguous -> (codes [M, K] int8 or
    float8_e4m3fn, scale fp32 [M, 1]). ``fmt`` is "int8" or "fp8"."""
    m, k = x2.shape
    fp8 = fmt == "fp8"
    codes = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty(m, 1, device=x2.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    if is_interpreted(_act_rows_kernel):
        block_m, block_k, warps = 64, min(256, triton.next_power_of_2(k)), 4
    else:
        block_m, block_k = 4, min(2048, max(triton.next_power_of_2(k), 16))
        warps = 8 if block_k >= 1024 else 4
    grid = (triton.cdiv(m, block_m),)
    _act_rows_kernel[grid](
        x2, smooth if smooth is not None else x2, act_scale if act_scale is not None else x2, codes, scale,
        m, k, x2.stride(0), codes.stride(0),
        QMAX=FP_MAX["fp8_e4m3"] if fp8 else 127.0, FP8=fp8, HAS_SMOOTH=smooth is not None, STATIC=act_scale is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return codes, scale


def quantize_groups_lowrank(
    x2: torch.Tensor,
    group_size: int,
    *,
    lr_down: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused SVDQuant input stage on the Triton path (group_size a power of two >= 16).

    x2 [M, K] contiguous -> (packed int4 uint8 [M, K//2], scale fp32 [M, K//G], down fp32 [M, r]
    or None). ``act_scale``: numel 1 or K//G static scales.
    """
    m, k = x2.shape
    groups = k // group_size
    dev = x2.device
    packed = torch.empty(m, k // 2, device=dev, dtype=torch.uint8)
    scale = torch.empty(m, groups, device=dev, dtype=torch.float32)
    r = 0 if lr_down is None else lr_down.shape[1]
    down = torch.empty(m, r, device=dev, dtype=torch.float32) if lr_down is not None else None
    if m == 0:
        return packed, scale, down
    interp = is_interpreted(_act_groups_lowrank_kernel)
    block_m = 64 if interp else (16 if m <= 16 else 32)
    r_pad = max(16, triton.next_power_of_2(max(r, 1)))
    lr_f32 = interp or (lr_down is not None and lr_down.dtype == torch.float32)
    grid = (triton.cdiv(m, block_m),)
    _act_groups_lowrank_kernel[grid](
        x2, smooth if smooth is not None else x2, act_scale if act_scale is not None else x2,
        lr_down if lr_down is not None else x2, packed, scale, down if down is not None else scale,
        m, k, r, x2.stride(0), packed.stride(0), scale.stride(0),
        lr_down.stride(0) if lr_down is not None else 0, down.stride(0) if down is not None else 0,
        0 if act_scale is None or act_scale.numel() == 1 else 1,
        G=group_size, QMAX=7.0, HAS_SMOOTH=smooth is not None, STATIC=act_scale is not None,
        HAS_LR=lr_down is not None, LR_F32=lr_f32, BLOCK_M=block_m, R_PAD=r_pad, num_warps=4,
    )  # fmt: skip
    return packed, scale, down
