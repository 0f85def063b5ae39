"""Timestep groups: which denoising steps share one static activation range.

Activation ranges drift across steps (Q-Diffusion, TDQ). One range for all steps clips some steps
and wastes grid at others; one per step costs a table per layer. Groups are contiguous runs of
steps: ``auto`` grows a group while ``max/min`` of its per-step ranges stays under ``1 + threshold``;
a fixed count N uses the contiguous partition that minimises the wasted bits
``Σ_t log2(range_group / range_t)`` (dynamic programming, exact).
"""

from __future__ import annotations

import math

import torch

from diffq.modules.timestep import NUM_BUCKETS


def auto_groups(ranges: list[float], threshold: float) -> list[int]:
    """Per-step group ids from per-step ranges (steps in denoising order)."""
    ids, g = [], 0
    lo = hi = None
    for r in ranges:
        r = max(r, 1e-12)
        if lo is None:
            lo = hi = r
        else:
            nlo, nhi = min(lo, r), max(hi, r)
            if nhi / nlo > 1.0 + threshold:
                g += 1
                nlo = nhi = r
            lo, hi = nlo, nhi
        ids.append(g)
    return ids


def fixed_groups(ranges: list[float], n: int) -> list[int]:
    """Optimal contiguous partition of the steps into at most ``n`` groups."""
    t = len(ranges)
    n = max(1, min(n, t))
    lr = [math.log2(max(r, 1e-12)) for r in ranges]

    def cost(i: int, j: int) -> float:  # steps i..j-1 in one group
        m = max(lr[i:j])
        return sum(m - v for v in lr[i:j])

    inf = float("inf")
    best = [[inf] * (t + 1) for _ in range(n + 1)]
    arg = [[0] * (t + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(1, t + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + cost(i, j)
                if c < best[k][j]:
                    best[k][j], arg[k][j] = c, i
    k = min(range(1, n + 1), key=lambda kk: best[kk][t])
    ids = [0] * t
    j = t
    while k > 0:
        i = arg[k][j]
        for s in range(i, j):
            ids[s] = k - 1
        j, k = i, k - 1
    return ids


def bucket_table(step_buckets: list[int], step_groups: list[int]) -> torch.Tensor:
    """[NUM_BUCKETS] int16: each timestep bucket -> group of the calibrated step nearest to it."""
    b = torch.tensor(step_buckets, dtype=torch.float64)
    allb = torch.arange(NUM_BUCKETS, dtype=torch.float64)
    nearest = (allb[:, None] - b[None, :]).abs().argmin(1)
    return torch.tensor(step_groups, dtype=torch.int16)[nearest]
