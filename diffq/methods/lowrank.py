"""SVD low-rank outlier absorption (SVDQuant): ``W = (L1 · L2)ᵀ + R``.

After smoothing, the weight's outliers concentrate in a few singular directions. Keeping the top
``r`` of them in 16 bits and quantizing only the residual ``R`` to 4 bits leaves ``R`` with a much
smaller range. Shapes follow the runtime branch ``y += (x · L1) · L2``.

All of it runs in float32 on the weight's device: a full SVD for small layers, a seeded randomized
range finder (a few power iterations, optionally warm-started from a previous basis) for large
ones. :func:`refit_lowrank` alternates the split with the residual's quantization (the branch then
also absorbs the quantization error of ``R``, not only the outliers of ``W``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffq.errors import ShapeError
from diffq.methods.layout import transposed
from diffq.methods.threads import one_thread

RANDOMIZED_ABOVE = 512
#: (U [N, r], S [r], Vh [r, K]): a weight's top-r singular triplets (:func:`top_subspace`)
Subspace = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
OVERSAMPLE = 16
POWER_ITERS = 4


def effective_rank(rank: int, out_features: int, in_features: int, rank_ratio: float | None = None) -> int:
    """The rank actually used: ``rank``, or ``round(rank_ratio * min(N, K))`` (at least 1) when a ratio
    is given, then capped at a quarter of the smaller side, so the 16-bit branch never costs more
    than half a dense 16-bit layer (tiny layers get a proportionally tiny branch)."""
    side = min(out_features, in_features)
    if rank_ratio is not None:
        rank = max(1, round(rank_ratio * side)) if rank_ratio > 0 else 0
    return max(0, min(rank, side // 4))


def randomized_subspace(w: torch.Tensor, rank: int) -> bool:
    """Whether :func:`top_subspace` takes the randomized range finder for ``w`` (else a full SVD)."""
    return min(w.shape) > RANDOMIZED_ABOVE and rank < min(w.shape) // 4


def transpose_for_products(w: torch.Tensor) -> torch.Tensor:
    """``w``ᵀ [K, N] as the range finder multiplies it: a contiguous copy on CPU (its products are about
    2.5x faster there than from a transposed view, with the same bits), the view elsewhere."""
    return transposed(w) if w.device.type == "cpu" else w.t()


def top_subspace(
    w: torch.Tensor, rank: int, start: torch.Tensor | None = None, iters: int = POWER_ITERS,
    col_scale: torch.Tensor | None = None, w_t: torch.Tensor | None = None,
) -> Subspace:
    """Top-``rank`` singular triplets of ``w`` [N, K] fp32: (U [N, r], S [r], Vh [r, K]).

    Small matrices get a full SVD; large ones a randomized range finder with ``iters`` power
    iterations, seeded (deterministic), or started from ``start`` [K, q] (a previous right basis,
    e.g. of the same weight at a nearby smoothing strength: one or two iterations then suffice).
    col_scale [K]: the triplets of ``w · diag(col_scale)`` (a smoothed weight), which the range
    finder never materialises (the scale goes onto its thin factors).
    w_t: :func:`transpose_for_products` of ``w`` (made here if not given; a caller with several
    subspaces of one weight makes it once).
    """
    if not randomized_subspace(w, rank):
        ws = w if col_scale is None else w * col_scale
        u, s, vh = torch.linalg.svd(ws, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + OVERSAMPLE, min(w.shape))
    if start is None:
        gen = torch.Generator(device=w.device).manual_seed(0)
        start = torch.randn(w.shape[1], q, generator=gen, device=w.device, dtype=w.dtype)
    col = None if col_scale is None else col_scale[:, None]
    wt = transpose_for_products(w) if w_t is None else w_t

    def times(b: torch.Tensor) -> torch.Tensor:  # W' b, b [K, q]
        return w @ (b if col is None else col * b)

    def times_t(b: torch.Tensor) -> torch.Tensor:  # W'ᵀ b, b [N, q]
        return wt @ b if col is None else (wt @ b).mul_(col)

    basis = _orth(times(start))  # [N, q]
    for _ in range(iters):
        basis = _orth(times(_orth(times_t(basis))))
    proj = times_t(basis).t()  # [q, K]
    with one_thread(w.device):
        ub, s, vh = torch.linalg.svd(proj, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


def _orth(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a thin matrix's columns (QR; serial: see diffq.methods.threads)."""
    with one_thread(a.device):
        return torch.linalg.qr(a).Q


