"""Kernel launches of the launch plans (:class:`diffq.kernels.dispatch.LinearPlan`).

Every function here trusts its inputs (the plan was validated when it was built; x2 is [M, K]
contiguous on the plan's device) and does per call only: allocate outputs, one dict lookup for
the tile (:func:`diffq.kernels.autotune.pick_tile`, cached per shape bucket) and the launches.
No ``.item()``, no host synchronisation, no data-dependent Python branch.
"""

from __future__ import annotations

import torch
import triton

from diffq.formats.floating import FP_MAX
from diffq.kernels import activation_kernels as ak
from diffq.kernels.autotune import is_interpreted, launch, m_bucket, pick_tile
from diffq.kernels.row_scaled import _row_scaled_kernel
from diffq.kernels.w4a4_lowrank import _w4a4_kernel
from diffq.kernels.w4a8 import _w4a8_kernel
from diffq.kernels.w4a16 import _w4a16_kernel

INTERP = is_interpreted(_w4a16_kernel)
#: stored-scale factors of the W4A4 routes: int8 weights hold 16 * code, FP8 weights code * 2^-9
_U_FACTOR = {"int8-mma": 0.0625, "fp8-mma": 512.0}


def _tile(kind: str, plan, m: int, f32: bool = False):
    return None if INTERP else pick_tile(kind, plan.family, m_bucket(m), plan.n, plan.k, plan.group, f32)


def _block_k(kind: str, tile) -> int:
    from diffq.kernels.autotune import INTERPRETER_TILES

    return (tile or INTERPRETER_TILES[kind]).block_k


# ----------------------------------------------------------------------------- activations


