"""Kernel launches of the FP4 plans (:class:`diffq.kernels.fp4_dispatch.Fp4Plan`; this module
never imports fp4_dispatch: no cycle).

Per call: allocate the outputs (and, for NVFP4, a zeroed int32 [1] for the abs-max), pick the
tile (a rule on M and N), launch. No ``.item()``, no host synchronisation, no data-dependent
Python branch: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton

from diffq.kernels import fp4_interp
from diffq.kernels.autotune import is_interpreted
from diffq.kernels.fp4_config import FP4_FORMATS, INTERPRETER_TILES, pick_fp4_tile
from diffq.kernels.fp4_gemm import CHUNK, _fp4_act_kernel, _fp4_amax_kernel, _fp4_gemm_kernel, act_config

INTERP = is_interpreted(_fp4_gemm_kernel)
if INTERP:
    fp4_interp.install()


def _sms(device: torch.device) -> int:
    return 1 if INTERP or device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def quantize(
    fmt: str, x2: torch.Tensor, *, smooth: torch.Tensor | None = None, lr_down: torch.Tensor | None = None,
    amax_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """x2 [M, K] contiguous -> (codes uint8 [M, K/2], stored scales [M, K/B], NVFP4 abs-max bits
    int32 [1] or None, down partials fp32 [splits, M, r] or None, splits)."""
    m, k = x2.shape
    b = FP4_FORMATS[fmt][0]
    nv = fmt == "nvfp4"
    dev = x2.device
    xq = torch.empty(m, k // 2, device=dev, dtype=torch.uint8)
    xs = torch.empty(m, k // b, device=dev, dtype=torch.float8_e4m3fn if nv else torch.uint8)
    if nv and amax_bits is None:
        amax_bits = torch.zeros(1, device=dev, dtype=torch.int32)
        computed = True
    else:
        computed = False
    r = 0 if lr_down is None else lr_down.shape[1]
    if m == 0:
        return xq, xs, amax_bits, None if lr_down is None else torch.zeros(1, 0, r, device=dev), 1
    chunks = triton.cdiv(k, CHUNK)
    bm, splits, per = act_config(m, chunks, _sms(dev))
    if INTERP:
        bm = 64 if m > 16 else 16
    sm = smooth if smooth is not None else xs
    if computed:
        _fp4_amax_kernel[(triton.cdiv(m, bm), splits)](
            x2, sm, amax_bits, m, k, x2.stride(0), per, HAS_SMOOTH=smooth is not None, BLOCK_M=bm, CB=CHUNK,
            num_warps=4,
        )  # fmt: skip
    down = torch.empty(splits, m, r, device=dev, dtype=torch.float32) if lr_down is not None else None
    _fp4_act_kernel[(triton.cdiv(m, bm), splits)](
        x2, sm, amax_bits if nv else xq, lr_down if lr_down is not None else xq, xq, xs, down if down is not None else xq,
        m, k, r, x2.stride(0), xq.stride(0), xs.stride(0), lr_down.stride(0) if lr_down is not None else 0,
        down.stride(0) if down is not None else 0, down.stride(1) if down is not None else 0, per,
        B=b, NV=nv, HAS_SMOOTH=smooth is not None, HAS_LR=lr_down is not None,
        LR_F32=INTERP or (lr_down is not None and lr_down.dtype == torch.float32), BLOCK_M=bm, CB=CHUNK,
        R_PAD=_r_pad(r), num_warps=4,
    )  # fmt: skip
    return xq, xs, amax_bits, down, splits


def gemm(plan, inputs: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """The FP4 GEMM on :func:`quantize`'s outputs -> y [M, N] in ``out_dtype``."""
    xq, xs, amax_bits, down, splits = inputs
    m = xq.shape[0]
    y = torch.empty(m, plan.n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    nv = plan.fmt == "nvfp4"
    tile = INTERPRETER_TILES[plan.fmt] if INTERP else pick_fp4_tile(plan.family, m, plan.n, out_dtype == torch.float32)
    branch = down is not None and plan.lr_up is not None
    # fp32 low-rank on a GPU: added below in torch (exact fp32; see _fp4_gemm_kernel's LR_F32)
    has_lr = branch and (INTERP or plan.lr_up.dtype != torch.float32)
    r = down.shape[2] if has_lr else 0
    dummy = plan.ws
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(plan.n, tile.block_n),)
    _fp4_gemm_kernel[grid](
        xq, xs, plan.w, plan.ws, amax_bits if nv else dummy, plan.wg if nv else dummy,
        down if has_lr else dummy, plan.lr_up if has_lr else dummy, plan.bias if plan.bias is not None else dummy, y,
        m, plan.n, plan.k, r, xq.stride(0), xs.stride(0), plan.w.stride(0), plan.ws.stride(0),
        down.stride(0) if has_lr else 0, down.stride(1) if has_lr else 0, plan.lr_up.stride(0) if has_lr else 0,
        y.stride(0),
        B=plan.block, NV=nv, EVEN_K=plan.k % tile.block_k == 0, HAS_LR=has_lr,
        LR_F32=INTERP, R_PAD=_r_pad(r), SPLITS=splits, HAS_BIAS=plan.bias is not None, **tile.launch_meta(),
    )  # fmt: skip
    if branch and not has_lr:
        y += down.sum(0) @ plan.lr_up
    return y


def run(plan, x2: torch.Tensor, amax_bits: torch.Tensor | None = None) -> torch.Tensor:
    """The layer: quantize x2 [M, K] (+ down-project) and run the GEMM -> y [M, N] in x2.dtype."""
    inputs = quantize(plan.fmt, x2, smooth=plan.smooth, lr_down=plan.lr_down if plan.lr_up is not None else None,
                      amax_bits=amax_bits)  # fmt: skip
    return gemm(plan, inputs, x2.dtype)
