"""Public GEMM entry points and the per-layer launch plans behind them.

``backend``: ``"auto"`` runs Triton when x is on a CUDA GPU that the kernel supports and the
shape fits its tiling (else the reference, silently: the result is the same math);
``"triton"`` forces Triton and raises when it cannot run (on the CPU it needs
``TRITON_INTERPRET=1`` set before diffq.kernels is imported: the tests do this);
``"reference"`` forces torch. :func:`fp8_linear` also takes ``"scaled_mm"`` (``torch._scaled_mm``).

Shapes (leading dims of x are flattened to M and restored on the output):
x [..., K] fp16/bf16/fp32 -> y [..., N] in x.dtype. Weights [N, K] int8 / float8_e4m3fn with
``wscale [N, 1]``, or packed int4 uint8 [N, K // 2] with ``wscale [N, K // group_size]``.

Host path. Each weight becomes a :class:`LinearPlan` once (validated, repacked for the kernel,
scales reordered, reciprocal of the smoothing vector, tile rule resolved per M bucket):
:func:`plan_for` builds it, the layer dispatcher caches it per module and device, and the
public functions below cache theirs per weight tensor (:func:`cached_plan`). ``plan.run(x2)``
does no validation, no host synchronisation and no data-dependent branching: it allocates the
outputs, looks the tile up in a dict and launches (CUDA-graph safe as long as autotuning is off,
the default).
"""

from __future__ import annotations

import functools
import os
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffq.errors import DiffqError, ShapeError
from diffq.kernels import reference as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: minimum CUDA capability per kernel kind (int8 / bf16 MMA: Ampere; FP8 MMA: Ada / Hopper)
MIN_CAPABILITY = {"w4a16": (8, 0), "w8a8": (8, 0), "w4a8": (8, 0), "w4a4": (8, 0), "fp8": (8, 9),
                  "nvfp4": (8, 9), "mxfp4": (8, 0)}  # FP4: native on sm_100 / sm_120 (fp4_dispatch)
#: group sizes the int4 Triton GEMMs take (their K loop pairs 64-element halves of 128-blocks)
INT4_GROUPS = (64, 128)


class KernelUnavailableError(DiffqError, RuntimeError):
    """A backend was requested that cannot run here (no GPU, too old a GPU, no Triton)."""


def w4a4_route(capability: tuple[int, int]) -> str:
    """How the W4A4 GEMM runs on a GPU of ``capability``: "fp8" (sm_89+: int4 codes as exact
    E4M3 values on the FP8 tensor cores, Hopper having no int4 MMA) or "int8" (sm_80/86: codes
    widened to int8). See :mod:`diffq.kernels.w4a4_lowrank`. ``DIFFQ_W4A4_ROUTE=int8`` forces the
    int8 route on sm_89+ (the FP8 route relies on the tensor core honouring E4M3 subnormals, which
    only a GPU run of ``pytest -m cuda`` checks); FP8 is never used below sm_89."""
    fp8_ok = tuple(capability) >= (8, 9)
    return "fp8" if fp8_ok and os.environ.get("DIFFQ_W4A4_ROUTE", "fp8") != "int8" else "int8"


# ----------------------------------------------------------------------------- validation
# ----------------------------------------------------------------------------- validation


