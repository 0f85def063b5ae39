"""Which layers get which formats: roles, skip rules, group fitting and bit plans -> a choice per layer."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from diffq.errors import RecipeError
from diffq.formats import QuantSpec, pack_multiple
from diffq.methods.lowrank import effective_rank
from diffq.modules.layers import in_out, quantizable_layers
from diffq.pipelines.roles import role_of as common_role_of
from diffq.quantization.presets import get_preset
from diffq.quantization.recipe import Recipe

MIN_GROUP = 8
#: the weight-only alternative of a 4-bit layer with a branch when it is no larger (the default ``weight_only``)
WEIGHT_ONLY_INT8 = QuantSpec("int8", "channel")
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


def layer_format(spec: QuantSpec | None, channels: int, is_act: bool) -> QuantSpec | None:
    """What ``spec`` becomes on a layer of ``channels`` inputs: :func:`fit_group`, else one scale per
    row (weights: per channel, activations: per token); None stays None."""
    fitted = fit_group(spec, channels)
    return fitted if fitted is not None or spec is None else _row_spec(spec, is_act)


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


def _weight_only_format(recipe: Recipe, mod: nn.Module, ch: LayerChoice) -> QuantSpec | None:
    """The weight format of a weight-only layer: ``recipe.weight_only`` when set; else int8 per
    channel (no branch) when it takes no more bytes than the recipe's weight format with its low-rank
    branch, which it does on narrow layers (digits-dit's adaLN: 768 x 128), else that format and branch
    (FLUX's adaLN: 18432 x 3072, where int8 would be 1.9x the bytes)."""
    if recipe.weight_only is not None or recipe.weight is None:
        return recipe.weight_only or recipe.weight
    n, k = mod.weight.shape[0], mod.weight[0].numel()
    w4 = layer_format(recipe.weight, in_out(mod)[0], is_act=False)
    rank = effective_rank(recipe.rank, n, k, recipe.rank_ratio)
    four_bit = w4.stored_bytes(n, k) + 2 * rank * (n + k)
    if WEIGHT_ONLY_INT8.stored_bytes(n, k) <= four_bit:
        ch.decisions["weight_only"] = f"int8 per channel: no more bytes than {w4.describe()} + rank {rank}"
        return WEIGHT_ONLY_INT8
    return recipe.weight


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
        # int8 weights for the skipped roles of int8_weight_roles (the UNets' reference 16-bit set)
        w8 = plan is None and not forced and role in recipe.skip_roles and role in recipe.int8_weight_roles
        w_only = (role in weight_only or w8) and not forced
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
        w = WEIGHT_ONLY_INT8 if w8 else _weight_only_format(recipe, mod, ch) if w_only else layer_recipe.weight
        if w is None:
            ch.skip = "recipe has no weight format"
            continue
        ch.weight = layer_format(w, cin, is_act=False)
        a = None if w_only else layer_recipe.act
        ch.act = layer_format(a, cin, is_act=True)
        if ch.weight is not None and ch.weight.packed and cin % pack_multiple(ch.weight.bits):
            m = pack_multiple(ch.weight.bits)
            ch.skip = f"input width {cin} cannot be bit-packed at {ch.weight.bits} bits (needs a multiple of {m})"
            continue
        ch.rank = 0 if w_only and ch.weight.bits >= 8 else layer_recipe.rank  # 8-bit weights need no branch
        ch.smooth_alpha = None if w_only else layer_recipe.smooth_alpha
        ch.recipe = layer_recipe
    return out
