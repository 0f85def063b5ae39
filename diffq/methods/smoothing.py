"""SmoothQuant: migrate activation outliers into the weights with a per-input-channel factor.

``s_k = max|X_k|^α / max|W_:,k|^(1-α)``; the layer computes ``(X / s) · (W · s)ᵀ``, which is exact
in full precision, while both factors are easier to quantize. Factors are clamped to
``[1e-5, 1e5]`` so a dead channel cannot produce an infinite scale.
"""

from __future__ import annotations

import torch


def smooth_factors(act_absmax: torch.Tensor, weight_rows: torch.Tensor, alpha: float, in_channels: int) -> torch.Tensor:
    """act_absmax: [Cin] from calibration; weight_rows: [N, kh·kw·Cin] (channel-fastest) -> s [Cin] fp32."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    w = weight_rows.float().abs().reshape(weight_rows.shape[0], -1, in_channels).amax(dim=(0, 1))
    a = act_absmax.float().clamp_min(1e-5)
    s = a.pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)
    return s.clamp(1e-5, 1e5)


def apply_smoothing(weight_rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W' = W · s along input channels (rows are [N, kh·kw·Cin], channel-fastest)."""
    n, k = weight_rows.shape
    cin = s.numel()
    return (weight_rows.float().reshape(n, k // cin, cin) * s).reshape(n, k)
