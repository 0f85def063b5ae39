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
from diffq.formats import QTensor, QuantSpec, int_range, quantize, rtn_values
from diffq.formats.floating import FP_MAX
from diffq.methods.gptq import dynamic_groups, gptq_quantize
from diffq.methods.lowrank import effective_rank, lowrank_split, refit_lowrank
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
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice, fit_group


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


def _rtn(w: torch.Tensor, spec: QuantSpec, recipe: Recipe) -> QTensor:
    """Round-to-nearest with the recipe's clipping: the weight grid (and the codes without GPTQ)."""
    return quantize(w, spec, clip_ratio=clip_ratio_for(w, spec, recipe.weight_clip, recipe.percentile))


@torch.no_grad()
def build_layer(
    choice: LayerChoice,
    stats: CalibrationStats | None,
    splits: tuple[int, int] | None = None,
    floor: float | None = None,
) -> QuantLinear | QuantConv2d:
    """Quantized replacement of ``choice.module`` (which is left untouched).

    splits: (main, skip) channel widths when the layer's input is a concatenation (split shortcut).
    floor: a structural lower bound of the layer's input (:mod:`diffq.pipelines.input_bounds`).
    Records its choices in ``choice.decisions``.
    """
    mod, recipe, name = choice.module, choice.recipe, choice.name
    dtype, dev = mod.weight.dtype, mod.weight.device
    w = _weight_rows(mod).float()
    cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    st = None if stats is None else stats.layers.get(name)
    floor = floor if floor is not None else input_floor(name, {}, stats)
    rank = effective_rank(choice.rank, w.shape[0], w.shape[1], recipe.rank_ratio)
    balance = recipe.timestep_balance

    def wq_values(r: torch.Tensor) -> torch.Tensor:
        """deq(_rtn(r)) without the codes (bit-identical: diffq.formats.rtn_values)."""
        spec = choice.weight
        return rtn_values(r, spec, clip_ratio=clip_ratio_for(r, spec, recipe.weight_clip, recipe.percentile))

    smooth = None
    if choice.smooth_alpha is not None and st is not None:
        profile = channel_profile(st.absmax, st.observed, "balanced" if balance else "max").to(dev)
        alpha = choice.smooth_alpha
        if recipe.smooth_search:
            x, rw = (t.to(dev) for t in layer_samples(name, stats, balance=balance, total=SEARCH_ROWS,
                                                       why="the smoothing-strength search", patches=True))

            def act_values(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                act = build_act_quantizer(choice, recipe, stats, splits, floor=floor, smooth=s)
                return x_s if act is None else act(x_s)

            def search_values(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return wq_values(r)

            found = search_alpha(w, profile, x, rw, rank=rank, weight_values=search_values, act_values=act_values,
                                 grid=recipe.smooth_grid)
            alpha = found.alpha
            choice.decisions["alpha_errors"] = found.errors
        choice.decisions["alpha"] = alpha
        smooth = smooth_factors(profile, w, alpha, cin)
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
    elif rank > 0:
        lr_down, lr_up, w = lowrank_split(w, rank)
    gptq = recipe.rounding == "gptq"
    # GPTQ with dynamic groups picks each group's clipping itself: a min-max grid is enough to start
    q = quantize(w, choice.weight) if gptq and dynamic_groups(choice.weight, recipe.gptq_act_order) \
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
) -> dict[str, QuantLinear | QuantConv2d]:
    """Build every non-skipped choice, give its activation quantizer ``tracker``, swap it into
    ``root`` (the dense module is replaced, not modified); returns name -> new module.

    progress: an optional callback called once per choice (a progress bar's ``update``)."""
    floors = input_floors(root)
    built = {}
    for ch in choices:
        if ch.skip is None:
            new = build_layer(ch, stats, splits.get(ch.name), input_floor(ch.name, floors, stats))
            if new.act is not None:
                new.act.tracker = tracker
            set_submodule(root, ch.name, new)
            built[ch.name] = new
        if progress is not None:
            progress()
    return built
