"""Where the activation scale for step t comes from.

From a layer's per-step statistics: choose the timestep groups (:mod:`grouping`), take each
group's clipped range (:mod:`range_clipping`, per channel segment for split shortcuts), and build the
bucket -> group table that the ActQuantizer looks up at inference.
"""

from __future__ import annotations

import torch

from diffq.calibration.container import CalibrationStats
from diffq.calibration.grouping import auto_groups, bucket_table, fixed_groups
from diffq.calibration.range_clipping import choose_range, hist_mse


def step_groups(stats: CalibrationStats, name: str, groups: int | None, threshold: float) -> tuple[list[int], list[int]]:
    """(observed step indices, their group ids) for layer ``name``."""
    st = stats.layers[name]
    steps = [s for s in stats.observed_steps() if bool(st.observed[s])]
    ranges = [float(st.absmax[s].max()) for s in steps]
    ids = auto_groups(ranges, threshold) if groups is None else fixed_groups(ranges, groups)
    return steps, ids


def timestep_act_ranges(
    stats: CalibrationStats,
    name: str,
    *,
    qmax: int,
    groups: int | None = None,
    threshold: float = 0.25,
    method: str = "minmax",
    percentile: float = 99.9,
    splits: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static ranges of layer ``name``: (amax [G, S] fp32, bucket_to_group [NUM_BUCKETS] int16).

    S is 1, or the number of channel segments in ``splits``. Each group's range is the clip value
    of its merged histogram; segments scale it by their share of the group's max.
    """
    st = stats.layers[name]
    steps, ids = step_groups(stats, name, groups, threshold)
    n_groups = max(ids) + 1
    seg = list(splits) if splits else [st.absmax.shape[1]]
    bounds = torch.tensor([0] + seg).cumsum(0).tolist()
    amax = torch.zeros(n_groups, len(seg))
    for g in range(n_groups):
        members = [s for s, i in zip(steps, ids) if i == g]
        ch = st.absmax[members].amax(0)  # [C]
        full = float(ch.max())
        clip = choose_range(st.hist[members].sum(0), full, qmax, method, percentile)
        ratio = clip / full if full > 0 else 1.0
        for k in range(len(seg)):
            amax[g, k] = float(ch[bounds[k] : bounds[k + 1]].max()) * ratio
    table = bucket_table([stats.step_buckets[s] for s in steps], ids)
    return amax, table


def grouping_mse(stats: CalibrationStats, name: str, bits: int, groups: int | None, threshold: float = 0.25) -> float:
    """Mean over observed steps of the expected activation MSE with min-max ranges per group."""
    st = stats.layers[name]
    qmax = 2 ** (bits - 1) - 1
    steps, ids = step_groups(stats, name, groups, threshold)
    group_max: dict[int, float] = {}
    for s, g in zip(steps, ids):
        group_max[g] = max(group_max.get(g, 0.0), float(st.absmax[s].max()))
    errs = [hist_mse(st.hist[s], float(st.absmax[s].max()), group_max[g], qmax) for s, g in zip(steps, ids)]
    return sum(errs) / max(len(errs), 1)
