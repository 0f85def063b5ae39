"""SmoothQuant: migrate activation outliers into the weights with a per-input-channel factor.

``s_k = a_k^α / max|W_:,k|^(1-α)``; the layer computes ``(X / s) · (W · s)ᵀ``, which is exact
in full precision, while both factors are easier to quantize. ``a_k`` is the channel's activation
range from calibration (:func:`channel_profile`: the abs-max over all steps, or a timestep-balanced
profile). Factors are clamped to ``[1e-5, 1e5]`` so a dead channel cannot produce an infinite scale.
"""

from __future__ import annotations

import torch

from diffq.formats import abs_max

PROFILES = ("max", "balanced")


def channel_profile(absmax: torch.Tensor, observed: torch.Tensor, kind: str = "max") -> torch.Tensor:
    """Per-input-channel activation range [C] from per-step abs-maxima ``absmax`` [T, C].

    ``max``: the abs-max over every observed step (one number per channel, dominated by the steps
    with the largest activations). ``balanced``: each step's channel profile divided by that step's
    largest channel, averaged over the observed steps with equal weight, times the mean of those
    largest channels: which channels are outliers is decided by every step equally, so a few
    high-noise steps whose activations are ten times larger cannot set the smoothing of the whole
    trajectory (the spirit of PTQ4DiT's salience balancing / ViDiT-Q's timestep-aware channel
    balancing, with one static factor per channel).
    """
    a = absmax[observed].float() if bool(observed.any()) else absmax.float()
    if kind == "max":
        return a.amax(0)
    if kind != "balanced":
        raise ValueError(f"unknown channel profile {kind!r}; use one of {PROFILES}")
    top = a.amax(1, keepdim=True).clamp_min(1e-12)  # [T', 1]
    return (a / top).mean(0) * top.mean()


def smooth_factors(act_absmax: torch.Tensor, weight_rows: torch.Tensor, alpha: float, in_channels: int, *,
                   weight_max: torch.Tensor | None = None) -> torch.Tensor:
    """act_absmax: [Cin] from calibration; weight_rows: [N, kh·kw·Cin] (channel-fastest) -> s [Cin] fp32.
    weight_max: :func:`weight_absmax` of ``weight_rows`` when already known (a search over α)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    w = weight_absmax(weight_rows, in_channels) if weight_max is None else weight_max
    a = act_absmax.float().clamp_min(1e-5)
    s = a.pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)
    return s.clamp(1e-5, 1e5)


def weight_absmax(weight_rows: torch.Tensor, in_channels: int) -> torch.Tensor:
    """max |W| per input channel [Cin] of rows [N, kh·kw·Cin] (channel-fastest)."""
    return abs_max(weight_rows.float().reshape(weight_rows.shape[0], -1, in_channels), dim=(0, 1))


def apply_smoothing(weight_rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W' = W · s along input channels (rows are [N, kh·kw·Cin], channel-fastest)."""
    n, k = weight_rows.shape
    cin = s.numel()
    return (weight_rows.float().reshape(n, k // cin, cin) * s).reshape(n, k)
