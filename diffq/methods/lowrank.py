"""SVD low-rank outlier absorption (SVDQuant): ``W = L1ᵀ-ish product + R``.

After smoothing, the weight's outliers concentrate in a few singular directions. Keeping the top
``r`` of them in 16 bits and quantizing only the residual ``R`` to 4 bits leaves ``R`` with a much
smaller range. Shapes follow the runtime branch ``y += (x · L1) · L2``.
"""

from __future__ import annotations

import torch


def effective_rank(rank: int, out_features: int, in_features: int) -> int:
    """The rank actually used: at most a quarter of the smaller side, so the 16-bit branch never
    costs more than half a dense 16-bit layer (tiny layers get a proportionally tiny branch)."""
    return max(0, min(rank, min(out_features, in_features) // 4))


def lowrank_split(weight_rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight_rows [N, K] fp -> (L1 [K, r], L2 [r, N], R [N, K]) with ``W = (L1 · L2)ᵀ + R``."""
    w = weight_rows.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    l1 = (vh.t() * root).float()  # [K, r]
    l2 = (root[:, None] * u.t()).float()  # [r, N]
    residual = (w - (u * s) @ vh).float()
    return l1, l2, residual
