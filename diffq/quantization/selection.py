"""Which layers get which formats: roles, skip rules, group fitting and bit plans -> a choice per layer."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from diffq.errors import RecipeError
from diffq.formats import QuantSpec, pack_multiple
from diffq.modules.layers import in_out, quantizable_layers
from diffq.pipelines.roles import role_of as common_role_of
from diffq.quantization.presets import get_preset
from diffq.quantization.recipe import Recipe

MIN_GROUP = 8
#: the bit-plan entry that keeps a layer dense (16 bits)
KEEP_DENSE = "fp16"


@dataclass
class LayerChoice:
    """What happens to one layer. ``skip`` is the reason it stays dense, else None. ``decisions``
    records what building it chose (smoothing strength, α-search errors, unsigned input...)."""

    name: str
    role: str
    module: nn.Module
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    rank: int = 0
    smooth_alpha: float | None = None
    recipe: Recipe | None = None
    skip: str | None = None
    decisions: dict = field(default_factory=dict)


def fit_group(spec: QuantSpec | None, channels: int) -> QuantSpec | None:
    """Halve the group size until it divides ``channels`` (down to ``MIN_GROUP`` = 8); ``None`` when
    no such group exists, and the caller then uses one scale per row (weights: per channel,
    activations: per token). This is the documented fallback for a recipe group size that does not
    divide a layer's input width: the recipe applies to layers of many widths, so refusing would make
    most group sizes unusable; ``QuantSummary`` shows the format each layer really got. (Calling
    :func:`diffq.formats.quantize` directly with a group that does not divide raises FormatError.)"""
    if spec is None or spec.granularity != "group":
        return spec
    g = spec.group_size
    while g >= MIN_GROUP and channels % g:
        g //= 2
    if g >= MIN_GROUP and channels % g == 0:
        return replace(spec, group_size=g)
    return None


def _row_spec(spec: QuantSpec, is_act: bool) -> QuantSpec:
    return replace(spec, granularity="token" if is_act else "channel", group_size=None,
                   scale_dtype="fp32" if spec.scale_dtype in ("e4m3", "e8m0") else spec.scale_dtype)


def role_shares(layers: dict[str, nn.Module], role_of: Callable[[str], str]) -> dict[str, float]:
    """Role -> its layers' share of the weight elements of ``layers`` (shapes only: meta models work)."""
    sizes: dict[str, int] = {}
    for name, mod in layers.items():
        sizes[role_of(name)] = sizes.get(role_of(name), 0) + mod.weight.numel()
    total = sum(sizes.values()) or 1
    return {r: n / total for r, n in sizes.items()}


def weight_only_roles(recipe: Recipe, layers: dict[str, nn.Module], role_of: Callable[[str], str]) -> set[str]:
    """The roles of ``recipe.weight_only_roles`` that hold at least ``recipe.weight_only_share`` of the weights."""
    if not recipe.weight_only_roles:
        return set()
    shares = role_shares(layers, role_of)
    return {r for r in recipe.weight_only_roles if shares.get(r, 0.0) >= recipe.weight_only_share}


def choose_layers(
    denoiser: nn.Module,
    recipe: Recipe,
    plan: dict[str, str] | None = None,
    *,
    role_of: Callable[[str], str] = common_role_of,
) -> list[LayerChoice]:
    """A LayerChoice for every quantizable layer, in module order.

    plan: for the ``mixed`` recipe, layer name -> preset name (or "fp16" to keep it dense).
    role_of: layer name -> canonical role (the family adapter's :meth:`role_of`).
    """
    includes = [re.compile(p) for p in recipe.include_patterns]
    skips = [re.compile(p) for p in recipe.skip_patterns]
    layers = quantizable_layers(denoiser)
    weight_only = weight_only_roles(recipe, layers, role_of) if plan is None else set()
    if plan is not None:
        foreign = [n for n in plan if n not in layers]
        if foreign:
            raise RecipeError(
                f"the bit plan names {len(foreign)} layers this denoiser does not have (e.g. {foreign[:3]}); "
                f"it was made for another model: re-run diffq.allocate on a sensitivity table of this pipeline"
            )
    out = []
    for name, mod in layers.items():
        role = role_of(name)
        ch = LayerChoice(name, role, mod)
        out.append(ch)
        forced = any(p.search(name) for p in includes)
        cin, cout = in_out(mod)
        layer_recipe = recipe
        w_only = role in weight_only and not forced
        if plan is not None:
            choice = plan.get(name)
            if choice is None or choice == KEEP_DENSE:
                ch.skip = "bit plan keeps it in 16 bits" if choice else "not in the bit plan"
                continue
            layer_recipe = get_preset(choice)
        elif not forced:
            if role in recipe.skip_roles and not w_only:
                ch.skip = f"role {role} is kept in 16 bits"
                continue
            if any(p.search(name) for p in skips):
                ch.skip = "matches a skip pattern"
                continue
        if min(cin, cout) < recipe.min_features:
            ch.skip = f"smaller than min_features={recipe.min_features}"
            continue
        w = (recipe.weight_only or recipe.weight) if w_only else layer_recipe.weight
        if w is None:
            ch.skip = "recipe has no weight format"
            continue
        fitted = fit_group(w, cin)
        ch.weight = fitted if fitted is not None else _row_spec(w, False)
        a = None if w_only else layer_recipe.act
        fitted_a = fit_group(a, cin)
        ch.act = fitted_a if fitted_a is not None or a is None else _row_spec(a, True)
        if ch.weight is not None and ch.weight.packed and cin % pack_multiple(ch.weight.bits):
            m = pack_multiple(ch.weight.bits)
            ch.skip = f"input width {cin} cannot be bit-packed at {ch.weight.bits} bits (needs a multiple of {m})"
            continue
        ch.rank = layer_recipe.rank
        ch.smooth_alpha = None if w_only else layer_recipe.smooth_alpha
        ch.recipe = layer_recipe
    return out
