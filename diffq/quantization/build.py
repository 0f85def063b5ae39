"""Turn dense layers into their quantized modules and swap them in.

One layer: smoothing -> low-rank split -> clipped weight quantization -> activation quantizer, each
step a pure function from :mod:`diffq.methods`. :func:`install_layers` is the one swap-in loop that
quantization and the sensitivity analysis share."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from diffq.calibration.act_scales import timestep_act_ranges
from diffq.calibration.container import CalibrationStats
from diffq.formats import int_range, quantize
from diffq.formats.floating import FP_MAX
from diffq.methods.lowrank import effective_rank, lowrank_split
from diffq.methods.smoothing import apply_smoothing, smooth_factors
from diffq.methods.weight_clipping import clip_ratio_for
from diffq.modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    TimestepTracker,
    conv_weight_rows,
    set_submodule,
)
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice, fit_group


def _weight_rows(mod: nn.Module) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return conv_weight_rows(mod.weight.detach())
    return mod.weight.detach()


def _qmax(spec) -> int:
    return int_range(spec)[1] if spec.is_int else int(FP_MAX[spec.dtype])


def build_act_quantizer(
    choice: LayerChoice, recipe: Recipe, stats: CalibrationStats | None, splits: tuple[int, int] | None
) -> ActQuantizer | None:
    if choice.act is None:
        return None
    use_splits = splits if recipe.split_shortcut else None
    spec = choice.act
    if use_splits and spec.granularity == "group":
        # groups must not straddle the main/skip boundary
        spec = fit_group(spec, math.gcd(*use_splits)) or replace(spec, granularity="token", group_size=None)
    if not recipe.act_static:
        return ActQuantizer(spec, splits=use_splits)
    amax, table = timestep_act_ranges(
        stats, choice.name, qmax=_qmax(choice.act), groups=recipe.timestep_groups,
        threshold=recipe.group_threshold, method=recipe.act_clip, percentile=recipe.percentile, splits=use_splits,
    )
    return ActQuantizer(spec, splits=use_splits, amax=amax, bucket_to_group=table)


@torch.no_grad()
def build_layer(
    choice: LayerChoice, stats: CalibrationStats | None, splits: tuple[int, int] | None = None
) -> QuantLinear | QuantConv2d:
    """Quantized replacement of ``choice.module`` (which is left untouched).

    splits: (main, skip) channel widths when the layer's input is a concatenation (split shortcut).
    """
    mod, recipe = choice.module, choice.recipe
    dtype = mod.weight.dtype
    w = _weight_rows(mod).float()
    cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
    smooth = None
    if choice.smooth_alpha is not None and stats is not None and choice.name in stats.layers:
        smooth = smooth_factors(stats.layers[choice.name].channel_absmax(), w, choice.smooth_alpha, cin)
        w = apply_smoothing(w, smooth)
    lr_down = lr_up = None
    r = effective_rank(choice.rank, w.shape[0], w.shape[1])
    if r > 0:
        lr_down, lr_up, w = lowrank_split(w, r)
    ratio = clip_ratio_for(w, choice.weight, recipe.weight_clip, recipe.percentile)
    q = quantize(w, choice.weight, clip_ratio=ratio)
    act = build_act_quantizer(choice, recipe, stats, splits)
    bias = None if mod.bias is None else mod.bias.detach()
    common = {"bias": bias, "act": act, "lr_down": lr_down, "lr_up": lr_up, "smooth": smooth, "dtype": dtype}
    if isinstance(mod, nn.Conv2d):
        new = QuantConv2d(
            q, in_channels=cin, kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding,
            dilation=mod.dilation, **common,
        )
    else:
        new = QuantLinear(q, **common)
    return new.to(mod.weight.device)


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
    built = {}
    for ch in choices:
        if ch.skip is None:
            new = build_layer(ch, stats, splits.get(ch.name))
            if new.act is not None:
                new.act.tracker = tracker
            set_submodule(root, ch.name, new)
            built[ch.name] = new
        if progress is not None:
            progress()
    return built
