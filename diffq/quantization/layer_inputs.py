"""What a layer's quantization needs to know about its inputs: calibration rows (for GPTQ, the
smoothing-strength search and the low-rank refit) and a lower bound (for unsigned activations)."""

from __future__ import annotations

import torch

from diffq.calibration.container import CalibrationStats
from diffq.errors import CalibrationError

#: calibration rows (over all steps) that score one candidate of the α search or of the low-rank refit
SEARCH_ROWS = 512


def layer_samples(
    name: str, stats: CalibrationStats | None, *, balance: bool, total: int | None = None, why: str = "GPTQ",
    patches: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n, C] fp32, weights [n]) of layer ``name``'s calibration inputs, every step weighted
    equally (:meth:`~diffq.calibration.reservoir.InputReservoir.weighted_rows`); ``total`` caps the
    rows, spread evenly over the steps. ``patches``: a kh x kw conv's im2col patches [n, kh·kw·Cin]
    when the statistics hold them (else its per-pixel rows [n, Cin]). Raises CalibrationError naming
    the layer and the fix when the statistics hold no rows for it."""
    res = None if stats is None else (stats.patches.get(name) if patches else None) or stats.reservoirs.get(name)
    if res is not None:
        steps = int((res.count > 0).sum())
        per_step = None if total is None else max(1, total // max(steps, 1))
        x, w = res.weighted_rows(balance=balance, per_step=per_step)
        if x.shape[0]:
            return x, w
    where = "no calibration statistics" if stats is None else "calibration statistics without input rows for it"
    raise CalibrationError(
        f"{why} for layer {name!r} needs real input rows, and it got {where}; calibrate with "
        f"diffq.calibrate(pipe, prompts, reservoir=256) (or `diffq calibrate --reservoir 256`), "
        f"or set rounding=rtn / smooth_search=false"
    )


def input_floor(name: str, floors: dict[str, float], stats: CalibrationStats | None) -> float | None:
    """Lower bound of layer ``name``'s input: from the model's structure (``floors``,
    :func:`diffq.pipelines.input_bounds.input_floors`), else 0 when every calibration input was
    non-negative, else None."""
    if name in floors:
        return floors[name]
    st = None if stats is None else stats.layers.get(name)
    if st is not None and bool(st.observed.any()) and float(st.minv[st.observed].min()) >= 0.0:
        return 0.0
    return None
