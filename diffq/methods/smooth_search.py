"""Per-layer smoothing strength: the α whose quantized layer is closest to the dense one on real inputs.

For a smoothing strength α the layer computes ``Q_a(x/s) · Q(R)ᵀ + (x/s) · L`` with ``s = s(α)``,
``W·s = L + R`` (low-rank split, rank 0 = none) and both quantizers as built; its output error against
``x · Wᵀ`` is ``(x/s) · Rᵀ - Q_a(x/s) · Q(R)ᵀ`` (the branch cancels: it sees the unquantized input).
:func:`search_alpha` scores every α of a grid by that error on calibration rows (weighted per row,
so that every timestep counts equally) and returns the lowest point of a quadratic fit of the scores
(:func:`pick_alpha`). A kh x kw conv is scored tap by tap
(``R`` viewed as ``[N·kh·kw, Cin]`` against per-pixel rows): the cross-tap terms of the true conv
error are dropped, the same approximation as GPTQ's per-tap Hessian (:mod:`diffq.methods.gptq`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffq.methods.lowrank import (
    POWER_ITERS,
    Subspace,
    randomized_subspace,
    top_subspace,
    transpose_for_products,
    warm_start,
)
from diffq.methods.smoothing import smooth_factors, weight_absmax

ALPHA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class AlphaSearch:
    """Result of a search: the chosen α, the weighted output error of every candidate and, when asked
    for (``keep_subspace``), the top-``rank`` subspace of the weight smoothed with the chosen α (the
    one its candidate was scored with: the layer's low-rank split can take it instead of a new one)."""

    alpha: float
    errors: dict[float, float]
    subspace: Subspace | None = None


def output_error(x_s: torch.Tensor, xq: torch.Tensor, r: torch.Tensor, rq: torch.Tensor,
                 row_weight: torch.Tensor) -> float:
    """Σ_rows w_row ‖x_s Rᵀ - xq Rqᵀ‖², with R/Rq [N', Cin] (taps folded into rows) and rows [n, Cin]."""
    return weighted_square_sum(x_s @ r.t() - xq @ rq.t(), row_weight)


def weighted_square_sum(d: torch.Tensor, row_weight: torch.Tensor) -> float:
    """Σ_rows w_row ‖d_row‖² of an output difference d [n, N']."""
    return float((d.square().sum(1) * row_weight).sum())


def tap_rows(w: torch.Tensor, cin: int) -> torch.Tensor:
    """[N, kh·kw·Cin] -> [N·kh·kw, Cin]: one row per (output channel, tap)."""
    return w.reshape(-1, cin)


#: output channels that score a candidate (a fixed seeded subset; the error is a sum over them)
SEARCH_OUTPUTS = 512
#: power iterations of the range finder for each candidate after the first, which starts from the
#: previous candidate's subspace (a nearby smoothing of the same weight); the first takes
#: :data:`diffq.methods.lowrank.POWER_ITERS` from a random start
WARM_POWER_ITERS = 1


@torch.no_grad()
def search_alpha(
    w: torch.Tensor,
    profile: torch.Tensor,
    x: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    rank: int,
    weight_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    act_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grid: tuple[float, ...] = ALPHA_GRID,
    outputs: int = SEARCH_OUTPUTS,
    power_iters: int = WARM_POWER_ITERS,
    keep_subspace: bool = False,
) -> AlphaSearch:
    """Best smoothing strength of one layer.

    w: weight rows [N, kh·kw·Cin] fp32; profile: activation range per channel [Cin]; x: calibration
    input rows [n, Cin] fp32 (per pixel for convs) or im2col patches [n, kh·kw·Cin], with weights
    ``row_weight`` [n]; rank: low-rank branch rank (0 = none);
    weight_values(R, s) -> deq(Q(R)) (the layer's weight quantizer for smoothing factors ``s``, applied
    to rows of R: every format's scales are per row or per group within a row, and GPTQ treats rows
    independently, so a subset of rows quantizes as in the whole);
    act_values(x_s, s) -> deq(Q_a(x_s)) (its activation quantizer, which may depend on the factors,
    e.g. for shifted unsigned inputs).

    Cost per candidate: the top-``rank`` subspace of the whole smoothed weight (a randomized range
    finder warm-started from the previous candidate's, with ``power_iters`` power iterations; large
    weights only, small ones take a full SVD), then the quantization and the error on at most
    ``outputs`` output channels (a fixed seeded subset; the error is a sum over channels).
    keep_subspace: also return the chosen candidate's subspace (:class:`AlphaSearch`).
    """
    cin = profile.numel()
    taps = x.shape[1] // cin  # 1: per-pixel rows (conv taps folded into rows); kh·kw: im2col patches
    n_out = w.shape[0]
    rows = None
    if n_out > outputs:
        gen = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randperm(n_out, generator=gen)[:outputs].sort().values.to(w.device)
    errors: dict[float, float] = {}
    start = None
    w_max = weight_absmax(w, cin)  # the weight side of every candidate's factors
    # With one input row per weight row (linears, im2col patches) x_s · (W·s)ᵀ = x · Wᵀ whatever α:
    # the dense part of every candidate's error is computed once, the branch's part through its
    # factors (rank r instead of K), and each candidate costs one large product instead of two.
    direct = x.shape[1] == w.shape[1]
    w_out = w if rows is None else w[rows]  # the scored output channels [outputs, K], gathered once
    dense = x @ w_out.t() if direct else None  # [n, outputs]
    w_t = transpose_for_products(w) if rank > 0 and randomized_subspace(w, rank) else None  # one copy for every candidate
    subspaces: dict[float, Subspace] = {}
    for alpha in grid:
        s = smooth_factors(profile, w, alpha, cin, weight_max=w_max)
        col = s.repeat(w.shape[1] // cin)  # W·s = W · diag(col) (rows channel-fastest), never materialised
        sub = w_out * col
        us = None
        if rank > 0:
            u, sv, vh = top_subspace(w, rank, start=warm_start(start, w, rank),
                                     iters=power_iters if start is not None else POWER_ITERS, col_scale=col, w_t=w_t)
            start = vh.t() * sv.sqrt()
            if keep_subspace:
                subspaces[alpha] = (u, sv, vh)
            us = (u if rows is None else u[rows]) * sv
            r = sub - us @ vh
        else:
            r = sub
        rq = weight_values(r, s)
        x_s = x / s.repeat(taps)
        xq = act_values(x_s.reshape(-1, cin), s).reshape(x_s.shape)  # activations are quantized per pixel
        if direct:
            exact = dense if us is None else dense - (x_s @ vh.t()) @ us.t()  # x_s · Rᵀ
            errors[alpha] = weighted_square_sum(exact - xq @ rq.t(), row_weight)
        else:
            errors[alpha] = output_error(x_s, xq, tap_rows(r, x.shape[1]), tap_rows(rq, x.shape[1]), row_weight)
    alpha = pick_alpha(errors)
    return AlphaSearch(alpha, errors, subspaces.get(alpha))


def pick_alpha(errors: dict[float, float]) -> float:
    """The grid point where a quadratic fit of ``log(error)`` over α is lowest.

    Why not the raw argmin: on small layers the error of neighbouring α differs by the luck of each
    residual's rounding (a few percent, up and down), and the raw argmin then follows that noise
    onto calibration rows (it helped on the digits DiT, whose curves are smooth, and hurt on the
    digits UNet, whose curves are jagged); the fit keeps the trend and drops the jitter."""
    alphas = torch.tensor(list(errors), dtype=torch.float64)
    if alphas.numel() < 3:
        return min(errors, key=errors.get)
    e = torch.tensor(list(errors.values()), dtype=torch.float64).clamp_min(1e-30).log()
    basis = torch.stack([alphas.square(), alphas, torch.ones_like(alphas)], 1)
    coef = torch.linalg.lstsq(basis, e[:, None]).solution
    fit = (basis @ coef)[:, 0]
    return float(alphas[int(fit.argmin())])
