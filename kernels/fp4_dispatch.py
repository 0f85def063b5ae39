"""FP4 (NVFP4 / MXFP4) W4A4 layers: formats, routes, launch plans, launches and the public API.

Layouts (all as the core stores them, which is what ``tl.dot_scaled`` reads; nothing is repacked):

==================  ==========================================  ===================================
tensor              NVFP4 (block B = 16)                        MXFP4 (B = 32)
==================  ==========================================  ===================================
weight codes        uint8 [N, K/2], E2M1 sign-magnitude,        same
                    element 2j in the low nibble of byte j
weight scales       float8_e4m3fn [N, K/B] (positive)           uint8 E8M0 [N, K/B] (2^(s - 127))
weight tensor scale fp32 [1] (``wscale_global``)                none
activation codes    uint8 [M, K/2] (written per call)           same
activation scales   float8_e4m3fn [M, K/B]                      uint8 [M, K/B]
activation scale    abs-max fp32 bits in int32 [1] -> g_x       none
==================  ==========================================  ===================================

The launch plan (:class:`Fp4Plan`) therefore only makes the module's buffers contiguous on the
device and keeps fp32 copies of bias and smoothing: no extra weight memory.

Routes (:func:`fp4_route`): ``fp4-mma`` on sm_100 / sm_103 (``tcgen05.mma ... block_scale``)
and sm_120 / sm_121 (block-scaled ``mma.sync``); ``bf16-mma`` on sm_89 / sm_90 (and sm_80 for
MXFP4: Triton has no E4M3 scales there), where Triton's ``dot_scaled`` decodes both operands to
bf16 (exact values) for the bf16 tensor cores. Per call: 2 launches for MXFP4 (quantize +
down-project, GEMM), 3 for NVFP4 (the abs-max reduction first); no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.errors import ShapeError
from diffq.kernels import fp4_reference as ref4
from diffq.kernels.autotune import is_interpreted
from diffq.kernels.fp4_config import (  # noqa: F401  (re-exported: the FP4 formats, routes and tiles)
    FP4_F32_TILES,
    FP4_FAMILY_CAP,
    FP4_FORMATS,
    FP4_MIN_CAPABILITY,
    FP4_TILES,
    INTERPRETER_TILES,
    fp4_family,
    fp4_format,
    fp4_route,
    pick_fp4_tile,
)


@dataclass(eq=False)
class Fp4Plan:
    """One layer's launch inputs that do not depend on x: codes ``w`` uint8 [N, K/2], stored scales
    ``ws`` [N, K/B], NVFP4 tensor scale ``wg`` fp32 [1], ``smooth`` fp32 [K] (the kernels divide by
    it after rounding it to x's dtype, as the module does), ``bias`` fp32 [N], low-rank tensors."""

    fmt: str
    route: str
    family: str
    device: torch.device
    n: int
    k: int
    w: torch.Tensor
    ws: torch.Tensor
    wg: torch.Tensor | None = None
    smooth: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lr_down: torch.Tensor | None = None
    lr_up: torch.Tensor | None = None

    @property
    def block(self) -> int:
        return FP4_FORMATS[self.fmt][0]

    def run(self, x2: torch.Tensor, amax_bits: torch.Tensor | None = None) -> torch.Tensor:
        """x2 [M, K] contiguous -> y [M, N] in x2.dtype. ``amax_bits``: NVFP4 activation abs-max
        (fp32 bits as int32 [1]) computed elsewhere (a conv's whole input); default: from x2."""
        from diffq.kernels import fp4_launch

        return fp4_launch.run(self, x2, amax_bits)


def _device_kind(device: torch.device) -> tuple[tuple[int, int], str]:
    if is_interpreted(_gemm_kernel()) or device.type != "cuda":
        return (0, 0), "interpreter"
    cap = torch.cuda.get_device_capability(device)
    return cap, fp4_family(cap)


def _gemm_kernel():
    from diffq.kernels.fp4_gemm import _fp4_gemm_kernel

    return _fp4_gemm_kernel


def plan_for_fp4(
    fmt: str,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    *,
    wscale_global: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
) -> Fp4Plan:
    """The plan of one FP4 weight on its device (shapes trusted: the callers validate)."""
    dev = qweight.device
    cap, family = _device_kind(dev)
    route = "interpreter" if family == "interpreter" else fp4_route(cap)
    wg = None if wscale_global is None else wscale_global.float().reshape(1).contiguous()
    return Fp4Plan(
        fmt, route, family, dev, qweight.shape[0], qweight.shape[1] * 2, qweight.contiguous(), wscale.contiguous(),
        wg=wg, smooth=None if smooth is None else smooth.float().contiguous(),
        bias=None if bias is None else bias.float().contiguous(),
        lr_down=None if lr_down is None else lr_down.contiguous(), lr_up=None if lr_up is None else lr_up.contiguous(),
    )  # fmt: skip


# ----------------------------------------------------------------------------- public API


def _check(fn: str, fmt: str, x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
           wscale_global: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, ...], int]:  # fmt: skip
    if fmt not in FP4_FORMATS:
        raise ShapeError(f"{fn}: fmt must be one of {sorted(FP4_FORMATS)}, got {fmt!r}")
    b, _ = FP4_FORMATS[fmt]
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dim() < 1:
        raise ShapeError(f"{fn}: x must be a float16/bfloat16/float32 tensor [..., K]")
    k = x.shape[-1]
    if k == 0 or k % b:
        raise ShapeError(f"{fn}: K={k} must be a positive multiple of the {fmt} block ({b})")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ShapeError(f"{fn}: qweight must be packed E2M1 uint8 [N, K/2] = [N, {k // 2}], got "
                         f"{tuple(qweight.shape)} {qweight.dtype}")  # fmt: skip
    n = qweight.shape[0]
    sdt = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
    if wscale.dtype != sdt or tuple(wscale.shape) != (n, k // b):
        raise ShapeError(f"{fn}: wscale must be {sdt} [N, K/{b}] = [{n}, {k // b}], got {tuple(wscale.shape)} {wscale.dtype}")
    if (fmt == "nvfp4") != (wscale_global is not None):
        raise ShapeError(f"{fn}: wscale_global (fp32 [1]) is required for nvfp4 and absent for mxfp4")
    for t in (qweight, wscale, wscale_global):
        if t is not None and t.device != x.device:
            raise ShapeError(f"{fn}: weights are on {t.device} but x is on {x.device}; move both to one device")
    return x.reshape(-1, k).contiguous(), tuple(x.shape[:-1]), n


def fp4_unavailable_reason(fmt: str, device: torch.device | str) -> str | None:
    """Why the Triton FP4 kernels cannot run ``fmt`` on ``device`` (None when they can)."""
    from diffq.kernels.dispatch import triton_unavailable_reason

    return triton_unavailable_reason(fmt, device)


def fp4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    bias: torch.Tensor | None = None,
    *,
    wscale_global: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """FP4 W4A4 (+ low-rank) layer: x [..., K] -> [..., N] in x.dtype (layouts: module docstring).

    ``Q(x / smooth) · deq(W)ᵀ + ((x / smooth) @ lr_down) @ lr_up + bias`` with activations quantized
    by the core's ``fmt`` rule (NVFP4: per-tensor scale from x's abs-max). backend: "auto" (Triton on
    a CUDA GPU that runs it, else the torch reference), "triton" (forced) or "reference"."""
    from diffq.kernels.dispatch import KernelUnavailableError

    fn = "fp4_linear"
    x2, lead, n = _check(fn, fmt, x, qweight, wscale, wscale_global)
    if (lr_down is None) != (lr_up is None):
        raise ShapeError(f"{fn}: lr_down [K, r] and lr_up [r, N] go together; got only one of them")
    if lr_down is not None and (lr_down.shape[0] != x2.shape[1] or tuple(lr_up.shape) != (lr_down.shape[1], n)):
        raise ShapeError(f"{fn}: expected lr_down [K, r] and lr_up [r, {n}], got {tuple(lr_down.shape)}, {tuple(lr_up.shape)}")
    if smooth is not None and tuple(smooth.shape) != (x2.shape[1],):
        raise ShapeError(f"{fn}: smooth must be [K] = [{x2.shape[1]}], got {tuple(smooth.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ShapeError(f"{fn}: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    if backend not in ("auto", "triton", "reference"):
        raise KernelUnavailableError(f"{fn}: unknown backend {backend!r}; choose auto, triton or reference")
    why = fp4_unavailable_reason(fmt, x2.device)
    if backend == "triton" and why is not None:
        raise KernelUnavailableError(f"{fn}: backend='triton' cannot run: {why}; use backend='reference' or 'auto'")
    if backend == "reference" or (backend == "auto" and (why is not None or not x2.is_cuda)):
        y = ref4.fp4_linear(x2, qweight, wscale, fmt, bias, wscale_global=wscale_global, lr_down=lr_down,
                            lr_up=lr_up, smooth=smooth)  # fmt: skip
        return y.reshape(*lead, n)
    plan = plan_for_fp4(fmt, qweight, wscale, wscale_global=wscale_global, bias=bias, smooth=smooth,
                        lr_down=lr_down, lr_up=lr_up)  # fmt: skip
    return plan.run(x2).reshape(*lead, n)


def quantize_act_fp4(
    x: torch.Tensor, fmt: str, *, smooth: torch.Tensor | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FP4 activation quantization: x [..., K] -> (codes uint8 [M, K/2], stored block scales
    [M, K/B], NVFP4 tensor scale fp32 [1] or None), the core's rule on ``x / smooth.to(x.dtype)``."""
    from diffq.kernels.dispatch import KernelUnavailableError

    fn = "quantize_act_fp4"
    if fmt not in FP4_FORMATS:
        raise ShapeError(f"{fn}: fmt must be one of {sorted(FP4_FORMATS)}, got {fmt!r}")
    b = FP4_FORMATS[fmt][0]
    if x.dim() < 1 or x.shape[-1] % b or x.shape[-1] == 0:
        raise ShapeError(f"{fn}: K={x.shape[-1] if x.dim() else 0} must be a positive multiple of {b}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    why = fp4_unavailable_reason(fmt, x2.device)
    if backend == "triton" and why is not None:
        raise KernelUnavailableError(f"{fn}: backend='triton' cannot run: {why}")
    if backend == "reference" or why is not None or not (x2.is_cuda or backend == "triton"):
        return ref4.quantize_act(ref4.smooth_like_module(x2, smooth), fmt)
    from diffq.kernels import fp4_launch

    xq, xs, bits, _, _ = fp4_launch.quantize(fmt, x2, smooth=None if smooth is None else smooth.float().contiguous())
    g = None if bits is None else ref4.global_scale(bits.view(torch.float32))
    return xq, xs, g
