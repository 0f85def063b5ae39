"""``diffq.quantize(pipe, recipe)``: quantize a diffusers pipeline's denoiser in place.

The pipeline stays a normal diffusers pipeline: only Linear/Conv2d modules inside the denoiser
(and, with ``recipe.text_encoder``, the text encoders) are swapped for QuantLinear/QuantConv2d
(and, with ``recipe.attn``, the denoiser's attention processors for quantized ones),
all through :func:`~diffq.quantization.selection.choose_layers` and
:func:`~diffq.quantization.build.install_layers`; a :class:`~diffq.quantization.state.QuantState`
on the denoiser records what was done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats, calibrate
from diffq.errors import CalibrationError, RecipeError
from diffq.fingerprint import weights_fingerprint
from diffq.kernels.layer_dispatch import kernel_route
from diffq.lora import enable_peft_layers, peft_adapter_layers
from diffq.modules import structure_fingerprint
from diffq.numerics import maybe_check_finite
from diffq.pipelines.adapters import adapter_for
from diffq.progress import progress_enabled
from diffq.quantization.attention import apply_attention
from diffq.quantization.build import install_layers
from diffq.quantization.diffusers_backend import mark_quantized
from diffq.quantization.presets import PRESETS, resolve_recipe
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice, choose_layers
from diffq.quantization.state import QuantState, attach_state, quant_state
from diffq.quantization.summary import LayerSummary, QuantSummary
from diffq.quantization.workers import check_workers
from diffq.sizes import module_bytes


def is_quantized(pipe) -> bool:
    return quant_state(adapter_for(pipe).denoiser(pipe)) is not None


def plan_assignments(recipe: Recipe, plan) -> dict[str, str] | None:
    """The per-layer preset names of a ``mixed`` recipe: from ``plan`` (a BitPlan or a dict layer ->
    preset), else from the BitPlan file the recipe names."""
    if plan is None and recipe.bit_plan is None:
        return None
    if plan is None:
        from diffq.mixed.plan import BitPlan

        plan = BitPlan.load(recipe.bit_plan)
    if hasattr(plan, "assignments"):
        return dict(plan.assignments)
    if isinstance(plan, dict):
        return dict(plan)
    raise RecipeError(f"a bit plan is a BitPlan or a dict of layer -> preset, not {type(plan).__name__}")


def kernel_target() -> tuple[tuple[int, int], str]:
    """(CUDA capability, description) that the summary's kernel routes refer to: this machine's GPU,
    or sm_90 (Hopper) when there is none."""
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        return cap, f"sm_{cap[0]}{cap[1]} ({torch.cuda.get_device_name()})"
    return (9, 0), "sm_90 (no GPU here: the route a Hopper GPU would take; this CPU runs the torch reference)"


def _summaries(choices: list[LayerChoice], built: dict[str, nn.Module], before: dict[str, int]) -> list[LayerSummary]:
    cap, _ = kernel_target()
    rows = []
    for ch in choices:
        kind = "conv" if isinstance(ch.module, nn.Conv2d) else "linear"
        dense = str(ch.module.weight.dtype).replace("torch.", "")
        new = built.get(ch.name)
        if new is None:
            rows.append(LayerSummary(ch.name, ch.role, kind, dense, "-", 0, before[ch.name], before[ch.name], ch.skip))
        else:
            rows.append(LayerSummary(
                ch.name, ch.role, kind, ch.weight.describe(), ch.act.describe() if ch.act else dense, new.rank,
                before[ch.name], new.storage_bytes(), kernel=kernel_route(new, cap),
            ))
    return rows


def text_encoder_recipe(recipe: Recipe) -> Recipe:
    """What the text encoders get: the recipe's weight and activation formats (a static activation
    format becomes dynamic per-token scales of the same type: text encoders are not calibrated), no
    smoothing, no low-rank branch, round-to-nearest (GPTQ needs calibration rows), no role or
    pattern skips."""
    act = recipe.act
    if act is not None and recipe.act_static:
        act = replace(act, granularity="token", group_size=None)
    return replace(
        recipe, name=f"{recipe.name}:text", act=act, act_static=False, smooth_alpha=None, rank=0,
        split_shortcut=False, skip_roles=(), skip_patterns=(), include_patterns=(), bit_plan=None,
        smooth_search=False, rank_ratio=None, lowrank_refit=0, rounding="rtn", act_unsigned=False,
        timestep_balance=False,
    )


def _needs_calibration(recipe: Recipe, layer_plan: dict[str, str] | None) -> bool:
    if recipe.needs_calibration:
        return True
    return layer_plan is not None and any(p in PRESETS and PRESETS[p].needs_calibration for p in set(layer_plan.values()))


#: input rows per layer and step that quantize() keeps when it calibrates for a recipe that needs them
DEFAULT_RESERVOIR = 256


def _needs_reservoir(recipe: Recipe, layer_plan: dict[str, str] | None) -> bool:
    if recipe.needs_reservoir:
        return True
    return layer_plan is not None and any(p in PRESETS and PRESETS[p].needs_reservoir for p in set(layer_plan.values()))


def _check_rows(choices: list[LayerChoice], calibration: CalibrationStats | None) -> None:
    """Refuse before any layer is swapped when a layer needs calibration rows that are missing."""
    missing = [
        c.name for c in choices
        if c.skip is None and c.recipe.needs_reservoir
        and (calibration is None or c.name not in calibration.reservoirs
             or int(calibration.reservoirs[c.name].count.sum()) == 0)
    ]
    if missing:
        what = "GPTQ" if any(c.recipe.rounding == "gptq" for c in choices if c.name in missing) else "the α search"
        raise CalibrationError(
            f"{what} needs real input rows of {len(missing)} layers that the calibration statistics do not hold "
            f"(e.g. {missing[:3]}); calibrate with diffq.calibrate(pipe, prompts, reservoir=256) "
            f"(`diffq calibrate --reservoir 256`), or set rounding=rtn and smooth_search=false"
        )


def quantize(
    pipe,
    recipe: Recipe | str | dict,
    calibration: CalibrationStats | None = None,
    prompts: Sequence[str] | None = None,
    *,
    plan=None,
    calibrate_kwargs: dict | None = None,
    progress: bool = True,
    work_dir=None,
    dense_source=None,
    shard: tuple[int, int] | None = None,
    workers: int = 1,
) -> QuantSummary:
    """Quantize ``pipe``'s denoiser in place and return what was done.

    recipe: a Recipe, a preset name (``w8a8``, ``w4a4-svd``...) or a dict of recipe fields.
    calibration: statistics from :func:`diffq.calibrate` on this pipeline; needed by recipes with
        smoothing or static activation ranges. If missing and ``prompts`` are given, calibration
        runs first (``calibrate_kwargs`` passed on).
    plan: a BitPlan (or dict layer -> preset) for the ``mixed`` recipe.
    work_dir: quantize block by block, each finished block saved there; a killed run resumes at the
        next block (:mod:`diffq.quantization.streaming`). dense_source: the denoiser's safetensors
        file, for a denoiser built on meta: each block's weights are read just before it is quantized.
        shard: (rank, world size) of several processes sharing ``work_dir`` (default: from
        ``accelerate launch`` / ``torchrun``'s RANK / WORLD_SIZE when ``work_dir`` is set).
    workers: layers quantized at once on CPU threads, one intra-op thread each
        (:mod:`diffq.quantization.workers`): the same result as ``workers=1`` with
        ``torch.set_num_threads(1)``, up to ``workers`` layers' working memory at once; ignored on a GPU.
    """
    check_workers(workers)
    recipe = resolve_recipe(recipe)
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    existing = quant_state(denoiser)
    if existing is not None:
        raise RecipeError(f"this pipeline is already quantized with {existing.recipe.name!r}; load a fresh pipeline")
    _refuse_loaded_lora(pipe, recipe)
    layer_plan = plan_assignments(recipe, plan)
    if calibration is None and _needs_calibration(recipe, layer_plan):
        rows = _needs_reservoir(recipe, layer_plan)
        if not prompts:
            raise CalibrationError(
                f"recipe {recipe.name!r} needs calibration statistics (smoothing, static activation ranges, "
                f"GPTQ or the smoothing search); pass calibration=diffq.calibrate(pipe, prompts"
                f"{', reservoir=256' if rows else ''}) or prompts=[...]"
            )
        kw = dict(calibrate_kwargs or {})
        if rows:
            kw.setdefault("reservoir", DEFAULT_RESERVOIR)
        if recipe.needs_attention_errors:
            kw.setdefault("attention_operands", True)
        calibration = calibrate(pipe, list(prompts), progress=progress, **kw)
    if calibration is not None:
        calibration.check_matches(structure_fingerprint(denoiser), adapter.name)
    source = None
    if dense_source is not None:
        from diffq.quantization.streaming import DenseSource

        source = DenseSource(dense_source)
        base_fp = source.fingerprint(denoiser)
    else:
        base_fp = weights_fingerprint(denoiser)
    bytes_before = module_bytes(denoiser, float_bits=16)
    choices = choose_layers(denoiser, recipe, layer_plan, role_of=adapter.role_of)
    if recipe.act_static:
        missing = [c.name for c in choices if c.skip is None and c.name not in calibration.layers]
        if missing:
            raise CalibrationError(f"calibration has no statistics for layers {missing[:5]}; re-run calibrate")
    _check_rows(choices, calibration)
    splits = calibration.splits if calibration is not None else adapter.skip_splits(denoiser)
    state = QuantState(recipe=recipe, family=adapter.name, base_fingerprint=base_fp, plan=layer_plan)
    before = {ch.name: module_bytes(ch.module) for ch in choices}
    bar = tqdm(total=len(choices), desc="quantize", disable=not progress_enabled(progress), leave=False)
    try:
        if work_dir is None and source is None:
            built = install_layers(denoiser, choices, calibration, splits, state.tracker, progress=bar.update,
                                   workers=workers)
        else:
            from diffq.quantization.streaming import install_blocks, launcher_shard, run_key

            built = install_blocks(denoiser, choices, calibration, splits, state.tracker, work_dir=work_dir,
                                   key=run_key(recipe, base_fp, calibration), dense_source=source,
                                   progress=bar.update, shard=shard or launcher_shard(), workers=workers)
    finally:
        bar.close()
    if recipe.text_encoder:
        quantize_text_encoders(pipe, recipe)
    attention = apply_attention(denoiser, recipe, calibration)
    attach_state(denoiser, state, adapter.timestep_of)
    enable_peft_layers()  # pipe.load_lora_weights(...) now wraps the quantized layers (diffq.lora)
    mark_quantized(adapter.scopes(pipe), state)  # save_pretrained/from_pretrained round-trip (diffusers backend)
    state.summary = QuantSummary(
        recipe.name, adapter.name, _summaries(choices, built, before), bytes_before,
        module_bytes(denoiser, float_bits=16), kernel_target=kernel_target()[1], attention=attention,
    )
    maybe_check_finite(pipe)  # DIFFQ_CHECK_FINITE=1: name the layer and step of the first NaN/Inf
    return state.summary


def _refuse_loaded_lora(pipe, recipe: Recipe) -> None:
    """A LoRA loaded with diffusers before quantizing would be quantized as layers of its own (and
    ``fuse_lora`` afterwards would write into a temporary dequantized weight): refuse, naming the order
    that works."""
    adapter = adapter_for(pipe)
    roots = adapter.scopes(pipe) if recipe.text_encoder else {"denoiser": adapter.denoiser(pipe)}
    loaded = [f"{scope}/{n}" for scope, root in roots.items() for n in peft_adapter_layers(root)]
    if loaded:
        raise RecipeError(
            f"this pipeline has LoRA adapters loaded ({len(loaded)} layers, e.g. {loaded[0]}); quantize first and "
            f"load the LoRA after: diffq.quantize(pipe, ...) then pipe.load_lora_weights(...) (it runs on the "
            f"16-bit branch, fuse_lora works). To bake a LoRA into the weights before quantizing instead: "
            f"pipe.fuse_lora(); pipe.unload_lora_weights(); then diffq.quantize(pipe, ...)"
        )


@torch.no_grad()
def quantize_text_encoders(pipe, recipe: Recipe) -> int:
    """Quantize every Linear of the pipeline's text encoders with :func:`text_encoder_recipe`;
    returns how many layers were replaced."""
    te_recipe = text_encoder_recipe(recipe)
    n = 0
    for enc in adapter_for(pipe).text_encoders(pipe).values():
        choices = [c for c in choose_layers(enc, te_recipe) if isinstance(c.module, nn.Linear)]
        n += len(install_layers(enc, choices, None, {}, None))
    return n
