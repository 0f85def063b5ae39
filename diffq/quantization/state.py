"""``QuantState``: everything diffq knows about one quantized denoiser, in one object on it.

``diffq.quantize`` and ``diffq.load`` attach it; save, LoRA, the finite checks, the bench and the
sensitivity analysis read it. Nothing else of diffq's lives on the denoiser as a loose attribute.
The denoiser's forward pre-hook feeds the timestep of each call to ``state.tracker``, which the
activation quantizers read (see :mod:`diffq.modules.timestep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diffq.errors import DiffqError
from diffq.modules.timestep import TimestepGetter, TimestepTracker, register_timestep_hook
from diffq.quantization.recipe import Recipe
from diffq.quantization.summary import QuantSummary

#: the one attribute diffq sets on a denoiser
STATE_ATTR = "diffq_state"


@dataclass
class QuantState:
    """The quantization of one denoiser.

    recipe / plan: what was applied (``plan``: layer -> preset for the ``mixed`` recipe, else None).
    family: the family adapter's name. base_fingerprint: of the full-precision weights it came from.
    summary: per-layer formats and sizes (None after ``diffq.load`` of a checkpoint).
    tracker: the current timestep bucket, set by the denoiser's pre-hook (``hook`` is its handle).
    lora_saved: ``scope/layer`` -> what a :func:`diffq.lora.load_lora` LoRA replaced, to restore it exactly;
        lora_loaded: those LoRAs in load order (scale and tensors), which ``diffq.save`` records.
    fused_qkv: attention modules whose q/k/v (and added q/k/v) were fused by ``fuse_qkv_projections``
        into quantized ``to_qkv``/``to_kv``/``to_added_qkv`` layers (:mod:`diffq.quantization.fused_qkv`).
    finite_check: the installed NaN/Inf hooks (:mod:`diffq.numerics`), or None.
    """

    recipe: Recipe
    family: str
    base_fingerprint: str
    plan: dict[str, str] | None = None
    summary: QuantSummary | None = None
    tracker: TimestepTracker = field(default_factory=TimestepTracker)
    hook: Any = None
    lora_saved: dict[str, Any] = field(default_factory=dict)
    lora_loaded: list[dict] = field(default_factory=list)
    fused_qkv: list[str] = field(default_factory=list)
    finite_check: Any = None


def quant_state(denoiser: nn.Module) -> QuantState | None:
    """The denoiser's QuantState, or None when it is not quantized."""
    return getattr(denoiser, STATE_ATTR, None)


def require_state(denoiser: nn.Module, what: str) -> QuantState:
    state = quant_state(denoiser)
    if state is None:
        raise DiffqError(f"this pipeline is not quantized; call diffq.quantize(pipe, recipe) before {what}")
    return state


def attach_state(denoiser: nn.Module, state: QuantState, timestep_of: TimestepGetter) -> QuantState:
    """Put ``state`` on ``denoiser`` and install the pre-hook that drives ``state.tracker``."""
    if quant_state(denoiser) is not None:
        raise DiffqError("this denoiser already carries a diffq quantization state; load a fresh pipeline")
    setattr(denoiser, STATE_ATTR, state)
    state.hook = register_timestep_hook(denoiser, timestep_of, lambda m: getattr(m, STATE_ATTR).tracker)
    return state
