"""``diffq.quantize(pipe, recipe)``: quantize a diffusers pipeline's denoiser in place.

The pipeline stays a normal diffusers pipeline: only Linear/Conv2d modules inside the denoiser
(and optionally the text encoders) are swapped for QuantLinear/QuantConv2d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.build import build_layer
from diffq.calibration import CalibrationStats, calibrate
from diffq.errors import CalibrationError, RecipeError
from diffq.fingerprint import weights_fingerprint
from diffq.formats import QuantSpec
from diffq.generation import progress_enabled
from diffq.layers import in_out, structure_fingerprint
from diffq.modules import ActQuantizer, QuantConv2d, QuantLinear, attach_tracker
from diffq.pipelines.adapters import adapter_for
from diffq.presets import resolve_recipe
from diffq.recipe import Recipe
from diffq.selection import LayerChoice, choose_layers
from diffq.summary import LayerSummary, QuantSummary

TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def module_bytes(m: nn.Module, *, float_bits: int | None = None) -> int:
    """Bytes of a module's parameters and buffers (each tensor once).

    float_bits=None counts what is held. float_bits=16 gives the size of a 16-bit deployment:
    floating tensors wider than 16 bits (an fp32 demo model, fp32 low-rank factors) count at 16
    bits, so size ratios compare against bf16 whatever dtype the model was loaded in.
    """
    seen, total = set(), 0
    for t in list(m.parameters()) + [b for b in m.buffers() if b is not None]:
        if id(t) not in seen:
            seen.add(id(t))
            size = t.element_size()
            if float_bits is not None and t.is_floating_point():
                size = min(size, float_bits // 8)
            total += t.numel() * size
    return total


def is_quantized(pipe) -> bool:
    return getattr(adapter_for(pipe).denoiser(pipe), "_diffq_recipe", None) is not None


def load_plan(recipe: Recipe, plan) -> dict[str, str] | None:
    """The per-layer preset names of a ``mixed`` recipe (a BitPlan, a dict or the recipe's path)."""
    if plan is None and recipe.bit_plan is None:
        return None
    if plan is None:
        from diffq.allocation import BitPlan

        plan = BitPlan.load(recipe.bit_plan)
    if hasattr(plan, "assignments"):
        return dict(plan.assignments)
    if isinstance(plan, dict):
        return dict(plan)
    raise RecipeError(f"a bit plan is a BitPlan or a dict of layer -> preset, not {type(plan).__name__}")


def apply_choices(
    denoiser: nn.Module,
    choices: list[LayerChoice],
    stats: CalibrationStats | None,
    splits: dict[str, tuple[int, int]],
    tracker,
    progress: bool = False,
) -> list[LayerSummary]:
    rows = []
    bar = tqdm(choices, desc="quantize", disable=not progress_enabled(progress), leave=False)
    for ch in bar:
        mod = ch.module
        kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
        before = module_bytes(mod)
        dense = str(mod.weight.dtype).replace("torch.", "")
        if ch.skip is None and ch.weight is None:
            ch.skip = "recipe has no weight format"
        if ch.skip is not None:
            rows.append(LayerSummary(ch.name, ch.role, kind, dense, "-", 0, before, before, ch.skip))
            continue
        new = build_layer(ch, stats, splits.get(ch.name))
        if new.act is not None:
            new.act.tracker = tracker
        set_submodule(denoiser, ch.name, new)
        rows.append(
            LayerSummary(
                ch.name, ch.role, kind, ch.weight.describe(), ch.act.describe() if ch.act else dense,
                new.rank, before, new.storage_bytes(),
            )
        )
    return rows


def quantize(
    pipe,
    recipe: Recipe | str | dict,
    calibration: CalibrationStats | None = None,
    prompts: Sequence[str] | None = None,
    *,
    plan=None,
    calibrate_kwargs: dict | None = None,
    progress: bool = True,
) -> QuantSummary:
    """Quantize ``pipe``'s denoiser in place and return what was done.

    recipe: a Recipe, a preset name (``w8a8``, ``w4a4-svd``...) or a dict of recipe fields.
    calibration: statistics from :func:`diffq.calibrate` on this pipeline; needed by recipes with
        smoothing or static activation ranges. If missing and ``prompts`` are given, calibration
        runs first (``calibrate_kwargs`` passed on).
    plan: a BitPlan (or dict layer -> preset) for the ``mixed`` recipe.
    """
    recipe = resolve_recipe(recipe)
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    if getattr(denoiser, "_diffq_recipe", None) is not None:
        raise RecipeError(
            f"this pipeline is already quantized with {denoiser._diffq_recipe.name!r}; load a fresh pipeline"
        )
    layer_plan = load_plan(recipe, plan)
    needs_cal = recipe.needs_calibration or (
        layer_plan is not None and any(_preset_needs_cal(p) for p in set(layer_plan.values()))
    )
    if calibration is None and needs_cal:
        if not prompts:
            raise CalibrationError(
                f"recipe {recipe.name!r} needs calibration statistics (smoothing or static activation ranges); "
                f"pass calibration=diffq.calibrate(pipe, prompts) or prompts=[...]"
            )
        calibration = calibrate(pipe, list(prompts), progress=progress, **(calibrate_kwargs or {}))
    if calibration is not None:
        calibration.check_matches(structure_fingerprint(denoiser), adapter.name)
    base_fp = weights_fingerprint(denoiser)
    bytes_before = module_bytes(denoiser, float_bits=16)
    tracker = attach_tracker(denoiser, adapter.timestep_of)
    choices = choose_layers(denoiser, recipe, layer_plan)
    if recipe.act_static:
        missing = [c.name for c in choices if c.skip is None and c.name not in calibration.layers]
        if missing:
            raise CalibrationError(f"calibration has no statistics for layers {missing[:5]}; re-run calibrate")
    splits = calibration.splits if calibration is not None else adapter.skip_splits(denoiser)
    rows = apply_choices(denoiser, choices, calibration, splits, tracker, progress)
    if recipe.text_encoder:
        quantize_text_encoders(pipe, recipe)
    denoiser._diffq_recipe = recipe
    denoiser._diffq_base_fingerprint = base_fp
    denoiser._diffq_plan = layer_plan
    summary = QuantSummary(recipe.name, adapter.name, rows, bytes_before, module_bytes(denoiser, float_bits=16))
    denoiser._diffq_summary = summary
    from diffq.numerics import maybe_check_finite

    maybe_check_finite(pipe)  # DIFFQ_CHECK_FINITE=1: name the layer and step of the first NaN/Inf
    return summary


def _preset_needs_cal(name: str) -> bool:
    from diffq.presets import PRESETS

    return name in PRESETS and PRESETS[name].needs_calibration


@torch.no_grad()
def quantize_text_encoders(pipe, recipe: Recipe) -> int:
    """W8A8 (dynamic per token) on every Linear of the text encoders; with ``bos_aware`` the first
    token's activations stay in 16 bits (MixDQ), which is what keeps text alignment at 8 bits."""
    from diffq.formats import quantize as q_tensor

    n = 0
    wspec = QuantSpec("int8", "channel")
    aspec = QuantSpec("int8", "token")
    for attr in TEXT_ENCODER_ATTRS:
        enc = getattr(pipe, attr, None)
        if enc is None:
            continue
        for name, mod in list(enc.named_modules()):
            if not isinstance(mod, nn.Linear) or min(in_out(mod)) < recipe.min_features:
                continue
            act = ActQuantizer(aspec, keep_first_token=recipe.bos_aware)
            new = QuantLinear(
                q_tensor(mod.weight.detach().float(), wspec), bias=mod.bias, act=act, dtype=mod.weight.dtype
            ).to(mod.weight.device)
            set_submodule(enc, name, new)
            n += 1
    return n


def quantized_modules(module: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
