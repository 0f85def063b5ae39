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
NVFP4 (E2M1, group 16, E4M3 + global)  NVFP4, dynamic, no split segments     nvfp4 (+ low-rank fused)
MXFP4 (E2M1, group 32, E8M0)           MXFP4, dynamic (segments of 32k)      mxfp4 (+ low-rank fused)
=====================================  ====================================  ==========

FP4 layers run :mod:`diffq.kernels.fp4_gemm` (``tl.dot_scaled``); an NVFP4 conv computes its
activation tensor scale on its whole input (as the module's reference does) before im2col.

Not fused (reference path): asymmetric (zero-point) weights, other FP4 block formats, NVFP4
activations with split-shortcut segments (one tensor scale per segment), per-tensor weight scales,
int4 group sizes other than 64 and 128,
non-fp32 activation scale storage, split-shortcut activation scales (except group scales that
tile every segment), and QuantConv2d with kh*kw > 1 under a *per-token*
activation format (im2col would turn a per-pixel scale into a per-patch one: different math),
shifted (``act_unsigned``) inputs, and centred (``act_center``) inputs except on linear layers with
int4 weights (w4a8 / w4a4: the means go through the W4A16 kernel, see :func:`_centered`).
Convs run through :func:`diffq.kernels.conv2d_via_gemm` (1x1: channels-last reshape; else
im2col). The low-rank branch of every kernel but w4a4 is added in torch.

The module decides *when* to call this: on CUDA inputs only, so the CPU path stays the torch
math bit for bit. The first CUDA forward of a module builds its launch plan (repacked int4
weights, group-major fp32 scales, ``1 / smooth``; see :mod:`diffq.kernels.repack`), cached on
the module per device; later forwards launch straight from it. :func:`kernel_route` says which
route a module takes (for reports).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffq.formats.floating import FP_MAX
from diffq.kernels import dispatch as kd
from diffq.kernels import fp4_dispatch as fd
from diffq.kernels import fp4_layers
from diffq.kernels.conv import conv2d_via_gemm, expand_channel_vector

FusedForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _weight_kind(module: nn.Module) -> str | None:
    spec = module.wspec
    fmt = fd.fp4_format(spec)
    if fmt is not None and getattr(module, "wzero", None) is None:
        return fmt if (getattr(module, "wscale_global", None) is not None) == (fmt == "nvfp4") else None
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
    if spec.scale_dtype != "fp32" or getattr(act, "shift", None) is not None:
        return None  # shifted (act_unsigned) inputs: no kernel adds the offset back
    if getattr(act, "center", False) and (hasattr(module, "kernel_size") or group is None):
        return None  # centred inputs: linear layers with int4 weights only (see _centered)
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
    """Which kernel computes ``module``'s math ("w4a16", "w8a8", "w4a8", "w4a4", "fp8", "nvfp4",
    "mxfp4") or None."""
    wk = _weight_kind(module)
    if wk is None:
        return None
    if wk in fd.FP4_FORMATS:
        return fp4_layers.fp4_kind(module, wk)
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


_CACHE = fp4_layers.PLAN_CACHE


def forget(module: nn.Module) -> None:
    """Drop the module's kernel plans (repacked weights); the next CUDA forward rebuilds them.
    Needed only after editing the module's weights, scales, bias, smoothing or low-rank tensors
    in place (replaced tensors are noticed by the plan cache itself)."""
    module.__dict__.pop(_CACHE, None)
    module.__dict__.pop("_diffq_fused", None)


_sources = fp4_layers.plan_sources


def _plan(module: nn.Module, kind: str, device: torch.device, *, means: bool = False) -> kd.LinearPlan:
    """The module's launch plan on ``device``, built once (repacked weights, group-major scales,
    1 / smooth, fp32 bias) and cached on the module per device. Rebuilt when one of the module's
    tensors was replaced (``set_lowrank``, LoRA fusion, ``load_state_dict`` into new tensors):
    six identity comparisons per call. In-place edits of the same tensors need :func:`forget`.
    ``means``: the W4A16 plan of a centred layer's mean rows instead (no bias; :func:`_center_rows`),
    cached beside the main one."""
    cache = module.__dict__.setdefault(_CACHE, {})
    key = (device, "means") if means else device
    hit = cache.get(key)
    src = _sources(module)
    if hit is not None and all(a is b for a, b in zip(hit[0], src)):
        return hit[1]
    group = module.wspec.group_size if kind in ("w4a16", "w4a8", "w4a4") else None
    if means:
        plan = kd.plan_for("w4a16", module.qweight, module.wscale, group)
    else:
        smooth = module.smooth
        if smooth is not None and hasattr(module, "kernel_size"):
            smooth = expand_channel_vector(smooth, module.kernel_size)
        plan = kd.plan_for(
            kind, module.qweight, module.wscale, group, bias=module.bias,
            smooth=None if kind == "w4a16" else smooth,
            lr_down=module.lr_down if kind == "w4a4" else None, lr_up=module.lr_up if kind == "w4a4" else None,
        )  # fmt: skip
        plan.smooth_k = smooth  # w4a16 smooths in torch (no activation quantization to fuse into)
    cache[key] = (src, plan)
    return plan


def _triton_rows(kind: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """(module, rows x [M, K'] (K' = kh*kw*Cin for convs)) -> y [M, N] on the module's plan.

    Per call: one dict lookup, the static scale (a tensor op, no sync), the launches, and the
    torch low-rank branch for kinds that do not fuse it."""

    def run(module: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        plan = _plan(module, kind, x2.device)
        x2 = x2.contiguous()
        dt = x2.dtype
        xs = x2
        if kind == "w4a16" and plan.smooth_k is not None:
            xs = (x2.float() / plan.smooth_k).to(dt)
        y = plan.run(xs, _static_scale(module, kind))
        if kind != "w4a4" and module.lr_down is not None:
            if kind != "w4a16" and module.smooth is not None:
                xs = (x2.float() / plan.smooth_k).to(dt)
            y = y + (xs @ module.lr_down.to(dt)) @ module.lr_up.to(dt)
        return y

    return run


def _reference_rows(kind: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The same math on the torch reference of :mod:`diffq.kernels.reference` (any device)."""

    def run(module: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        dt = x2.dtype
        smooth = module.smooth
        if smooth is not None and hasattr(module, "kernel_size"):
            smooth = expand_channel_vector(smooth, module.kernel_size)
        bias = None if module.bias is None else module.bias.to(dt)
        lr_down = None if module.lr_down is None else module.lr_down.to(dt)
        lr_up = None if module.lr_up is None else module.lr_up.to(dt)
        g = module.wspec.group_size if kind in ("w4a16", "w4a8", "w4a4") else None
        if kind == "w4a4":
            return kd.w4a4_linear(
                x2, module.qweight, module.wscale, g, bias, lr_down=lr_down, lr_up=lr_up, smooth=smooth,
                backend="reference",
            )  # fmt: skip
        act_scale = _static_scale(module, kind)
        xs = x2 if smooth is None else (x2.float() / smooth).to(dt)
        if kind == "w4a16":
            y = kd.w4a16_linear(xs, module.qweight, module.wscale, g, bias, backend="reference")
        elif kind == "w8a8":
            y = kd.w8a8_linear(x2, module.qweight, module.wscale, bias, act_scale=act_scale, smooth=smooth,
                               backend="reference")  # fmt: skip
        elif kind == "w4a8":
            y = kd.w4a8_linear(x2, module.qweight, module.wscale, g, bias, act_scale=act_scale, smooth=smooth,
                               backend="reference")  # fmt: skip
        else:
            y = kd.fp8_linear(x2, module.qweight, module.wscale, bias, act_scale=act_scale, smooth=smooth,
                              backend="reference")  # fmt: skip
        if lr_down is not None:
            y = y + (xs @ lr_down) @ lr_up
        return y

    return run


def _center_rows(reference: bool) -> Callable[[nn.Module, torch.Tensor, torch.dtype], torch.Tensor]:
    """(module, per-sample channel means c [B, K] fp32, input dtype) -> c_s · (Wqᵀ + down · up)
    [B, N] fp32, with ``c_s = c / smooth`` in the input dtype: the exact (unquantized) part of a
    centred layer, on the W4A16 kernel (a second read of the int4 weight, B rows) or its reference.
    No bias: the main GEMM adds it."""

    def run(module: nn.Module, c: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        c_s = c if module.smooth is None else c / module.smooth
        c_s = c_s.to(dt)
        if reference:
            y = kd.w4a16_linear(c_s, module.qweight, module.wscale, module.wspec.group_size, None, backend="reference")
        else:
            y = _plan(module, "w4a16", c.device, means=True).run(c_s.contiguous())
        if module.lr_down is not None:
            y = y + (c_s @ module.lr_down.to(dt)) @ module.lr_up.to(dt)
        return y.float()

    return run


def _centered(linear: FusedForward, center_rows: Callable[[nn.Module, torch.Tensor, torch.dtype], torch.Tensor]) -> FusedForward:
    """A centred linear layer (``act.center``: the reference computes ``(Q(x_s - c) + c) · Wqᵀ`` with
    ``c`` each sample's per-channel mean of ``x_s = x / smooth`` over its tokens) on a kernel that
    knows nothing of centring. The layer is linear in its unquantized input, so
    ``y = kernel(x - c') + c'/smooth · (Wqᵀ + down · up)`` with ``c' = mean_tokens(x)``: the kernel
    smooths, quantizes and multiplies ``x - c'`` (its quantized input is ``Q(x_s - c)``), and the
    means go through the exact path (:func:`_center_rows`, B rows). Inputs without a token axis
    (``[M, K]``) are not centred, as in the reference. Traces without host syncs."""

    def run(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            return linear(mod, x)
        c = x.mean(dim=tuple(range(1, x.dim() - 1)), keepdim=True, dtype=torch.float32)  # [B, 1.., K]
        y = linear(mod, x - c.to(x.dtype))
        corr = center_rows(mod, c.reshape(x.shape[0], x.shape[-1]), x.dtype)  # [B, N]
        return y + corr.reshape(x.shape[0], *([1] * (x.dim() - 2)), -1).to(y.dtype)

    return run


def fused_forward(module: nn.Module, *, backend: str = "auto", device: torch.device | str | None = None) -> FusedForward | None:
    """``fn(module, x) -> y`` running ``module`` (QuantLinear / QuantConv2d) on a fused kernel, or None.

    backend: "auto" (the callable is only returned when Triton can run the kernel on ``device``,
    default: the module's device), "triton" (forced; on the CPU under ``TRITON_INTERPRET=1``) or
    "reference". The Triton callable builds the module's launch plan on first use (see
    :mod:`diffq.kernels.repack`) and then launches without per-call validation.
    """
    kind = kernel_kind(module)
    if kind is None:
        return None
    group = module.wspec.group_size if kind in ("w4a16", "w4a8", "w4a4") else None
    if backend not in ("auto", "triton", "reference"):
        raise kd.KernelUnavailableError(f"fused_forward: unknown backend {backend!r}")
    if backend == "auto":
        dev = torch.device(device) if device is not None else module.qweight.device
        if dev.type != "cuda" or kd.triton_unavailable_reason(kind, dev, group) is not None:
            return None
    elif backend == "triton":
        why = kd.triton_unavailable_reason(kind, torch.device(device) if device is not None else module.qweight.device, group)
        if why is not None:
            raise kd.KernelUnavailableError(f"fused_forward: backend='triton' cannot run: {why}")
    if kind in fd.FP4_FORMATS:
        rows = fp4_layers.fp4_rows(kind, backend)
    else:
        rows = _reference_rows(kind) if backend == "reference" else _triton_rows(kind)
    if not hasattr(module, "kernel_size"):
        n_out = module.out_features

        def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            return rows(mod, x.reshape(-1, x.shape[-1])).reshape(*lead, n_out)

        if getattr(module.act, "center", False):
            return _centered(linear, _center_rows(backend == "reference"))
        return linear

    nv_conv = kind == "nvfp4"

    def conv(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        amax = fp4_layers.input_amax(mod, x) if nv_conv else None
        y = conv2d_via_gemm(
            x, (lambda a: rows(mod, a, amax)) if nv_conv else (lambda a: rows(mod, a)),
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
    key = x.device
    fn = cache.get(key)
    if fn is None and key not in cache:
        fn = cache[key] = fused_forward(module, device=x.device)
    return fn


def kernel_route(module: nn.Module, capability: tuple[int, int] | None = None) -> str:
    """Which computation runs ``module``'s forward on a CUDA GPU of ``capability`` (default: the
    current CUDA device, else sm_90), for reports such as ``QuantSummary``:

    ``"triton w4a4 fp8-mma"``, ``"triton w8a8 int8-mma"``, ``"triton nvfp4 fp4-mma"`` (sm_100 /
    sm_120; ``bf16-mma`` below: Triton's dot_scaled emulation), ... or ``"reference (<why>)"`` when
    no kernel computes the module's quantization there. Pure function of the module's formats and
    the capability: no weights are touched."""
    kind = kernel_kind(module)
    if kind is None:
        wk = _weight_kind(module)
        if wk in fd.FP4_FORMATS:
            return f"reference ({fp4_layers.unfused_reason(module, wk)})"
        return "reference (no kernel computes this quantization)"
    if capability is None:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    cap = tuple(capability)
    if cap < kd.MIN_CAPABILITY[kind]:
        need = kd.MIN_CAPABILITY[kind]
        return f"reference ({kind} needs sm_{need[0]}{need[1]}+)"
    if kind in ("w4a16", "w4a8", "w4a4") and module.wspec.group_size not in kd.INT4_GROUPS:
        return f"reference (group size {module.wspec.group_size} not in {kd.INT4_GROUPS})"
    if kind in fd.FP4_FORMATS:
        return f"triton {kind} {fd.fp4_route(cap)}"
    route = {"w4a16": "f16-mma", "w8a8": "int8-mma", "fp8": "fp8-mma", "w4a8": "int8-mma"}.get(kind)
    if kind == "w4a4":
        route = f"{kd.w4a4_route(cap)}-mma"
    if getattr(module.act, "center", False):
        route += " centred (means on w4a16)"
    return f"triton {kind} {route}"
