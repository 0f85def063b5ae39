"""The recipe's ``attn*`` fields applied to a denoiser: quantized attention processors installed,
one :class:`~diffq.quantization.summary.AttentionSummary` per attention module (used by
``diffq.quantize`` and ``diffq.load``)."""

from __future__ import annotations

from torch import nn

from diffq.attention import install_attention
from diffq.attention.spec import format_label
from diffq.quantization.recipe import Recipe
from diffq.quantization.summary import AttentionSummary


def apply_attention(denoiser: nn.Module, recipe: Recipe, calibration=None) -> list[AttentionSummary]:
    """Install the recipe's attention quantization (nothing for ``attn="none"``). ``calibration``:
    statistics with measured attention errors (``calibrate(attention_operands=True)``), whose mean
    relative error per module for this format goes into the summary."""
    fmt = recipe.attention_format()
    if fmt is None:
        return []
    choices = install_attention(denoiser, fmt, skip_roles=recipe.attn_skip_roles,
                                skip_patterns=recipe.attn_skip_patterns)
    label = format_label(fmt)
    rows = []
    for ch in choices:
        err = None
        if calibration is not None and ch.skip is None:
            err = calibration.mean_attention_error(ch.name, label)
        rows.append(AttentionSummary(ch.name, ch.kind, list(ch.roles), ch.processor, ch.format, ch.skip, err))
    return rows