def lowrank_split(
    weight_rows: torch.Tensor, rank: int, start: torch.Tensor | None = None, iters: int = POWER_ITERS,
    subspace: Subspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight_rows [N, K] -> (L1 [K, r], L2 [r, N], R [N, K]) fp32 with ``W = (L1 · L2)ᵀ + R``.

    R is exact up to fp32 rounding whatever the subspace; ``start``/``iters`` as in :func:`top_subspace`;
    ``subspace``: (U [N, r], S [r], Vh [r, K]) of ``weight_rows`` found before (e.g. by the smoothing
    search, :class:`diffq.methods.smooth_search.AlphaSearch`), used instead of a new one."""
    if not 0 < rank <= min(weight_rows.shape):
        raise ShapeError(
            f"low-rank split of a {tuple(weight_rows.shape)} weight needs 0 < rank <= {min(weight_rows.shape)}, "
            f"got {rank}; recipes cap the rank per layer with effective_rank()"
        )
    w = weight_rows.float()
    if subspace is not None and (subspace[0].shape != (w.shape[0], rank) or subspace[2].shape != (rank, w.shape[1])):
        raise ShapeError(
            f"low-rank split of a {tuple(w.shape)} weight at rank {rank} got a subspace of U {tuple(subspace[0].shape)}, "
            f"Vh {tuple(subspace[2].shape)}; it needs U [{w.shape[0]}, {rank}] and Vh [{rank}, {w.shape[1]}]"
        )
    u, s, vh = top_subspace(w, rank, start, iters) if subspace is None else subspace
    root = s.sqrt()
    l1 = vh.t() * root  # [K, r]
    l2 = root[:, None] * u.t()  # [r, N]
    residual = w - l2.t() @ l1.t()
    return l1, l2, residual


def refit_lowrank(
    w: torch.Tensor,
    rank: int,
    quantize_values: Callable[[torch.Tensor], torch.Tensor],
    objective: Callable[[torch.Tensor], float],
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate the split with the residual's quantization, keeping the best iterate.

    Start from the SVD of ``w``; then ``iters`` times: quantize the residual
    (``quantize_values(R) -> deq(Q(R))``), re-split ``w - deq(Q(R))`` (the branch takes over what the
    4-bit residual cannot represent), and take the new residual ``w - L``. ``objective(E)`` scores the
    total error ``E = w - L - deq(Q(R))`` (e.g. the layer output error on calibration inputs); the
    iterate with the lowest score is returned as (L1, L2, R), so refitting never makes it worse.
    """
    l1, l2, r = lowrank_split(w, rank)
    best = (objective(r - quantize_values(r)), l1, l2, r)
    basis = l1
    for _ in range(iters):
        target = w - quantize_values(r)
        l1, l2, _ = lowrank_split(target, rank, start=warm_start(basis, w, rank), iters=2)
        r = w - l2.t() @ l1.t()
        score = objective(r - quantize_values(r))
        basis = l1
        if score < best[0]:
            best = (score, l1, l2, r)
    return best[1], best[2], best[3]


def warm_start(l1: torch.Tensor | None, w: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A start [K, r + oversample] for the range finder of ``w`` from a previous branch's L1 [K, r]
    (None where :func:`top_subspace` takes a full SVD anyway, or without a previous branch)."""
    if l1 is None or not randomized_subspace(w, rank):
        return None
    gen = torch.Generator(device=w.device).manual_seed(1)
    extra = torch.randn(w.shape[1], OVERSAMPLE, generator=gen, device=w.device, dtype=w.dtype)
    return torch.cat([l1, extra], dim=1)
