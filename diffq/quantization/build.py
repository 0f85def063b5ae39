"""Turn dense layers into their quantized modules and swap them in.

One layer: smoothing (fixed or searched strength) -> low-rank split (optionally refit) -> weight
grid by clipped round-to-nearest -> GPTQ rounding on that grid (optional) -> activation quantizer
(signed, or shifted unsigned for inputs bounded below), each step a pure function from
:mod:`diffq.methods`. :func:`install_layers` is the one swap-in loop that quantization and the
sensitivity analysis share."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from diffq.calibration.act_scales import timestep_act_ranges
from diffq.calibration.container import CalibrationStats
from diffq.formats import QTensor, QuantSpec, int_range, quantize, quantize_grid, rtn_values
from diffq.formats.floating import FP_MAX
from diffq.methods.gptq import dynamic_groups, gptq_quantize
from diffq.methods.lowrank import Subspace, effective_rank, lowrank_split, refit_lowrank
from diffq.methods.smooth_search import search_alpha, tap_rows
from diffq.methods.smoothing import apply_smoothing, channel_profile, smooth_factors
from diffq.methods.weight_clipping import clip_ratio_for
from diffq.modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    ShiftedActQuantizer,
    TimestepTracker,
    conv_weight_rows,
    set_submodule,
)
from diffq.pipelines.input_bounds import input_floors
from diffq.quantization.layer_inputs import SEARCH_ROWS, input_floor, layer_samples
from diffq.quantization.projection_groups import projection_groups
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice, fit_group
from diffq.quantization.workers import effective_workers, ordered_map


def _weight_rows(mod: nn.Module) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return conv_weight_rows(mod.weight.detach())
    return mod.weight.detach()


def _qmax(spec) -> int:
    return int_range(spec)[1] if spec.is_int else int(FP_MAX[spec.dtype])


def build_act_quantizer(
    choice: LayerChoice,
    recipe: Recipe,
    stats: CalibrationStats | None,
    splits: tuple[int, int] | None,
    *,
    floor: float | None = None,
    smooth: torch.Tensor | None = None,
) -> ActQuantizer | None:
    """The layer's activation quantizer. With ``recipe.act_unsigned`` and an input bounded below by
    ``floor`` (dynamic integer formats), the unsigned format of the same width on ``x/s - floor/s``."""
    if choice.act is None:
        return None
    use_splits = splits if recipe.split_shortcut else None
    spec = choice.act
    if use_splits and spec.granularity == "group":
        # groups must not straddle the main/skip boundary
        spec = fit_group(spec, math.gcd(*use_splits)) or replace(spec, granularity="token", group_size=None)
    if recipe.act_static:
        amax, table = timestep_act_ranges(
            stats, choice.name, qmax=_qmax(choice.act), groups=recipe.timestep_groups,
            threshold=recipe.group_threshold, method=recipe.act_clip, percentile=recipe.percentile,
            splits=use_splits,
        )
        return ActQuantizer(spec, splits=use_splits, amax=amax, bucket_to_group=table)
    if recipe.act_unsigned and floor is not None and spec.is_int:
        unsigned = replace(spec, dtype=f"uint{spec.bits}")
        if floor >= 0.0:
            return ActQuantizer(unsigned, splits=use_splits)
        cin = choice.module.in_channels if isinstance(choice.module, nn.Conv2d) else choice.module.in_features
        shift = torch.full((cin,), -floor, device=choice.module.weight.device)
        return ShiftedActQuantizer(unsigned, shift if smooth is None else shift / smooth, splits=use_splits)
    # token-sequence (Linear) inputs only: centring conv inputs too cost digits-sd 0.5 dB (validation split)
    center = recipe.act_center and not isinstance(choice.module, nn.Conv2d)
    return ActQuantizer(spec, splits=use_splits, center=center)


def _rtn_values(r: torch.Tensor, spec: QuantSpec, recipe: Recipe, clip: str | None = None) -> torch.Tensor:
    """deq(_rtn(r)) without the codes (bit-identical: diffq.formats.rtn_values); ``clip``: a clip method
    instead of the recipe's ``weight_clip``."""
    return rtn_values(r, spec, clip_ratio=clip_ratio_for(r, spec, clip or recipe.weight_clip, recipe.percentile))