def quantize_rows(
    x2: torch.Tensor, *, fmt: str, act_scale: torch.Tensor | None = None, inv_smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization: x2 [M, K] contiguous -> (codes [M, K] int8 or float8_e4m3fn,
    scale fp32 [M, 1]). ``inv_smooth``: fp32 [K] reciprocal of the smoothing vector."""
    m, k = x2.shape
    fp8 = fmt == "fp8"
    codes = torch.empty(m, k, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty(m, 1, device=x2.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    if INTERP:
        bm, bk, warps, one = 64, triton.next_power_of_2(k) if k <= 512 else 256, 4, k <= 512
    else:
        bm, bk, warps, one = ak.rows_config(k)
    ak._act_rows_kernel[(triton.cdiv(m, bm),)](
        x2, inv_smooth if inv_smooth is not None else x2, act_scale if act_scale is not None else scale, codes, scale,
        m, k, x2.stride(0), codes.stride(0),
        QMAX=FP_MAX["fp8_e4m3"] if fp8 else 127.0, FP8=fp8, HAS_SMOOTH=inv_smooth is not None,
        STATIC=act_scale is not None, ONE_PASS=one, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return codes, scale


def _compiled_cuda(device: torch.device) -> bool:
    """Whether kernels launched for ``device`` run compiled on a GPU (not in the interpreter)."""
    return device.type == "cuda" and not is_interpreted(_row_scaled_kernel)


def _sms(device: torch.device) -> int:
    """SM count of the GPU (1 in the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if _compiled_cuda(device) else 1


def _quantize_groups(
    x2: torch.Tensor, group_size: int, out: int, s: torch.Tensor, s_strides: tuple[int, int], s_factor: float,
    pad_group: bool, lr_down: torch.Tensor | None, inv_smooth: torch.Tensor | None, act_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Launch :func:`_act_groups_kernel`; returns (codes, down partials [splits, M, r] or None, splits)."""
    m, k = x2.shape
    groups = k // group_size
    dev = x2.device
    if out == 0:
        codes = torch.empty(m, k // 2, device=dev, dtype=torch.uint8)
    else:
        codes = torch.empty(m, k, device=dev, dtype=torch.int8 if out == 1 else torch.float8_e4m3fn)
    bm, splits, per = ak.groups_config(m, groups, 1 if INTERP else _sms(dev))
    if INTERP:
        bm = 64 if m > 16 else 16
    r = 0 if lr_down is None else lr_down.shape[1]
    down = torch.empty(splits, m, r, device=dev, dtype=torch.float32) if lr_down is not None else None
    lr_f32 = INTERP or (lr_down is not None and lr_down.dtype == torch.float32)
    ak._act_groups_kernel[(triton.cdiv(m, bm), splits)](
        x2, inv_smooth if inv_smooth is not None else s, act_scale if act_scale is not None else s,
        lr_down if lr_down is not None else s, codes, s, down if down is not None else s,
        m, k, r, x2.stride(0), codes.stride(0), s_strides[0], s_strides[1],
        lr_down.stride(0) if lr_down is not None else 0,
        down.stride(0) if down is not None else 0, down.stride(1) if down is not None else 0,
        0 if act_scale is None or act_scale.numel() == 1 else 1, per,
        G=group_size, HAS_SMOOTH=inv_smooth is not None, STATIC=act_scale is not None, HAS_LR=lr_down is not None,
        LR_F32=lr_f32, OUT=out, S_FACTOR=s_factor, PAD_GROUP=pad_group, BLOCK_M=bm,
        R_PAD=max(16, triton.next_power_of_2(max(r, 1))), num_warps=4,
    )  # fmt: skip
    return codes, down, splits


def quantize_groups_packed(
    x2: torch.Tensor, group_size: int, *, lr_down: torch.Tensor | None = None,
    inv_smooth: torch.Tensor | None = None, act_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The public SVDQuant input stage: (packed int4 [M, K//2], scales fp32 [M, K//G], down [M, r])."""
    m, k = x2.shape
    groups = k // group_size
    scale = torch.empty(m, groups, device=x2.device, dtype=torch.float32)
    if m == 0:
        packed = torch.empty(m, k // 2, device=x2.device, dtype=torch.uint8)
        down = None if lr_down is None else torch.empty(m, lr_down.shape[1], device=x2.device)
        return packed, scale, down
    packed, parts, _ = _quantize_groups(x2, group_size, 0, scale, (groups, 1), 1.0, False, lr_down, inv_smooth, act_scale)
    return packed, scale, None if parts is None else parts.sum(0)


# ----------------------------------------------------------------------------- GEMMs
# Each kind is QUANT[kind](plan, x2, act_scale) -> the GEMM's inputs, then
# GEMM[kind](plan, inputs, out_dtype) -> y; RUN[kind] composes them (benchmarks time them apart).


def _quant_none(plan, x2: torch.Tensor, act_scale: torch.Tensor | None = None) -> tuple:
    return (x2,)


def _quant_rows(plan, x2: torch.Tensor, act_scale: torch.Tensor | None = None) -> tuple:
    fmt = "fp8" if plan.kind == "fp8" else "int8"
    return quantize_rows(x2, fmt=fmt, act_scale=act_scale, inv_smooth=plan.inv_smooth)


def _quant_w4a4(plan, x2: torch.Tensor, act_scale: torch.Tensor | None = None) -> tuple:
    m, k = x2.shape
    gp = plan.ws.shape[0]
    u = torch.empty(gp, m, device=x2.device, dtype=torch.float32)
    if m == 0:
        return torch.empty(0, k, device=x2.device, dtype=torch.int8), u, None, 1
    out = 2 if plan.route == "fp8-mma" else 1
    xq, down, splits = _quantize_groups(
        x2, plan.group, out, u, (1, m), _U_FACTOR[plan.route], gp > k // plan.group, plan.lr_down, plan.inv_smooth,
        act_scale,
    )  # fmt: skip
    return xq, u, down if plan.lr_up is not None else None, splits


def _gemm_row_scaled(plan, inputs: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    xq, xs = inputs
    fp8 = plan.kind == "fp8"
    m = xq.shape[0]
    y = torch.empty(m, plan.n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    tile = _tile(plan.kind, plan, m)
    bk = _block_k(plan.kind, tile)
    launch(
        _row_scaled_kernel, plan.kind, tile, plan.family,
        x_ptr=xq, xs_ptr=xs, w_ptr=plan.w, ws_ptr=plan.ws, b_ptr=plan.bias if plan.bias is not None else plan.ws,
        y_ptr=y, M=m, N=plan.n, K=plan.k, stride_xm=xq.stride(0), stride_wn=plan.w.stride(0), stride_ym=y.stride(0),
        INT_ACC=not fp8, HAS_BIAS=plan.bias is not None, EVEN_K=plan.k % bk == 0, IMPRECISE=bk if fp8 else None,
    )  # fmt: skip
    return y


def _gemm_w4a16(plan, inputs: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    (x2,) = inputs
    m = x2.shape[0]
    y = torch.empty(m, plan.n, device=x2.device, dtype=out_dtype)
    if m == 0:
        return y
    f32 = INTERP or x2.dtype == torch.float32
    tile = _tile("w4a16", plan, m, f32)
    launch(
        _w4a16_kernel, "w4a16", tile, plan.family,
        x_ptr=x2, w_ptr=plan.w, ws_ptr=plan.ws, b_ptr=plan.bias if plan.bias is not None else plan.ws, y_ptr=y,
        M=m, N=plan.n, K=plan.k, stride_xm=x2.stride(0), stride_wn=plan.w.stride(0), stride_ym=y.stride(0),
        G=plan.group, EVEN=plan.k % _block_k("w4a16", tile) == 0, HAS_BIAS=plan.bias is not None, F32_DOT=f32,
        ASM=not INTERP,
    )  # fmt: skip
    return y


def _sm80_style(plan) -> bool:
    """Pre-Hopper code path (the interpreter counts as pre-Hopper, like dispatch's device info)."""
    cap = torch.cuda.get_device_capability(plan.device) if _compiled_cuda(plan.device) else (0, 0)
    return cap < (9, 0)


def _gemm_w4a8(plan, inputs: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    xq, xs = inputs
    m = xq.shape[0]
    y = torch.empty(m, plan.n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    tile = _tile("w4a8", plan, m)
    launch(
        _w4a8_kernel, "w4a8", tile, plan.family,
        x_ptr=xq, xs_ptr=xs, w_ptr=plan.w, ws_ptr=plan.ws, b_ptr=plan.bias if plan.bias is not None else plan.ws,
        y_ptr=y, M=m, N=plan.n, K=plan.k, stride_xm=xq.stride(0), stride_wn=plan.w.stride(0), stride_ym=y.stride(0),
        G=plan.group, EVEN=plan.k % _block_k("w4a8", tile) == 0, HAS_BIAS=plan.bias is not None, ASM=not INTERP,
        MAGIC=_sm80_style(plan),
    )  # fmt: skip
    return y


def _gemm_w4a4(plan, inputs: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    xq, u, down, splits = inputs
    m = xq.shape[0]
    y = torch.empty(m, plan.n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    has_lr = down is not None
    lr_up = plan.lr_up if has_lr else None
    r = down.shape[2] if has_lr else 0
    tile = _tile("w4a4", plan, m)
    fp8 = plan.route == "fp8-mma"
    launch(
        _w4a4_kernel, "w4a4", tile, plan.family,
        x_ptr=xq, u_ptr=u, w_ptr=plan.w, ws_ptr=plan.ws, d_ptr=down if has_lr else u,
        l2_ptr=lr_up if has_lr else u, b_ptr=plan.bias if plan.bias is not None else plan.ws, y_ptr=y,
        M=m, N=plan.n, K=plan.k, R=r, stride_xm=xq.stride(0), stride_wn=plan.w.stride(0),
        stride_ds=down.stride(0) if has_lr else 0, stride_dm=down.stride(1) if has_lr else 0,
        stride_l2r=lr_up.stride(0) if has_lr else 0, stride_ym=y.stride(0),
        G=plan.group, EVEN=plan.k % _block_k("w4a4", tile) == 0, FP8_MMA=fp8, HAS_LR=has_lr,
        LR_F32=INTERP or (has_lr and lr_up.dtype == torch.float32), R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
        SPLITS=splits, HAS_BIAS=plan.bias is not None, ASM=not INTERP, MAGIC=(not fp8) and _sm80_style(plan),
    )  # fmt: skip
    return y


def w4a4_gemm_codes(plan, codes: torch.Tensor, xscale: torch.Tensor, down: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The W4A4 GEMM (int8 route plan) on int8 codes [M, K] and scales [M, K//G] (the public
    ``w4a4_gemm`` entry point; the layer path never materialises these)."""
    m = codes.shape[0]
    gp = plan.ws.shape[0]
    u = torch.zeros(gp, m, device=codes.device, dtype=torch.float32)
    u[: xscale.shape[1]] = (xscale * _U_FACTOR[plan.route]).t()
    parts = None if down is None else down.float().reshape(1, m, -1).contiguous()
    return _gemm_w4a4(plan, (codes.contiguous(), u, parts, 1), out_dtype)


QUANT = {"w4a16": _quant_none, "w8a8": _quant_rows, "fp8": _quant_rows, "w4a8": _quant_rows, "w4a4": _quant_w4a4}
GEMM = {"w4a16": _gemm_w4a16, "w8a8": _gemm_row_scaled, "fp8": _gemm_row_scaled, "w4a8": _gemm_w4a8, "w4a4": _gemm_w4a4}


def run(plan, x2: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The layer: quantize x2 [M, K] (if the kind does) and run the GEMM -> y [M, N] in x2.dtype."""
    return GEMM[plan.kind](plan, QUANT[plan.kind](plan, x2, act_scale), x2.dtype)
