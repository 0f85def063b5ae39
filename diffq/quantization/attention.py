"""The recipe's ``attn*`` fields applied to a denoiser: quantized attention processors installed,
one :class:`~diffq.quantization.summary.AttentionSummary` per attention module (used by
``diffq.quantize`` and ``diffq.load``)."""

from __future__ import annotations

from torch import nn

from diffq.attention import attention_modules, install_attention
from diffq.attention.spec import format_label
from diffq.errors import CalibrationError
from diffq.quantization.recipe import Recipe
from diffq.quantization.summary import AttentionSummary


def apply_attention(denoiser: nn.Module, recipe: Recipe, calibration=None, *,
                    names: list[str] | None = None) -> list[AttentionSummary]:  # fmt: skip
    """Install the recipe's attention quantization (nothing for ``attn="none"``). ``calibration``:
    statistics with measured attention errors (``calibrate(attention_operands=True)``), whose mean
    relative error per module for this format goes into the summary (and which ``attn_max_error``
    needs). ``names``: quantize exactly these modules (what a checkpoint recorded) instead of
    choosing them again."""
    fmt = recipe.attention_format()
    if fmt is None:
        return []
    label = format_label(fmt)
    if names is not None:
        too_large = {n: "not quantized in the checkpoint" for n in attention_modules(denoiser) if n not in names}
    elif recipe.attn_max_error is not None:
        too_large = _over_error_budget(recipe, calibration, label)
    else:
        too_large = {}
    choices = install_attention(denoiser, fmt, skip_roles=recipe.attn_skip_roles,
                                skip_patterns=recipe.attn_skip_patterns, skip_names=too_large)
    rows = []
    for ch in choices:
        err = None
        if calibration is not None and ch.skip is None:
            err = calibration.mean_attention_error(ch.name, label)
        rows.append(AttentionSummary(ch.name, ch.kind, list(ch.roles), ch.processor, ch.format, ch.skip, err))
    return rows


def _over_error_budget(recipe: Recipe, calibration, label: str) -> dict[str, str]:
    """Modules whose calibrated error under ``label`` exceeds ``recipe.attn_max_error`` at their
    worst recorded step -> the reason they stay in 16 bits."""
    if calibration is None or not calibration.attention_error:
        raise CalibrationError(
            f"recipe {recipe.name!r} sets attn_max_error, which needs attention errors measured by calibration; "
            f"pass calibration=diffq.calibrate(pipe, prompts, attention_operands=True)"
        )
    if label not in calibration.attention_formats:
        raise CalibrationError(f"calibration measured {calibration.attention_formats}, not {label!r}; "
                               f"re-run diffq.calibrate(..., attention_operands=True) with this diffq")
    out = {}
    for name in calibration.attention_error:
        err = calibration.attention_relative_error(name, label)
        worst = float(err[~err.isnan()].max()) if bool((~err.isnan()).any()) else 0.0
        if worst > recipe.attn_max_error:
            out[name] = f"error {worst:.3g} > {recipe.attn_max_error:g}"
    return out
