"""Activation ranges from histograms: min-max, percentile, or MSE-optimal clipping.

For a symmetric b-bit grid with clip value c, the expected squared error of a value v is
``(c / qmax)² / 12`` when |v| <= c (uniform rounding error) and ``(|v| - c)²`` beyond. Summed over
the histogram this gives the MSE of any c without revisiting the data; the best c is searched on
a grid of fractions of the max.
"""

from __future__ import annotations

import torch

from diffq.calibration.stats import bin_centers


def hist_mse(hist: torch.Tensor, amax: float, clip: float, qmax: int) -> float:
    """Expected quantization MSE of the histogram ``hist [B]`` for clip value ``clip``."""
    v = bin_centers().clamp(max=amax)
    step = clip / qmax
    inside = (v <= clip).double()
    err = inside * (step**2 / 12) + (1 - inside) * (v - clip) ** 2
    n = hist.sum().clamp_min(1)
    return float((hist * err).sum() / n)


def choose_range(hist: torch.Tensor, amax: float, qmax: int, method: str, percentile: float = 99.9) -> float:
    """Clip value for a histogram of |x| with observed max ``amax``."""
    if amax <= 0:
        return 0.0
    if method == "minmax":
        return amax
    if method == "percentile":
        cdf = hist.cumsum(0) / hist.sum().clamp_min(1)
        idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype)))
        idx = min(idx, hist.numel() - 1)
        return float(min(bin_centers()[idx], amax))
    if method == "mse":
        best_c, best = amax, float("inf")
        for i in range(40):
            c = amax * (1.0 - i * 0.02)
            e = hist_mse(hist, amax, c, qmax)
            if e < best:
                best, best_c = e, c
        return best_c
    raise ValueError(f"unknown clip method {method!r}")