def _name_shape(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _check_x(fn: str, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{fn}: x must be a tensor [..., K], got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{fn}: x must be float16/bfloat16/float32 [..., K], got {_name_shape(x)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ShapeError(f"{fn}: x must have shape [..., K] with K > 0, got {_name_shape(x)}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def _same_device(fn: str, x: torch.Tensor, name: str, t: torch.Tensor | None) -> None:
    """x: any tensor on the device the call runs on (only its device is read)."""
    if t is not None and t.device != x.device:
        raise ShapeError(f"{fn}: {name} is on {t.device} but x is on {x.device}; move both to one device")


def _check_group(fn: str, k: int, group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ShapeError(f"{fn}: group_size must be a positive int, got {group_size!r}")
    if group_size % 2:
        raise ShapeError(f"{fn}: group_size must be even (int4 codes pack two per byte), got {group_size}")
    if k % group_size:
        raise ShapeError(
            f"{fn}: K={k} is not divisible by group_size={group_size}; expected K = groups * {group_size}"
        )
    return k // group_size


def _check_int4_weight(
    fn: str, x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, group_size: int, k: int | None = None
) -> int:
    k = x2.shape[1] if k is None else k
    groups = _check_group(fn, k, group_size)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ShapeError(f"{fn}: qweight must be packed int4, uint8 [N, K//2] = [N, {k // 2}], got {_name_shape(qweight)}")
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != k:
        raise ShapeError(
            f"{fn}: packed width {qweight.shape[1]} != K//2 = {k // 2}; expected qweight [N, {k // 2}] for x [..., {k}]"
        )
    if wscale.dtype not in FLOAT_DTYPES or tuple(wscale.shape) != (n, groups):
        raise ShapeError(
            f"{fn}: wscale must be float [N, K//group_size] = [{n}, {groups}], got {_name_shape(wscale)}"
        )
    _same_device(fn, x2, "qweight", qweight)
    _same_device(fn, x2, "wscale", wscale)
    return n


def _check_8bit_weight(
    fn: str, x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, dtype: torch.dtype
) -> int:
    k = x2.shape[1]
    if qweight.dtype != dtype or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ShapeError(f"{fn}: qweight must be {dtype} [N, K] = [N, {k}], got {_name_shape(qweight)}")
    n = qweight.shape[0]
    if wscale.dtype not in FLOAT_DTYPES or wscale.numel() != n or wscale.dim() not in (1, 2) or wscale.shape[0] != n:
        raise ShapeError(f"{fn}: wscale must be float [N, 1] = [{n}, 1] (per output channel), got {_name_shape(wscale)}")
    _same_device(fn, x2, "qweight", qweight)
    _same_device(fn, x2, "wscale", wscale)
    return n


def _check_bias(fn: str, x2: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.dtype not in FLOAT_DTYPES or tuple(bias.shape) != (n,):
        raise ShapeError(f"{fn}: bias must be float [N] = [{n}], got {_name_shape(bias)}")
    _same_device(fn, x2, "bias", bias)
    return bias.contiguous()


def _check_act_scale(
    fn: str, x2: torch.Tensor, act_scale: torch.Tensor | None, groups: int | None = None
) -> torch.Tensor | None:
    if act_scale is None:
        return None
    if not isinstance(act_scale, torch.Tensor) or not act_scale.is_floating_point():
        raise ShapeError(f"{fn}: act_scale must be a float tensor (a scalar{' or [K//G]' if groups else ''})")
    ok = act_scale.numel() == 1 or (groups is not None and act_scale.numel() == groups and act_scale.dim() == 1)
    if not ok:
        want = "a scalar" if groups is None else f"a scalar or [K//group_size] = [{groups}]"
        raise ShapeError(f"{fn}: act_scale must be {want}, got {tuple(act_scale.shape)}")
    _same_device(fn, x2, "act_scale", act_scale)
    return act_scale.float().reshape(-1).contiguous()


def _check_smooth(fn: str, x2: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor | None:
    if smooth is None:
        return None
    k = x2.shape[1]
    if not smooth.is_floating_point() or tuple(smooth.shape) != (k,):
        raise ShapeError(f"{fn}: smooth must be float [K] = [{k}], got {_name_shape(smooth)}")
    _same_device(fn, x2, "smooth", smooth)
    return smooth.float().contiguous()


def _check_lowrank(
    fn: str, x2: torch.Tensor, lr_down: torch.Tensor | None, lr_up: torch.Tensor | None, n: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if lr_down is None and lr_up is None:
        return None, None
    k = x2.shape[1]
    if lr_down is None or (lr_up is None and n is not None):
        raise ShapeError(f"{fn}: lr_down [K, r] and lr_up [r, N] go together; got only one of them")
    if lr_down.dtype not in FLOAT_DTYPES or lr_down.dim() != 2 or lr_down.shape[0] != k or lr_down.shape[1] == 0:
        raise ShapeError(f"{fn}: lr_down must be float [K, r] = [{k}, r], got {_name_shape(lr_down)}")
    _same_device(fn, x2, "lr_down", lr_down)
    if lr_up is not None:
        r = lr_down.shape[1]
        if lr_up.dtype not in FLOAT_DTYPES or tuple(lr_up.shape) != (r, n):
            raise ShapeError(f"{fn}: lr_up must be float [r, N] = [{r}, {n}], got {_name_shape(lr_up)}")
        _same_device(fn, x2, "lr_up", lr_up)
        lr_up = lr_up.contiguous()
    return lr_down.contiguous(), lr_up



# ----------------------------------------------------------------------------- backend choice


@functools.lru_cache(maxsize=1)
def _triton_state() -> tuple[bool, bool, str]:
    """(importable, interpreted, why-not) for the Triton kernels."""
    try:
        from diffq.kernels.activation_kernels import _act_rows_kernel
        from diffq.kernels.autotune import is_interpreted
    except Exception as e:  # noqa: BLE001  (ImportError, or a Triton that cannot initialise)
        return False, False, f"Triton kernels cannot be imported ({type(e).__name__}: {e})"
    return True, is_interpreted(_act_rows_kernel), ""


def interpreted() -> bool:
    """True when the Triton kernels run under ``TRITON_INTERPRET=1``."""
    return _triton_state()[1]


def triton_unavailable_reason(kind: str, device: torch.device | str, group_size: int | None = None) -> str | None:
    """Why the Triton ``kind`` kernel cannot run on ``device`` (None when it can).

    kind: "w4a16", "w8a8", "w4a8", "w4a4", "fp8", "nvfp4" or "mxfp4". FP8 kernels (and NVFP4's E4M3
    scales) need sm_89+; they are never
    dispatched to older GPUs (sm_80 has no E4M3 MMA: Triton refuses to compile them there)."""
    ok, interp, why = _triton_state()
    if not ok:
        return why
    device = torch.device(device)
    if not interp:
        if device.type != "cuda":
            return f"Triton kernels need a CUDA tensor (got {device}); set TRITON_INTERPRET=1 to run them on the CPU"
        cap = torch.cuda.get_device_capability(device)
        need = MIN_CAPABILITY[kind]
        if cap < need:
            return f"{kind} needs compute capability >= {need[0]}.{need[1]}, this GPU is {cap[0]}.{cap[1]}"
    if kind in ("w4a16", "w4a8", "w4a4") and group_size is not None and group_size not in INT4_GROUPS:
        return f"the Triton {kind} kernel needs group_size in {INT4_GROUPS}, got {group_size}"
    return None


def _resolve(fn: str, kind: str, backend: str, x: torch.Tensor, group_size: int | None, extra: Sequence[str] = ()) -> str:
    allowed = ("auto", "triton", "reference", *extra)
    if backend not in allowed:
        raise KernelUnavailableError(f"{fn}: unknown backend {backend!r}; choose one of {', '.join(allowed)}")
    if backend in ("reference", *extra):
        return backend
    why = triton_unavailable_reason(kind, x.device, group_size)
    if backend == "auto":
        return "triton" if (x.is_cuda and why is None) else "reference"
    if why is not None:
        err = ShapeError if "group_size" in why else KernelUnavailableError
        raise err(f"{fn}: backend='triton' cannot run: {why}; use backend='reference' or 'auto'")
    return "triton"


def _restore(y2: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    return y2.reshape(*lead, y2.shape[-1])


# ----------------------------------------------------------------------------- launch plans


@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[str, tuple[int, int], int]:
    """(family, capability, SM count) of a CUDA device; the interpreter: ("interpreter", (0, 0), 1)."""
    if interpreted() or device.type != "cuda":
        return "interpreter", (0, 0), 1
    from diffq.kernels.autotune import family_of

    cap = torch.cuda.get_device_capability(device)
    return family_of(cap), cap, torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(eq=False)
class LinearPlan:
    """Everything a kernel launch of one layer needs that does not depend on the input.

    ``w``: the kernel's weight (int8 / E4M3 [N, K], or int4 split-half uint8 [N, Kp//2]);
    ``ws``: per-channel fp32 [N] or group-major fp32 [groups_padded, N]; ``inv_smooth``: fp32 [K]
    reciprocal of the smoothing vector; ``bias`` fp32 [N]; ``lr_down`` / ``lr_up`` as stored;
    ``route``: how the GEMM runs (see :func:`route_name`)."""

    kind: str
    route: str
    device: torch.device
    n: int
    k: int
    group: int | None
    w: torch.Tensor
    ws: torch.Tensor
    inv_smooth: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lr_down: torch.Tensor | None = None
    lr_up: torch.Tensor | None = None
    smooth_k: torch.Tensor | None = None  # the layer dispatcher's smoothing vector (K' long), for torch-side use

    @property
    def family(self) -> str:
        return _device_info(self.device)[0]

    def run(self, x2: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x2 [M, K] contiguous on the plan's device -> y [M, N] in x2.dtype (Triton)."""
        from diffq.kernels import launchers

        return launchers.run(self, x2, act_scale)


def route_name(plan: LinearPlan) -> str:
    """Human-readable kernel route, e.g. ``"triton w4a4 fp8-mma (sm_90)"``."""
    fam, cap, _ = _device_info(plan.device)
    where = "interpreter" if fam == "interpreter" else f"sm_{cap[0]}{cap[1]}"
    return f"triton {plan.kind} {plan.route} ({where})"


def plan_for(
    kind: str,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int | None = None,
    *,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    route: str | None = None,
    codes_in_range: bool | None = True,
) -> LinearPlan:
    """Build the launch plan of one weight on its device (no host sync; shapes are trusted here,
    the public functions validate first). ``codes_in_range``: int4 codes are within [-7, 7]
    (the core's symmetric format guarantees it); False sends W4A4 to the int8 route; None checks
    (one host sync, at build time: the functional API's validation)."""
    from diffq.kernels import repack

    dev = qweight.device
    _, cap, _ = _device_info(dev)
    n = qweight.shape[0]
    inv_smooth = None if smooth is None else ref.reciprocal(smooth).contiguous()
    b = None if bias is None else bias.float().contiguous()
    common = {"device": dev, "n": n, "inv_smooth": inv_smooth, "bias": b, "lr_down": lr_down, "lr_up": lr_up}
    if kind in ("w8a8", "fp8"):
        k = qweight.shape[1]
        return LinearPlan(kind, "int8-mma" if kind == "w8a8" else "fp8-mma", k=k, group=None, w=qweight.contiguous(), ws=wscale.float().reshape(-1).contiguous(),
                          **common)  # fmt: skip
    k = qweight.shape[1] * 2
    ws = repack.group_major_scales(wscale, k, group_size)
    if kind == "w4a4":
        if route is None:
            route = "int8" if cap == (0, 0) else w4a4_route(cap)
        if route == "fp8" and codes_in_range is None:
            codes_in_range = _codes_in_range(qweight)
        if route == "fp8" and not codes_in_range:
            route = "int8"
        w = repack.split_half_signmag(qweight, k) if route == "fp8" else repack.split_half(qweight, k)
        return LinearPlan(kind, f"{route}-mma", k=k, group=group_size, w=w, ws=ws, **common)
    return LinearPlan(kind, "int8-mma" if kind == "w4a8" else "f16-mma", k=k, group=group_size,
                      w=repack.split_half(qweight, k), ws=ws, **common)  # fmt: skip


_PLANS: OrderedDict = OrderedDict()
_PLAN_CAPACITY = 256


def cached_plan(kind: str, qweight: torch.Tensor, wscale: torch.Tensor, group_size: int | None, **kw) -> LinearPlan:
    """:func:`plan_for` memoised on the identity and version of the weight tensors and the
    identity of the other tensors (for the functional API; modules keep their plans themselves)."""
    tensors = tuple(t for _, t in sorted(kw.items()) if isinstance(t, torch.Tensor))
    plain = tuple((name, t) for name, t in sorted(kw.items()) if not isinstance(t, torch.Tensor))
    key = (kind, id(qweight), qweight._version, id(wscale), wscale._version, group_size, plain,
           tuple((id(t), t._version) for t in tensors))  # fmt: skip
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is qweight and hit[1]() is wscale and all(a is b for a, b in zip(hit[2], tensors)):
        _PLANS.move_to_end(key)
        return hit[3]
    plan = plan_for(kind, qweight, wscale, group_size, **kw)
    _PLANS[key] = (weakref.ref(qweight), weakref.ref(wscale), tensors, plan)
    while len(_PLANS) > _PLAN_CAPACITY:
        _PLANS.popitem(last=False)
    return plan


def _codes_in_range(qweight: torch.Tensor) -> bool:
    """Validation for the functional API (a host sync, outside the module hot path)."""
    from diffq.kernels.repack import fits_signmag

    return bool(fits_signmag(qweight))


# ----------------------------------------------------------------------------- public API


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight-only int4: x [..., K] (fp16/bf16/fp32) x packed qweight [N, K//2] with group scales
    wscale [N, K//group_size] -> [..., N] in x.dtype. No activation quantization."""
    fn = "w4a16_linear"
    x2, lead = _check_x(fn, x)
    n = _check_int4_weight(fn, x2, qweight, wscale, group_size)
    bias = _check_bias(fn, x2, bias, n)
    if _resolve(fn, "w4a16", backend, x2, group_size) == "reference":
        return _restore(ref.w4a16(x2, qweight, wscale, group_size, bias), lead)
    plan = cached_plan("w4a16", qweight, wscale, group_size, bias=bias)
    return _restore(plan.run(x2), lead)


def quantize_act_per_token(
    x: torch.Tensor,
    *,
    fmt: str = "int8",
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantization: x [..., K] -> (codes [M, K], scale fp32 [M, 1]), M = x.numel() // K.

    fmt "int8": codes int8 in [-127, 127], scale = amax / 127; fmt "fp8": float8_e4m3fn codes,
    scale = amax / 448. ``act_scale`` (scalar) replaces the dynamic scale; ``smooth`` [K]
    divides x first (as ``x * (1 / smooth)``). Both clamp the scale at 2^-32.
    """
    fn = "quantize_act_per_token"
    if fmt not in ("int8", "fp8"):
        raise ShapeError(f"{fn}: fmt must be 'int8' or 'fp8', got {fmt!r}")
    x2, _ = _check_x(fn, x)
    act_scale = _check_act_scale(fn, x2, act_scale)
    smooth = _check_smooth(fn, x2, smooth)
    kind = "fp8" if fmt == "fp8" else "w8a8"
    if _resolve(fn, kind, backend, x2, None) == "reference":
        if fmt == "fp8":
            return ref.quantize_act_fp8(x2, act_scale=act_scale, smooth=smooth)
        return ref.quantize_act_int(x2, 8, None, act_scale=act_scale, smooth=smooth)
    from diffq.kernels.launchers import quantize_rows

    return quantize_rows(x2, fmt=fmt, act_scale=act_scale, inv_smooth=None if smooth is None else ref.reciprocal(smooth))


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """int8 x int8: x [..., K] quantized per token (dynamic, or static scalar ``act_scale``;
    after ``x / smooth`` when given), int8 qweight [N, K] with wscale [N, 1] -> [..., N] x.dtype."""
    return _row_scaled_linear("w8a8_linear", "w8a8", x, qweight, wscale, bias, act_scale, smooth, backend)


def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """int4 weights (packed [N, K//2], group scales [N, K//group_size]) x int8 per-token
    activations -> [..., N] in x.dtype. Int math runs on int8 MMA (nibbles widened in registers)."""
    fn = "w4a8_linear"
    x2, lead = _check_x(fn, x)
    n = _check_int4_weight(fn, x2, qweight, wscale, group_size)
    bias = _check_bias(fn, x2, bias, n)
    act_scale = _check_act_scale(fn, x2, act_scale)
    smooth = _check_smooth(fn, x2, smooth)
    if _resolve(fn, "w4a8", backend, x2, group_size) == "reference":
        y = ref.w4a8(x2, qweight, wscale, group_size, bias, act_scale=act_scale, smooth=smooth)
        return _restore(y, lead)
    plan = cached_plan("w4a8", qweight, wscale, group_size, bias=bias, smooth=smooth)
    return _restore(plan.run(x2, act_scale), lead)


def quantize_act_lowrank(
    x: torch.Tensor,
    group_size: int,
    *,
    lr_down: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SVDQuant input stage, reading x once: x [..., K] -> (packed int4 codes uint8 [M, K//2],
    group scales fp32 [M, K//group_size], down = (x / smooth) @ lr_down fp32 [M, r] or None).

    ``act_scale``: scalar or [K//group_size] static scales (replace amax / 7).
    """
    fn = "quantize_act_lowrank"
    x2, _ = _check_x(fn, x)
    groups = _check_group(fn, x2.shape[1], group_size)
    act_scale = _check_act_scale(fn, x2, act_scale, groups)
    smooth = _check_smooth(fn, x2, smooth)
    lr_down, _ = _check_lowrank(fn, x2, lr_down, None, None)
    if _resolve(fn, "w4a4", backend, x2, group_size) == "reference":
        return ref.quantize_act_lowrank(x2, group_size, lr_down=lr_down, smooth=smooth, act_scale=act_scale)
    from diffq.kernels.launchers import quantize_groups_packed

    inv = None if smooth is None else ref.reciprocal(smooth)
    return quantize_groups_packed(x2, group_size, lr_down=lr_down, inv_smooth=inv, act_scale=act_scale)


def w4a4_gemm(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Main W4A4 GEMM on the output of :func:`quantize_act_lowrank`: packed xq uint8 [M, K//2],
    xscale [M, K//G], qweight uint8 [N, K//2], wscale [N, K//G], optional down [M, r] with
    lr_up [r, N] -> [M, N] in ``out_dtype``. (The layer path :func:`w4a4_linear` never packs
    the activations; this entry point widens them to int8 codes and runs the int8 route.)"""
    fn = "w4a4_gemm"
    if xq.dtype != torch.uint8 or xq.dim() != 2:
        raise ShapeError(f"{fn}: xq must be packed int4 uint8 [M, K//2], got {_name_shape(xq)}")
    m, k = xq.shape[0], xq.shape[1] * 2
    groups = _check_group(fn, k, group_size)
    if not xscale.is_floating_point() or tuple(xscale.shape) != (m, groups):
        raise ShapeError(f"{fn}: xscale must be float [M, K//group_size] = [{m}, {groups}], got {_name_shape(xscale)}")
    n = _check_int4_weight(fn, xq, qweight, wscale, group_size, k=k)
    bias = _check_bias(fn, xq, bias, n)
    if (down is None) != (lr_up is None):
        raise ShapeError(f"{fn}: down [M, r] and lr_up [r, N] go together; got only one of them")
    if down is not None:
        if down.dim() != 2 or down.shape[0] != m or tuple(lr_up.shape) != (down.shape[1], n):
            raise ShapeError(
                f"{fn}: expected down [M, r] = [{m}, r] and lr_up [r, {n}], got {tuple(down.shape)} and "
                f"{tuple(lr_up.shape)}"
            )
        _same_device(fn, xq, "down", down)
        _same_device(fn, xq, "lr_up", lr_up)
    if _resolve(fn, "w4a4", backend, xq, group_size) == "reference":
        return ref.w4a4_gemm(
            xq, xscale.float(), qweight, wscale, group_size, out_dtype=out_dtype, bias=bias, down=down, lr_up=lr_up
        )
    from diffq.formats import unpack_int4
    from diffq.kernels.launchers import w4a4_gemm_codes

    plan = cached_plan("w4a4", qweight, wscale, group_size, bias=bias, lr_up=lr_up, route="int8")
    return w4a4_gemm_codes(plan, unpack_int4(xq), xscale.float(), down, out_dtype)


def w4a4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    backend: str = "auto",
    route: str | None = None,
) -> torch.Tensor:
    """SVDQuant layer: ``Q4(x/s) · W4ᵀ + ((x/s) @ lr_down) @ lr_up + bias`` -> [..., N] in x.dtype.

    x [..., K]; qweight packed uint8 [N, K//2]; wscale [N, K//G]; activations quantized per
    (token, group) with the same group size G; lr_down [K, r], lr_up [r, N] (both or neither);
    smooth [K]; act_scale scalar or [K//G]. Two launches on the Triton path: the input kernel
    (reads x once: smooth, quantize, down-project, split over K) and the GEMM (low-rank up and
    bias in its epilogue). ``route``: force "fp8" or "int8" (default: :func:`w4a4_route`).
    """
    fn = "w4a4_linear"
    x2, lead = _check_x(fn, x)
    n = _check_int4_weight(fn, x2, qweight, wscale, group_size)
    bias = _check_bias(fn, x2, bias, n)
    act_scale = _check_act_scale(fn, x2, act_scale, x2.shape[1] // group_size)
    smooth = _check_smooth(fn, x2, smooth)
    lr_down, lr_up = _check_lowrank(fn, x2, lr_down, lr_up, n)
    if route not in (None, "fp8", "int8"):
        raise ShapeError(f"{fn}: route must be None, 'fp8' or 'int8', got {route!r}")
    if _resolve(fn, "w4a4", backend, x2, group_size) == "reference":
        y = ref.w4a4(
            x2, qweight, wscale, group_size, bias, lr_down=lr_down, lr_up=lr_up, smooth=smooth, act_scale=act_scale
        )
        return _restore(y, lead)
    plan = cached_plan(
        "w4a4", qweight, wscale, group_size, bias=bias, smooth=smooth, lr_down=lr_down, lr_up=lr_up, route=route,
        codes_in_range=None,
    )  # fmt: skip
    return _restore(plan.run(x2, act_scale), lead)


def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """E4M3 x E4M3: x [..., K] quantized per token to float8_e4m3fn (scale amax / 448), qweight
    float8_e4m3fn [N, K] with wscale fp32 [N, 1] -> [..., N] in x.dtype.

    backend "auto": Triton on sm_89+ GPUs, reference elsewhere; "scaled_mm": the activation
    kernel + ``torch._scaled_mm`` (cuBLASLt), which needs K, N multiples of 16 and a 16-bit x.
    """
    return _row_scaled_linear("fp8_linear", "fp8", x, qweight, wscale, bias, act_scale, smooth, backend)


def _row_scaled_linear(
    fn: str, kind: str, x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
    act_scale: torch.Tensor | None, smooth: torch.Tensor | None, backend: str,
) -> torch.Tensor:
    """The one body of :func:`w8a8_linear` (kind "w8a8") and :func:`fp8_linear` (kind "fp8"):
    per-token activations x per-channel weights, differing only in the 8-bit format."""
    fp8 = kind == "fp8"
    x2, lead = _check_x(fn, x)
    n = _check_8bit_weight(fn, x2, qweight, wscale, torch.float8_e4m3fn if fp8 else torch.int8)
    bias = _check_bias(fn, x2, bias, n)
    act_scale = _check_act_scale(fn, x2, act_scale)
    smooth = _check_smooth(fn, x2, smooth)
    choice = _resolve(fn, kind, backend, x2, None, extra=("scaled_mm",) if fp8 else ())
    if choice == "reference":
        reference = ref.fp8 if fp8 else ref.w8a8
        return _restore(reference(x2, qweight, wscale, bias, act_scale=act_scale, smooth=smooth), lead)
    if choice == "scaled_mm":
        if not x2.is_cuda:
            raise KernelUnavailableError(f"{fn}: backend='scaled_mm' needs a CUDA tensor, got {x2.device}")
        from diffq.kernels.launchers import quantize_rows
        from diffq.kernels.scaled_mm import fp8_scaled_mm

        inv = None if smooth is None else ref.reciprocal(smooth)
        xq, xs = quantize_rows(x2, fmt="fp8", act_scale=act_scale, inv_smooth=inv)
        return _restore(fp8_scaled_mm(xq, xs, qweight.contiguous(), wscale, bias, x2.dtype), lead)
    plan = cached_plan(kind, qweight, wscale, None, bias=bias, smooth=smooth)
    return _restore(plan.run(x2, act_scale), lead)
