"""Pick the fused kernel for a QuantLinear / QuantConv2d from its stored formats.

:func:`fused_forward` looks only at what the module stores (weight spec, activation quantizer,
smoothing, low-rank branch) and returns a callable ``fn(module, x) -> y`` that computes the
module's math on the Triton kernels, or None when no kernel computes *the same quantization*
(then the module keeps its torch reference path). Mapping (weight spec / activation spec):

=====================================  ====================================  ==========
int4 symmetric, group G (no zeros)     none (weight-only)                    w4a16
int8 symmetric, per channel            int8 per token (dynamic), or int8     w8a8
                                       per tensor (static, one segment)
int4 symmetric, group G                int8 per token / static per tensor    w4a8
int4 symmetric, group G                int4 group G (same G), dynamic        w4a4 (+ low-rank fused)
fp8_e4m3, per channel                  fp8_e4m3 per token / static tensor    fp8
=====================================  ====================================  ==========

Not fused (reference path): asymmetric (zero-point) and FP4 weights, per-tensor weight scales,
non-fp32 activation scale storage, split-shortcut activation scales (except group scales that
tile every segment), and QuantConv2d with kh*kw > 1 under a *per-token*
activation format (im2col would turn a per-pixel scale into a per-patch one: different math).
Convs run through :func:`diffq.kernels.conv2d_via_gemm` (1x1: channels-last reshape; else
im2col). The low-rank branch of every kernel but w4a4 is added in torch.

The module decides *when* to call this: on CUDA inputs only, so the CPU path stays the torch
math bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffq.formats.floating import FP_MAX
from diffq.kernels import dispatch as kd
from diffq.kernels.conv import conv2d_via_gemm, expand_channel_vector

FusedForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _weight_kind(module: nn.Module) -> str | None:
    spec = module.wspec
    if getattr(module, "wzero", None) is not None or getattr(module, "wscale_global", None) is not None:
        return None
    if spec.dtype == "int4" and spec.granularity == "group":
        return "int4g"
    if spec.dtype == "int8" and spec.granularity == "channel":
        return "int8ch"
    if spec.dtype == "fp8_e4m3" and spec.granularity == "channel":
        return "fp8ch"
    return None


def _act_kind(module: nn.Module, group: int | None) -> str | None:
    """'none', 'int8tok', 'fp8tok', 'int4g' or None (no kernel computes this quantizer)."""
    act = module.act
    if act is None:
        return "none"
    spec = act.spec
    if spec.scale_dtype != "fp32":
        return None
    if spec.dtype == "int4" and spec.granularity == "group" and spec.group_size == group and not act.static:
        if act.splits is not None and any(s % group for s in act.splits):
            return None
        return "int4g"
    if act.splits is not None:
        return None
    if spec.granularity == "token" and not act.static or spec.granularity == "tensor" and act.static:
        if spec.dtype == "int8":
            return "int8tok"
        if spec.dtype == "fp8_e4m3":
            return "fp8tok"
    return None


_KINDS = {
    ("int4g", "none"): "w4a16",
    ("int8ch", "int8tok"): "w8a8",
    ("int4g", "int8tok"): "w4a8",
    ("int4g", "int4g"): "w4a4",
    ("fp8ch", "fp8tok"): "fp8",
}
_QMAX = {"int8tok": 127.0, "fp8tok": FP_MAX["fp8_e4m3"]}


def kernel_kind(module: nn.Module) -> str | None:
    """Which kernel computes ``module``'s math ("w4a16", "w8a8", "w4a8", "w4a4", "fp8") or None."""
    wk = _weight_kind(module)
    if wk is None:
        return None
    group = module.wspec.group_size if wk == "int4g" else None
    ak = _act_kind(module, group)
    kind = _KINDS.get((wk, ak)) if ak is not None else None
    if kind is None:
        return None
    if getattr(module, "kernel_numel", 1) > 1 and ak in ("int8tok", "fp8tok"):
        return None  # im2col would make the per-pixel token scale a per-patch one
    if kind == "w4a4" and hasattr(module, "in_channels") and module.in_channels % group:
        return None  # activation groups must stay inside one kernel tap, as in the per-pixel reference
    return kind


