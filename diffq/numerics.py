"""Opt-in check that quantized layers never emit NaN/Inf, naming the layer and the step where it starts.

Why opt-in: checking every output costs a reduction per layer per step (and a device sync on GPU),
which is fine while debugging a recipe but not in a timed run. Turn it on with
``diffq.numerics.check_finite(pipe)`` or by setting ``DIFFQ_CHECK_FINITE=1`` before
``diffq.quantize`` / ``diffq.load``.

Hooks fire in execution order, so the first error names the first quantized layer whose output is
non-finite, and says whether its *input* already was (then the fault started upstream, in a dense
layer or the pipeline itself, and not in quantization).

Where non-finite values cannot come from: scales. The clamping rule of
:mod:`diffq.formats.core` keeps every scale positive and normal, so an all-zero group never
divides by zero and a tiny group never produces a denormal scale: fp32 scales are clamped below at
``SCALE_MIN = 2^-32``; fp16 scales to fp16's normal range ``[2^-14, 65504]``; NVFP4 E4M3 block
scales to ``[2^-9, 448]`` under an fp32 tensor scale (itself ``>= SCALE_MIN``); MXFP4 E8M0
exponents to ``[-127, 127]``. Inputs with NaN/Inf are refused when quantizing weights
(``QuantizationError``) and during calibration (``CalibrationError`` naming layer and step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffq.errors import QuantizationError
from diffq.formats.core import FINITE_CHECK_ENV, finite_check_requested
from diffq.modules import QuantConv2d, QuantLinear
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.state import quant_state

ENV_VAR = FINITE_CHECK_ENV


@dataclass
class FiniteCheck:
    """Handle of installed hooks; ``remove()`` (or leaving a ``with`` block) uninstalls them."""

    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):  # returns self (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _quantized_roots(pipe_or_module) -> dict[str, nn.Module]:
    if isinstance(pipe_or_module, nn.Module):
        return {"": pipe_or_module}
    return adapter_for(pipe_or_module).scopes(pipe_or_module)


def _count_bad(t: torch.Tensor) -> tuple[int, int]:
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def check_finite(pipe_or_module) -> FiniteCheck:
    """Raise ``QuantizationError`` as soon as a quantized layer's output holds NaN/Inf.

    ``pipe_or_module``: a quantized diffusers pipeline (denoiser and text encoders are checked) or
    any module containing QuantLinear/QuantConv2d layers. The message names the layer, the step
    (denoiser call index since the check was installed, and the timestep bucket on the 0..1000
    scale) and whether the layer's input was already non-finite (checked before the layer runs, so
    the activation quantizer's own refusal never hides the layer). Returns a handle to remove the hooks.
    """
    check = FiniteCheck()
    for scope, root in _quantized_roots(pipe_or_module).items():
        state = quant_state(root)
        tracker = state.tracker if state is not None else None
        start = tracker.calls if tracker is not None else 0
        for name, mod in root.named_modules():
            if not isinstance(mod, (QuantLinear, QuantConv2d)):
                continue
            label = f"{scope}/{name}" if scope else name

            def where(tracker=tracker, start=start) -> str:
                if tracker is None:
                    return "a forward pass"
                return f"denoiser step {tracker.calls - start - 1} (timestep bucket {int(tracker.bucket)})"

            def pre_hook(m, args, label=label, where=where):
                # before the activation quantizer, which would refuse the input without naming the layer
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if x is not None and not bool(torch.isfinite(x).all()):
                    n_nan, n_inf = _count_bad(x)
                    raise QuantizationError(
                        f"quantized layer {label!r} received {n_nan} NaN and {n_inf} Inf input values at {where()}; "
                        f"its input was already non-finite, so the fault started upstream (a dense layer or the "
                        f"pipeline itself): check the model dtype (fp16 overflow: use bf16/fp32) and its inputs"
                    )

            def hook(m, args, out, label=label, where=where):
                if not isinstance(out, torch.Tensor) or bool(torch.isfinite(out).all()):
                    return
                n_nan, n_inf = _count_bad(out)
                raise QuantizationError(
                    f"quantized layer {label!r} produced {n_nan} NaN and {n_inf} Inf values at {where()}; its input "
                    f"was finite, so the quantized layer produced them: keep this layer in 16 bits (skip_patterns) "
                    f"or give it a wider format"
                )

            check.handles.append(mod.register_forward_pre_hook(pre_hook))
            check.handles.append(mod.register_forward_hook(hook))
    return check


def enabled_by_env() -> bool:
    return finite_check_requested()


def maybe_check_finite(pipe) -> FiniteCheck | None:
    """Install :func:`check_finite` on ``pipe`` when ``DIFFQ_CHECK_FINITE`` is set (else nothing)."""
    if not enabled_by_env():
        return None
    check = check_finite(pipe)
    state = quant_state(adapter_for(pipe).denoiser(pipe))
    if state is not None:
        state.finite_check = check
    return check
