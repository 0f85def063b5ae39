"""FP4 (NVFP4 / MXFP4) QuantLinear / QuantConv2d layers on the kernels of :mod:`diffq.kernels.fp4_gemm`:
which modules they compute exactly, their cached launch plans, and the row functions the layer
dispatcher (:mod:`diffq.kernels.layer_dispatch`) wraps for linears and convolutions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffq.kernels import fp4_dispatch as fd
from diffq.kernels import fp4_reference as ref4
from diffq.kernels.conv import expand_channel_vector

#: where a module keeps its launch plans (per device); ``layer_dispatch.forget`` drops it
PLAN_CACHE = "_diffq_kernels"


def plan_sources(module: nn.Module) -> tuple:
    """The module tensors a plan is derived from (compared by identity on each call)."""
    return (module.qweight, module.wscale, module.bias, module.smooth, module.lr_down, module.lr_up)


def unfused_reason(module: nn.Module, fmt: str) -> str | None:
    """Why the FP4 kernel does not compute a module with ``fmt`` weights (None: it does). It does
    when the activations are the same FP4 format, dynamic, and every block of the kernel is a block
    of the module's reference (conv: blocks inside one kernel tap; split-shortcut segments: MXFP4
    only, in whole blocks; NVFP4 would need one tensor scale per segment)."""
    act = module.act
    if act is None or act.static or fd.fp4_format(act.spec) != fmt:
        return f"{fmt} weights need dynamic {fmt} activations"
    if getattr(act, "shift", None) is not None:
        return "shifted (act_unsigned) activations"
    if getattr(act, "center", False):
        return "centered (act_center) activations"
    block = fd.FP4_FORMATS[fmt][0]
    if act.splits is not None and fmt == "nvfp4":
        return "NVFP4 split-shortcut activations: one tensor scale per segment"
    if act.splits is not None and any(s % block for s in act.splits):
        return f"split-shortcut segments {act.splits} not whole {block}-blocks"
    if hasattr(module, "in_channels") and module.in_channels % block:
        return f"conv input channels {module.in_channels} not a multiple of the {block}-block"
    return None


def fp4_kind(module: nn.Module, fmt: str) -> str | None:
    """``fmt`` when the FP4 kernel computes the module's quantization (:func:`unfused_reason`)."""
    return fmt if unfused_reason(module, fmt) is None else None


def _plan(module: nn.Module, fmt: str, device: torch.device) -> fd.Fp4Plan:
    """The FP4 launch plan, cached on the module per device like the other kinds' plans (the
    core's buffers are what the kernel reads: nothing is repacked); rebuilt when a source tensor
    was replaced."""
    cache = module.__dict__.setdefault(PLAN_CACHE, {})
    hit = cache.get(device)
    src = (*plan_sources(module), module.wscale_global)
    if hit is not None and all(a is b for a, b in zip(hit[0], src)):
        return hit[1]
    smooth = module.smooth
    if smooth is not None and hasattr(module, "kernel_size"):
        smooth = expand_channel_vector(smooth, module.kernel_size)
    plan = fd.plan_for_fp4(
        fmt, module.qweight, module.wscale, wscale_global=module.wscale_global, bias=module.bias, smooth=smooth,
        lr_down=module.lr_down, lr_up=module.lr_up,
    )  # fmt: skip
    cache[device] = (src, plan)
    return plan


def input_amax(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 [1]: abs-max of the module's smoothed input ``x / smooth.to(x.dtype)`` (a conv's NCHW
    input), the NVFP4 activation tensor scale's source, before im2col changes what a row covers."""
    if x.numel() == 0:
        return torch.zeros(1, device=x.device, dtype=torch.float32)
    xs = x if module.smooth is None else x / module.smooth.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    return xs.abs().amax().float().reshape(1)


def fp4_rows(fmt: str, backend: str) -> Callable[..., torch.Tensor]:
    """(module, rows x [M, K'], optional input abs-max fp32 [1]) -> y [M, N] on Triton or the reference."""

    def triton_rows(module: nn.Module, x2: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        plan = _plan(module, fmt, x2.device)
        return plan.run(x2.contiguous(), None if amax is None else amax.view(torch.int32))

    def reference_rows(module: nn.Module, x2: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        dt = x2.dtype
        smooth = module.smooth
        if smooth is not None and hasattr(module, "kernel_size"):
            smooth = expand_channel_vector(smooth, module.kernel_size)
        lr = {} if module.lr_down is None else {"lr_down": module.lr_down.to(dt), "lr_up": module.lr_up.to(dt)}
        return ref4.fp4_linear(
            x2, module.qweight, module.wscale, fmt, None if module.bias is None else module.bias.to(dt),
            wscale_global=module.wscale_global, smooth=smooth, act_global=None if amax is None else ref4.global_scale(amax),
            **lr,
        )  # fmt: skip

    return reference_rows if backend == "reference" else triton_rows
