"""SVD low-rank outlier absorption (SVDQuant): ``W = L1ᵀ-ish product + R``.

After smoothing, the weight's outliers concentrate in a few singular directions. Keeping the top
``r`` of them in 16 bits and quantizing only the residual ``R`` to 4 bits leaves ``R`` with a much
smaller range. Shapes follow the runtime branch ``y += (x · L1) · L2``.
"""

from __future__ import annotations

import torch

from diffq.errors import ShapeError

RANDOMIZED_ABOVE = 512


def effective_rank(rank: int, out_features: int, in_features: int) -> int:
    """The rank actually used: at most a quarter of the smaller side, so the 16-bit branch never
    costs more than half a dense 16-bit layer (tiny layers get a proportionally tiny branch)."""
    return max(0, min(rank, min(out_features, in_features) // 4))


def lowrank_split(weight_rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight_rows [N, K] fp -> (L1 [K, r], L2 [r, N], R [N, K]) with ``W = (L1 · L2)ᵀ + R``."""
    if not 0 < rank <= min(weight_rows.shape):
        raise ShapeError(
            f"low-rank split of a {tuple(weight_rows.shape)} weight needs 0 < rank <= {min(weight_rows.shape)}, "
            f"got {rank}; recipes cap the rank per layer with effective_rank()"
        )
    w = weight_rows.double()
    if min(w.shape) > RANDOMIZED_ABOVE and rank < min(w.shape) // 4:
        # big layers: randomized range finder (a few power iterations) gets the top-r subspace at a
        # fraction of a full SVD's cost; seeded so quantization is deterministic. R is exact either way.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w.float(), q=rank + 16, niter=4)
        u, s, vh = u[:, :rank].double(), s[:rank].double(), v[:, :rank].t().double()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    l1 = (vh.t() * root).float()  # [K, r]
    l2 = (root[:, None] * u.t()).float()  # [r, N]
    residual = (w - (u * s) @ vh).float()
    return l1, l2, residual