#: (α, smoothing factors s [Cin] fp32, the α search's error per candidate or None, the top-rank
#: subspace (U, S, Vh) of the weight smoothed with α when the search found it for this layer alone)
Smoothing = tuple[float, torch.Tensor, dict[float, float] | None, Subspace | None]


def layer_smoothing(
    choice: LayerChoice,
    stats: CalibrationStats | None,
    w: torch.Tensor,
    rank: int,
    splits: tuple[int, int] | None,
    floor: float | None,
    keep_subspace: bool = False,
) -> Smoothing | None:
    """The smoothing of a layer with weight rows ``w`` [N, kh·kw·Cin] fp32 (None: not smoothed): the
    recipe's fixed α, or the α of the search on the layer's calibration rows (its branch of ``rank``
    and both quantizers in the loop). For projections that read one input (q/k/v), ``w`` is their
    stacked rows and ``rank`` the sum of their ranks (:func:`shared_smoothing`). keep_subspace: return
    the search's subspace of ``w`` smoothed with the chosen α (for this layer's own low-rank split)."""
    recipe, name, mod = choice.recipe, choice.name, choice.module
    st = None if stats is None else stats.layers.get(name)
    if choice.smooth_alpha is None or st is None:
        return None
    dev = w.device
    cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    balance = recipe.timestep_balance
    profile = channel_profile(st.absmax, st.observed, "balanced" if balance else "max").to(dev)
    if recipe.smooth_search:
        x, rw = (t.to(dev) for t in layer_samples(name, stats, balance=balance, total=SEARCH_ROWS,
                                                   why="the smoothing-strength search", patches=True))

        def act_values(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            act = build_act_quantizer(choice, recipe, stats, splits, floor=floor, smooth=s)
            return x_s if act is None else act(x_s)

        found = search_alpha(w, profile, x, rw, rank=rank,
                             weight_values=lambda r, s: _rtn_values(r, choice.weight, recipe, recipe.smooth_clip),
                             act_values=act_values, grid=recipe.smooth_grid, outputs=recipe.smooth_outputs,
                             power_iters=recipe.smooth_power_iters, keep_subspace=keep_subspace)
        return found.alpha, smooth_factors(profile, w, found.alpha, cin), found.errors, found.subspace
    return choice.smooth_alpha, smooth_factors(profile, w, choice.smooth_alpha, cin), None, None


def shared_input_sets(root: nn.Module, choices: list[LayerChoice]) -> list[list[LayerChoice]]:
    """Sets of smoothed linear layers that read one input and that diffusers' ``fuse_qkv_projections``
    fuses (q/k/v of self-attention, k/v of cross-attention, the added q/k/v of joint attention:
    :func:`diffq.quantization.projection_groups.projection_groups`), each with the same formats and
    recipe, so that one smoothing vector serves them all (:func:`shared_smoothing`)."""
    by_name = {c.name: c for c in choices}
    sets = []
    for prefix, attn in root.named_modules():
        for _, parts in projection_groups(attn):
            members = [by_name.get(f"{prefix}.{p}" if prefix else p) for p in parts]
            if any(m is None or m.skip is not None or m.smooth_alpha is None or not isinstance(m.module, nn.Linear)
                   for m in members):
                continue
            m0 = members[0]
            if m0.recipe.shared_smoothing and all(m.recipe == m0.recipe and m.weight == m0.weight and m.act == m0.act
                   and m.smooth_alpha == m0.smooth_alpha and m.module.in_features == m0.module.in_features
                   for m in members[1:]):
                sets.append(members)
    return sets


@torch.no_grad()
def shared_smoothing(members: list[LayerChoice], stats: CalibrationStats | None, floor: float | None) -> Smoothing | None:
    """One smoothing for layers that read one input: the factors from the stacked weights' channel
    maxima and, with the search, the α whose quantized stack (branches as one of the summed rank)
    has the lowest output error on the first member's calibration rows (the input is the same).
    Each layer then divides the same input by the same vector, so the layers can be fused and the
    vector could be folded into the norm before them, as SmoothQuant does."""
    parts = [_weight_rows(m.module) for m in members]
    rank = sum(effective_rank(m.rank, *p.shape, m.recipe.rank_ratio) for m, p in zip(members, parts))
    w = torch.cat([p.float() for p in parts])
    return layer_smoothing(members[0], stats, w, effective_rank(rank, *w.shape, None), None, floor)


def _rtn(w: torch.Tensor, spec: QuantSpec, recipe: Recipe) -> QTensor:
    """Round-to-nearest with the recipe's clipping: the weight grid (and the codes without GPTQ)."""
    return quantize(w, spec, clip_ratio=clip_ratio_for(w, spec, recipe.weight_clip, recipe.percentile))


@torch.no_grad()
def build_layer(
    choice: LayerChoice,
    stats: CalibrationStats | None,
    splits: tuple[int, int] | None = None,
    floor: float | None = None,
    smoothing: Smoothing | None = None,
) -> QuantLinear | QuantConv2d:
    """Quantized replacement of ``choice.module`` (which is left untouched).

    splits: (main, skip) channel widths when the layer's input is a concatenation (split shortcut).
    floor: a structural lower bound of the layer's input (:mod:`diffq.pipelines.input_bounds`).
    smoothing: a smoothing chosen for this layer and the layers sharing its input
    (:func:`shared_smoothing`); None: the layer's own (:func:`layer_smoothing`).
    Records its choices in ``choice.decisions``.
    """
    mod, recipe, name = choice.module, choice.recipe, choice.name
    dtype, dev = mod.weight.dtype, mod.weight.device
    w = _weight_rows(mod).float()
    cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    floor = floor if floor is not None else input_floor(name, {}, stats)
    rank = effective_rank(choice.rank, w.shape[0], w.shape[1], recipe.rank_ratio)
    balance = recipe.timestep_balance

    def wq_values(r: torch.Tensor) -> torch.Tensor:
        """deq(_rtn(r)) without the codes (bit-identical: diffq.formats.rtn_values)."""
        return _rtn_values(r, choice.weight, recipe)

    if smoothing is None:
        smoothing = layer_smoothing(choice, stats, w, rank, splits, floor, keep_subspace=not recipe.lowrank_refit)
    smooth = subspace = None
    if smoothing is not None:
        alpha, smooth, errors, subspace = smoothing
        smooth = smooth.clone()  # a shared smoothing: each layer owns its buffer (safetensors refuses aliases)
        choice.decisions["alpha"] = alpha
        if errors is not None:
            choice.decisions["alpha_errors"] = errors
        w = apply_smoothing(w, smooth)
    lr_down = lr_up = None
    if rank > 0 and recipe.lowrank_refit:
        x, rw = _refit_rows(name, stats, balance, dev)
        x_s = x if smooth is None or x is None else x / smooth.repeat(x.shape[1] // cin)

        def objective(err: torch.Tensor) -> float:
            """Output error of a weight error [N, K'] on the calibration rows (else its Frobenius norm)."""
            if x_s is None:
                return float(err.square().sum())
            return float(((x_s @ tap_rows(err, x_s.shape[1]).t()).square().sum(1) * rw).sum())

        lr_down, lr_up, w = refit_lowrank(w, rank, wq_values, objective, recipe.lowrank_refit)
    elif rank > 0:  # with the subspace the α search found for this smoothing, if it did
        lr_down, lr_up, w = lowrank_split(w, rank, subspace=subspace)
    gptq = recipe.rounding == "gptq"
    # GPTQ with dynamic groups picks each group's scales and codes itself: it needs only the grid's
    # format, shapes and NVFP4 global scale (min-max), not codes
    q = quantize_grid(w, choice.weight) if gptq and dynamic_groups(choice.weight, recipe.gptq_act_order) \
        else _rtn(w, choice.weight, recipe)
    if gptq:
        x, rw = (t.to(dev) for t in layer_samples(name, stats, balance=balance, patches=True))
        xw = x * rw.sqrt()[:, None]  # per-pixel rows [n, Cin] or, for kh x kw convs, patches [n, kh·kw·Cin]
        q = gptq_quantize(w, q, xw if smooth is None else xw / smooth.repeat(x.shape[1] // cin), damp=recipe.gptq_damp,
                          act_order=recipe.gptq_act_order,
                          clip=lambda cols, spec, imp: clip_ratio_for(
                              cols, spec, recipe.weight_clip, recipe.percentile, imp if recipe.gptq_weighted_clip else None))
    act = build_act_quantizer(choice, recipe, stats, splits, floor=floor, smooth=smooth)
    choice.decisions["unsigned_input"] = bool(
        act is not None and recipe.act_unsigned and floor is not None and not act.static and act.spec.is_int
    )
    bias = None if mod.bias is None else mod.bias.detach()
    common = {"bias": bias, "act": act, "lr_down": lr_down, "lr_up": lr_up, "smooth": smooth, "dtype": dtype}
    if isinstance(mod, nn.Conv2d):
        new = QuantConv2d(
            q, in_channels=cin, kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
            dilation=mod.dilation, **common,
        )
    else:
        new = QuantLinear(q, **common)
    return new.to(dev)


def _refit_rows(name: str, stats: CalibrationStats | None, balance: bool, dev) -> tuple:
    """Calibration rows for the refit objective when the statistics have them, else (None, None):
    the refit then scores the weight error itself."""
    if stats is None or name not in stats.reservoirs:
        return None, None
    x, rw = layer_samples(name, stats, balance=balance, total=SEARCH_ROWS, why="the low-rank refit", patches=True)
    return x.to(dev), rw.to(dev)


def install_layers(
    root: nn.Module,
    choices: list[LayerChoice],
    stats: CalibrationStats | None,
    splits: dict[str, tuple[int, int]],
    tracker: TimestepTracker | None,
    progress=None,
    workers: int = 1,
) -> dict[str, QuantLinear | QuantConv2d]:
    """Build every non-skipped choice, give its activation quantizer ``tracker``, swap it into
    ``root`` (the dense module is replaced, not modified); returns name -> new module.

    progress: an optional callback called once per choice (a progress bar's ``update``).
    workers: layers built at once on CPU threads (:mod:`diffq.quantization.workers`; same result as
    one at a time on one intra-op thread). The smoothings shared by several layers are found first."""
    floors = input_floors(root)
    shared: dict[str, list[LayerChoice]] = {}
    for members in shared_input_sets(root, choices) if stats is not None else ():
        shared.update({m.name: members for m in members})
    sets = list({id(members): members for members in shared.values()}.values())
    n = effective_workers(workers, next((ch.module.weight.device for ch in choices if ch.skip is None), "cpu"))
    found: dict[int, Smoothing | None] = {
        id(members): smoothing for members, smoothing in zip(sets, ordered_map(
            lambda members: shared_smoothing(members, stats, input_floor(members[0].name, floors, stats)), sets, n))
    }

    def build(ch: LayerChoice) -> QuantLinear | QuantConv2d | None:
        if ch.skip is not None:
            return None
        members = shared.get(ch.name)
        return build_layer(ch, stats, splits.get(ch.name), input_floor(ch.name, floors, stats),
                           smoothing=None if members is None else found[id(members)])

    built = {}
    for ch, new in zip(choices, ordered_map(build, choices, n)):
        if new is not None:
            if new.act is not None:
                new.act.tracker = tracker
            set_submodule(root, ch.name, new)
            built[ch.name] = new
        if progress is not None:
            progress()
    return built