def _static_scale(module: nn.Module, kind: str) -> torch.Tensor | None:
    """Static activation scale of the current timestep group (same rule as the core: amax / qmax)."""
    act = module.act
    if act is None or not act.static:
        return None
    qmax = _QMAX["fp8tok" if kind == "fp8" else "int8tok"]
    return act.current_amax().reshape(1).float() / qmax


def _linear_rows(kind: str, backend: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(module, rows x [M, K'] (K' = kh*kw*Cin for convs), expanded smooth [K']) -> y [M, N].

    The module is an argument, never captured, so a cached callable stays right for copies.
    """

    def run(module: nn.Module, x2: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
        dt = x2.dtype
        bias = None if module.bias is None else module.bias.to(dt)
        lr_down = None if module.lr_down is None else module.lr_down.to(dt)
        lr_up = None if module.lr_up is None else module.lr_up.to(dt)
        if kind == "w4a4":
            return kd.w4a4_linear(
                x2, module.qweight, module.wscale, module.wspec.group_size, bias,
                lr_down=lr_down, lr_up=lr_up, smooth=smooth, backend=backend,
            )  # fmt: skip
        act_scale = _static_scale(module, kind)
        if kind == "w4a16":
            xs = x2 if smooth is None else (x2.float() / smooth).to(dt)
            y = kd.w4a16_linear(xs, module.qweight, module.wscale, module.wspec.group_size, bias, backend=backend)
        elif kind == "w8a8":
            y = kd.w8a8_linear(x2, module.qweight, module.wscale, bias, act_scale=act_scale, smooth=smooth, backend=backend)
        elif kind == "w4a8":
            y = kd.w4a8_linear(
                x2, module.qweight, module.wscale, module.wspec.group_size, bias,
                act_scale=act_scale, smooth=smooth, backend=backend,
            )  # fmt: skip
        else:
            y = kd.fp8_linear(x2, module.qweight, module.wscale, bias, act_scale=act_scale, smooth=smooth, backend=backend)
        if lr_down is not None:
            xs = x2 if smooth is None else (x2.float() / smooth).to(dt)
            y = y + (xs @ lr_down) @ lr_up
        return y

    return run


def fused_forward(module: nn.Module, *, backend: str = "auto", device: torch.device | str | None = None) -> FusedForward | None:
    """``fn(module, x) -> y`` running ``module`` (QuantLinear / QuantConv2d) on a fused kernel, or None.

    backend: passed to the kernels ("auto", "triton", "reference"); with "auto" the callable is
    only returned when Triton can run the kernel on ``device`` (default: the module's device).
    """
    kind = kernel_kind(module)
    if kind is None:
        return None
    group = module.wspec.group_size if kind in ("w4a16", "w4a8", "w4a4") else None
    if backend == "auto":
        dev = torch.device(device) if device is not None else module.qweight.device
        if dev.type != "cuda" or kd.triton_unavailable_reason(kind, dev, group) is not None:
            return None
    rows = _linear_rows(kind, backend)
    if not hasattr(module, "kernel_size"):

        def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return rows(mod, x, mod.smooth)

        return linear

    def conv(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        smooth = None if mod.smooth is None else expand_channel_vector(mod.smooth, mod.kernel_size)
        y = conv2d_via_gemm(
            x, lambda a: rows(mod, a, smooth),
            kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
        )  # fmt: skip
        return y  # [B, N, Ho, Wo], channels-last strides (the GEMM's natural layout)

    return conv


def module_kernel(module: nn.Module, x: torch.Tensor) -> FusedForward | None:
    """The fused forward for ``module`` on ``x``'s device, cached per device (None on CPU tensors).

    This is what QuantLinear / QuantConv2d call from ``forward``; CPU inputs always return None
    so the CPU path stays the torch reference math.
    """
    if not x.is_cuda:
        return None
    cache = module.__dict__.setdefault("_diffq_fused", {})
    key = str(x.device)
    if key not in cache:
        cache[key] = fused_forward(module, device=x.device)
    return cache[key]
