"""Named recipes, and the ways to name a recipe: a preset, a dict of fields, stacked YAML files.

Each preset is a plain :class:`~diffq.quantization.recipe.Recipe`; print one with
``diffq quantize --preset NAME --show-recipe`` and override any field. The presets before issue 15
are reachable through fields: ``w4a8`` / ``w4a16`` with ``rounding=rtn, smooth_alpha=null,
smooth_search=false, act_center=false, int8_weight_roles=["shortcut", "resample", "proj"]``; ``w4a4-svd`` with
``rounding=rtn, smooth_search=false, act=int4:g64, act_center=false, skip_roles=["embed", "adanorm", "io"],
int8_weight_roles=[], weight_only_roles=[]``; ``w4a4`` /
``fp4`` with those ``skip_roles``. Presets with ``rounding=gptq`` or ``smooth_search`` need calibration
with input rows (``diffq.calibrate(..., reservoir=256)``; ``diffq.quantize(pipe, preset, prompts=...)``
collects them itself).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from diffq.errors import RecipeError
from diffq.formats import MXFP4, NVFP4, QuantSpec
from diffq.quantization.recipe import DEFAULT_INT8_WEIGHT_ROLES, W4A4_SKIP_ROLES, Recipe

_INT8_CH = QuantSpec("int8", "channel")
_INT8_TOK = QuantSpec("int8", "token")
_INT4_G64 = QuantSpec("int4", "group", 64, "fp16")
_INT3_G64 = QuantSpec("int3", "group", 64, "fp16")
_FP8_CH = QuantSpec("fp8_e4m3", "channel")
_FP8_TOK = QuantSpec("fp8_e4m3", "token")

_INT4_G64_ACT = QuantSpec("int4", "group", 64)
#: w4a8 / w4a16: the timestep/condition embedding linears (16-bit by default: ~40% of digits-sd's
#: w4a8 bytes) stored int8 per channel, weight-only, as well as the UNet reference set if skipped
_INT8_EMBED = ("embed", *DEFAULT_INT8_WEIGHT_ROLES)
_UINT4_G64_ACT = QuantSpec("uint4", "group", 64)
#: w4a4-svd / fp4-svd: the embeddings int8 weight-only as well (SD1.5 / SDXL 2.86x / 3.17x -> 3.00x / 3.22x;
#: digits-sd -0.01 +- 0.17 dB, digits-dit -0.22 +- 0.16 dB at 1.32x -> 1.42x, validation split), and the
#: resample convs weight-only at any share (adaLN's rule: int8 where that is no larger than the 4-bit
#: format with its branch, else 4-bit + branch; SD1.5's 320..1280-wide 3x3 convs take 4-bit, SD1.5 3.11x)
_W4A4_SVD_INT8 = ("shortcut", "proj", "embed")
_W4A4_SVD_WEIGHT_ONLY = ("adanorm", "resample")

PRESETS: dict[str, Recipe] = {
    "w8a8": Recipe("w8a8", weight=_INT8_CH, act=_INT8_TOK),
    "w8a8-static": Recipe(
        "w8a8-static", weight=_INT8_CH, act=QuantSpec("int8", "tensor"), act_static=True, act_clip="mse"
    ),
    "w8a16": Recipe("w8a16", weight=_INT8_CH, act=None),
    "w4a8": Recipe(
        "w4a8", weight=_INT4_G64, act=_INT8_TOK, weight_clip="mse", rounding="gptq", smooth_alpha=0.5,
        smooth_search=True, shared_smoothing=True, act_center=True, int8_weight_roles=_INT8_EMBED,
    ),
    "w3a8": Recipe("w3a8", weight=_INT3_G64, act=_INT8_TOK, weight_clip="mse"),
    # weight-only: the α search scales the weights by activation-aware factors (AWQ-like)
    "w4a16": Recipe(
        "w4a16", weight=_INT4_G64, act=None, weight_clip="mse", rounding="gptq", smooth_alpha=0.5,
        smooth_search=True, shared_smoothing=True, int8_weight_roles=_INT8_EMBED,
    ),
    "w4a4": Recipe("w4a4", weight=_INT4_G64, act=_INT4_G64_ACT, skip_roles=W4A4_SKIP_ROLES),
    "w4a4-svd": Recipe(
        "w4a4-svd",
        weight=_INT4_G64,
        act=_UINT4_G64_ACT,
        smooth_alpha=0.5,
        smooth_search=True,
        rank=32,
        weight_clip="mse",
        rounding="gptq",
        skip_roles=W4A4_SKIP_ROLES,
        act_center=True,
        int8_weight_roles=_W4A4_SVD_INT8,
        weight_only_roles=_W4A4_SVD_WEIGHT_ONLY,
        weight_only_share=0.0,
    ),
    "w8a8-attn": Recipe("w8a8-attn", weight=_INT8_CH, act=_INT8_TOK, attn="int8-fp8"),
    "fp8": Recipe("fp8", weight=_FP8_CH, act=_FP8_TOK),
    "fp4": Recipe("fp4", weight=NVFP4, act=NVFP4, skip_roles=W4A4_SKIP_ROLES),
    "mxfp4": Recipe("mxfp4", weight=MXFP4, act=MXFP4, skip_roles=W4A4_SKIP_ROLES),
    "mixed": Recipe("mixed", weight=None, bit_plan="plan.json"),
}

# fp4-svd keeps the Blackwell kernel path: no centering (no FP4 kernel subtracts the means)
PRESETS["fp4-svd"] = replace(PRESETS["w4a4-svd"], name="fp4-svd", weight=NVFP4, act=NVFP4, act_center=False)
PRESETS["w4a4-svd-attn"] = replace(PRESETS["w4a4-svd"], name="w4a4-svd-attn", attn="int8-fp8")

DESCRIPTIONS = {
    "w8a8": "int8 per-channel weights, int8 dynamic per-token activations",
    "w8a8-static": "int8 weights, int8 activations with calibrated ranges per timestep group",
    "w8a16": "int8 per-channel weights, 16-bit activations (weight-only; the most faithful 8-bit option)",
    "w4a8": "int4 weights (group 64, GPTQ with MSE-clipped groups, smoothing strength searched per layer), "
    "int8 per-token activations (linear inputs centred per sample); embeddings int8 weight-only",
    "w3a8": "int3 weights (group 64, MSE clipping, 8 per 3 bytes), int8 per-token activations; "
    "a candidate for mixed precision (too lossy alone for most models), reference path only",
    "w4a16": "int4 weights (group 64, GPTQ with MSE-clipped groups, activation-aware scaling searched per "
    "layer), 16-bit activations; embeddings int8 weight-only",
    "w4a4": "int4 weights and activations (group 64), plain round-to-nearest; UNet shortcut/resample/proj "
    "with int8 weights and 16-bit activations",
    "w4a4-svd": "SVDQuant-style: smoothing (strength searched per layer) + rank-32 16-bit branch + GPTQ int4 "
    "weights + asymmetric int4 activations (linear inputs centred per sample); embeddings and UNet "
    "shortcut/proj with int8 weights, UNet resample and adaLN weight-only (int8, or 4-bit + branch where smaller)",
    "w8a8-attn": "w8a8 plus quantized attention: INT8 Q·Kᵀ (block 64, K smoothed), FP8 E4M3 P·V",
    "w4a4-svd-attn": "w4a4-svd plus quantized attention: INT8 Q·Kᵀ (block 64, K smoothed), FP8 E4M3 P·V",
    "fp8": "FP8 E4M3 weights (per channel) and activations (per token)",
    "fp4": "NVFP4: FP4 E2M1 with 16-element FP8 block scales, weights and activations, round-to-nearest",
    "mxfp4": "MXFP4: FP4 E2M1 with 32-element power-of-two (E8M0) block scales, weights and activations, "
    "round-to-nearest",
    "fp4-svd": "NVFP4 weights and activations with searched smoothing, the rank-32 16-bit branch and GPTQ",
    "mixed": "per-layer formats from a BitPlan (diffq.allocate); set bit_plan=PATH",
}


def get_preset(name: str) -> Recipe:
    if not isinstance(name, str):
        raise RecipeError(f"a preset name is a string such as 'w8a8', not {name!r}; presets: {', '.join(PRESETS)}")
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def resolve_recipe(recipe: Recipe | str | dict) -> Recipe:
    """Accept a Recipe, a preset name, or a dict of recipe fields (optionally with ``preset``)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return get_preset(recipe)
    if isinstance(recipe, dict):
        d = dict(recipe)
        base = get_preset(d.pop("preset")).to_dict() if "preset" in d else {}
        base.update(d)
        return Recipe.from_dict(base)
    raise RecipeError(f"a recipe is a Recipe, a preset name or a dict, not {type(recipe).__name__}")


def load_recipe_files(paths: list[str | Path], base: Recipe | None = None) -> Recipe:
    """Stack YAML/JSON recipe files: each file's keys override the previous result; a ``preset`` key
    starts that file from the named preset."""
    import yaml

    d = (base or Recipe()).to_dict()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {str(p)!r} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
        except (yaml.YAMLError, RecursionError) as e:
            raise RecipeError(f"recipe file {str(p)!r} is not valid YAML/JSON: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {str(p)!r} must hold a mapping of recipe fields")
        if "preset" in data:
            d = get_preset(data.pop("preset")).to_dict()
        d.update(data)
    return Recipe.from_dict(d)
