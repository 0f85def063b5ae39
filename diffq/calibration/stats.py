"""Streaming per-layer, per-step activation statistics.

Memory is O(layers × steps × (channels + HIST_BINS)), independent of how many images or tokens
were seen: every update folds a batch of inputs into running min/max, per-channel abs-max,
sum/sum² and a log-scale histogram of |x|.

The histogram has ``BINS_PER_OCTAVE`` bins per power of two between 2^LOG2_MIN and 2^LOG2_MAX
(values outside land in the end bins), which resolves any percentile or clipping threshold to
about 9% relative without knowing the range in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -24, 24, 8
HIST_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE


def bin_centers() -> torch.Tensor:
    return torch.exp2((torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) / BINS_PER_OCTAVE + LOG2_MIN)


@dataclass
class LayerStats:
    """Statistics of one layer's input, one row per timestep index.

    absmax: [T, C] fp32 per-input-channel abs-max; minv/maxv: [T] fp32; total/total_sq: [T] fp64
    sums; count: [T] int64 elements seen; hist: [T, HIST_BINS] fp64 counts of |x|.
    """

    absmax: torch.Tensor
    minv: torch.Tensor
    maxv: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor
    count: torch.Tensor
    hist: torch.Tensor

    FIELDS = ("absmax", "minv", "maxv", "total", "total_sq", "count", "hist")

    @classmethod
    def empty(cls, steps: int, channels: int) -> LayerStats:
        return cls(
            absmax=torch.zeros(steps, channels),
            minv=torch.full((steps,), float("inf")),
            maxv=torch.full((steps,), float("-inf")),
            total=torch.zeros(steps, dtype=torch.float64),
            total_sq=torch.zeros(steps, dtype=torch.float64),
            count=torch.zeros(steps, dtype=torch.int64),
            hist=torch.zeros(steps, HIST_BINS, dtype=torch.float64),
        )

    @torch.no_grad()
    def update(self, step: int, rows: torch.Tensor) -> None:
        """Fold ``rows [M, C]`` (the layer input at ``step``, channels last) into the statistics."""
        x = rows.detach().float()
        self.absmax[step] = torch.maximum(self.absmax[step], x.abs().amax(0).cpu())
        self.minv[step] = min(float(self.minv[step]), float(x.min()))
        self.maxv[step] = max(float(self.maxv[step]), float(x.max()))
        self.total[step] += float(x.double().sum())
        self.total_sq[step] += float(x.double().pow(2).sum())
        self.count[step] += x.numel()
        lg = torch.log2(x.abs().clamp_min(2.0**LOG2_MIN))
        idx = ((lg - LOG2_MIN) * BINS_PER_OCTAVE).floor().clamp(0, HIST_BINS - 1).long().flatten()
        self.hist[step] += torch.bincount(idx, minlength=HIST_BINS).double().cpu()

    @property
    def observed(self) -> torch.Tensor:
        """[T] bool: steps that saw data."""
        return self.count > 0

    def amax(self) -> torch.Tensor:
        """[T] per-step abs-max over all channels."""
        return self.absmax.amax(1)

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    def var(self) -> torch.Tensor:
        return (self.total_sq / self.count.clamp_min(1) - self.mean() ** 2).clamp_min(0)

    def channel_absmax(self) -> torch.Tensor:
        """[C] abs-max over all observed steps (what smoothing needs)."""
        return self.absmax.amax(0)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}::{f}": getattr(self, f).contiguous() for f in self.FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LayerStats:
        return cls(**{f: tensors[f"{prefix}::{f}"] for f in cls.FIELDS})
