"""A capped, uniform sample of real layer inputs per calibration step, for methods that need them.

Why: statistics (abs-max, histograms) are enough for range choice and smoothing, and stay bounded by
layers x steps x channels. Some methods (output-error calibration, GPTQ-style weight rounding,
checking a recipe on real activations) need actual input rows. Keeping every row would grow with
images x tokens, so each (layer, step) keeps at most ``capacity`` rows, chosen uniformly at random
from all rows it saw: every row gets a random priority from a seeded generator and the ``capacity``
lowest priorities win (a reservoir sample that merges batch by batch, in any order, deterministically).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputReservoir:
    """Rows of one layer's input, per step.

    rows: [T, capacity, C] float16, the kept rows (zeros where ``count < capacity``).
    keys: [T, capacity] float32 priorities of the kept rows (+inf = empty slot).
    count: [T] int64, rows seen per step (so ``min(count, capacity)`` slots are filled).
    """

    rows: torch.Tensor
    keys: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, num_steps: int, capacity: int, channels: int) -> InputReservoir:
        return cls(
            rows=torch.zeros(num_steps, capacity, channels, dtype=torch.float16),
            keys=torch.full((num_steps, capacity), float("inf")),
            count=torch.zeros(num_steps, dtype=torch.int64),
        )

    @property
    def capacity(self) -> int:
        return self.rows.shape[1]

    def update(self, step: int, x: torch.Tensor, generator: torch.Generator) -> None:
        """Offer rows ``x`` [R, C] (any float dtype) seen at ``step``."""
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float16)
        keys = torch.rand(x.shape[0], generator=generator)
        all_keys = torch.cat([self.keys[step], keys])
        all_rows = torch.cat([self.rows[step], x])
        best = torch.topk(all_keys, self.capacity, largest=False).indices
        self.keys[step] = all_keys[best]
        self.rows[step] = all_rows[best]
        self.count[step] += x.shape[0]

    def samples(self, step: int) -> torch.Tensor:
        """[min(count, capacity), C] float16: the kept rows of ``step``."""
        return self.rows[step][torch.isfinite(self.keys[step])]

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}/reservoir_rows": self.rows, f"{name}/reservoir_keys": self.keys,
                f"{name}/reservoir_count": self.count}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str) -> InputReservoir:
        return cls(tensors[f"{name}/reservoir_rows"], tensors[f"{name}/reservoir_keys"],
                   tensors[f"{name}/reservoir_count"])
