"""Choosing the clipping range: min-max, percentile, or the ratio that minimises MSE.

Clipping trades a larger error on rare outliers for a finer grid on everything else; at 4 bits
the MSE-optimal ratio is typically 0.7-0.9 of the max for Gaussian-like weights.
"""

from __future__ import annotations

import torch

from diffq.formats import QuantSpec, abs_max, grid_values, range_grid
from diffq.methods.threads import one_thread

CLIP_METHODS = ("minmax", "mse", "percentile")
#: weight clipping also has ``mse-coarse``: the coarse pass of the MSE search only (6 ratios, 1.0 .. 0.5
#: in steps of 0.1, instead of 10 evaluations down to steps of 0.025): 40% less work per group
WEIGHT_CLIP_METHODS = (*CLIP_METHODS, "mse-coarse")
MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


#: elements of one candidate-stacked chunk: on a CPU large enough that the ~30 small ops per chunk
#: (ranges, fp16 scale rounding, argmin, the fine candidates) cost little next to its passes over
#: the stack, small enough for the shared L3 cache (4 MB per temporary). Measured on this project's
#: 2-core VM with two layers at once (workers=2): a [1024 x 3072] residual's search 92 -> 67 ms and
#: a [12288 x 64] GPTQ group's 26 -> 23 ms from 2^18 to 2^20; 2^22 is slower again. On a GPU, large
#: enough to fill it. Chunks split rows only: the result does not depend on the size.
CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 26


def mse_clip_ratio(
    w: torch.Tensor, spec: QuantSpec, grid: tuple[float, ...] = MSE_GRID, importance: torch.Tensor | None = None,
    refine: bool = True,
) -> torch.Tensor:
    """Per-scale-group clip ratio in ``grid`` minimising the group's squared error.

    Coarse to fine: every 4th grid point first, then the grid points within two steps of each
    group's best coarse ratio (10 candidates instead of 21 for the default grid). The error curve of
    a group is close to unimodal in the ratio, so this lands on the exhaustive optimum or next to it
    (tests/test_formats.py compares both); ``refine=False`` stops after the coarse pass (clip method
    ``mse-coarse``: 6 candidates). Each pass evaluates all its candidates at once on a chunk of rows
    (one candidate-stacked tensor of at most ``CHUNK_ELEMENTS``), so the work is a few large tensor
    ops per chunk, on ``w``'s device, with the exact scale rule of :func:`diffq.formats.range_grid`
    (fp16 / E4M3 scale rounding included).

    w: [R, C] float; importance: optional per-column weights [C] of the squared error (e.g. the
    diagonal of the input Hessian: output error instead of weight error). Returns ratios
    broadcastable to the scale shape ``[R|1, groups|1]``.
    """
    w = w.float()
    xg = _grouped(w, spec)  # [R', G, g]
    imp = None
    if importance is not None:
        if spec.granularity == "tensor":
            raise ValueError("per-column importance needs per-row or per-group scales, not one per tensor")
        imp = importance.float().reshape(1, xg.shape[1], xg.shape[2])
    grid_t = torch.tensor(grid, dtype=torch.float32, device=w.device)
    coarse = grid_t[::4]
    step = float(grid_t[0] - grid_t[1]) if len(grid_t) > 1 else 0.0
    lo_g, hi_g = float(grid_t.min()), float(grid_t.max())
    if spec.is_int and not spec.symmetric:
        lo, hi = xg.amin(-1).clamp(max=0), xg.amax(-1).clamp(min=0)
    else:
        lo, hi = None, abs_max(xg)
    # NVFP4: one global scale for every candidate (that of the unclipped tensor)
    gscale = range_grid(spec, hi, lo)[3]
    out = torch.empty(xg.shape[:2], dtype=torch.float32, device=w.device)
    cpu = w.device.type == "cpu"
    rows = max(1, (CHUNK_ELEMENTS if cpu else GPU_CHUNK_ELEMENTS) // max(1, len(coarse) * xg.shape[1] * xg.shape[2]))
    with one_thread(w.device):  # cache-sized chunks: serial (see diffq.methods.threads)
        for i in range(0, xg.shape[0], rows):
            sl = slice(i, i + rows)
            x = xg[sl]
            lo_c = None if lo is None else lo[sl]
            cand = coarse.expand(*x.shape[:2], len(coarse))
            err, ratio = _best(x, spec, hi[sl], lo_c, cand, gscale, imp)
            if not refine:
                out[sl] = ratio
                continue
            fine = torch.stack([(ratio + k * step).clamp(lo_g, hi_g) for k in (-2, -1, 1, 2)], dim=-1)
            err_f, ratio_f = _best(x, spec, hi[sl], lo_c, fine, gscale, imp)
            out[sl] = torch.where(err_f < err, ratio_f, ratio)
    return out


def _best(x: torch.Tensor, spec: QuantSpec, hi: torch.Tensor, lo: torch.Tensor | None, ratios: torch.Tensor,
          gscale: torch.Tensor | None, imp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [r, G, g], ranges [r, G], candidate ratios [r, G, K] -> (best error, its ratio), each [r, G].

    Candidates are the last-but-one axis of the stacked values [r, G, K, g], so the errors [r, G, K]
    are reduced over a contiguous axis (an argmin over a leading axis is strided: several times slower
    on CPU for these small tensors); the first of equal errors wins, as in a leading-axis argmin."""
    hi, lo = hi.unsqueeze(-1), None if lo is None else lo.unsqueeze(-1)
    scale, _, zero, _ = range_grid(spec, hi * ratios, None if lo is None else lo * ratios, gscale)
    xs = x.unsqueeze(2)  # [r, G, 1, g]
    v = grid_values(xs, scale.unsqueeze(-1), spec, None if zero is None else zero.unsqueeze(-1))
    err = v.sub_(xs).square_()
    err = (err if imp is None else err.mul_(imp.unsqueeze(2))).sum(-1)  # [r, G, K]
    best = err.argmin(-1, keepdim=True)
    return err.gather(-1, best)[..., 0], ratios.gather(-1, best)[..., 0]


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    r, c = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, r * c)
    if spec.granularity == "group":
        return w.reshape(r, c // spec.group_size, spec.group_size)
    return w.reshape(r, 1, c)


def percentile_clip_ratio(w: torch.Tensor, spec: QuantSpec, percentile: float) -> torch.Tensor:
    """Per-group ratio = (percentile of |w|) / max|w|, so that ``1 - percentile/100`` of values clip."""
    a = w.float().abs()
    g = _grouped_abs(a, spec)
    q = torch.quantile(g, percentile / 100.0, dim=-1)
    m = g.amax(-1).clamp_min(1e-30)
    return (q / m).clamp(1e-3, 1.0)


def _grouped_abs(a: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return _grouped(a, spec)


def _per_group(err: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return _grouped_abs(err, spec).sum(-1)


def clip_ratio_for(
    w: torch.Tensor, spec: QuantSpec, method: str, percentile: float = 99.9, importance: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Dispatch on the recipe's clip method; ``None`` means min-max (no clipping)."""
    if method == "minmax":
        return None
    if method in ("mse", "mse-coarse"):
        return mse_clip_ratio(w, spec, importance=importance, refine=method == "mse")
    if method == "percentile":
        return percentile_clip_ratio(w, spec, percentile)
    raise ValueError(f"unknown clip method {method!r}; use one of {WEIGHT_CLIP_METHODS}")
