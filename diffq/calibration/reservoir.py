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
from torch import nn


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
        x = x.detach().reshape(-1, x.shape[-1])
        keys = torch.rand(x.shape[0], generator=generator)
        self._merge(step, keys, lambda idx: x[idx.to(x.device)])

    def update_patches(self, step: int, x: torch.Tensor, conv: nn.Conv2d, generator: torch.Generator) -> None:
        """Offer the im2col patches of a conv's input ``x`` [B, Cin, H, W] seen at ``step``: one row
        [kh·kw·Cin] (channel-fastest, the order of the stored conv weight rows) per output pixel.

        Every patch gets a priority as a row would, but only the patches that can enter the sample
        are gathered (at most ``capacity`` of them), so memory stays bounded by the sample."""
        kh, kw = conv.kernel_size
        (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
        b, _, h, w = x.shape
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        keys = torch.rand(b * ho * wo, generator=generator)
        xp = torch.nn.functional.pad(x.detach(), (pw, pw, ph, ph))

        def gather(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(x.device)
            bi, rest = idx // (ho * wo), idx % (ho * wo)
            iy = (rest // wo)[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # [n, kh]
            ix = (rest % wo)[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # [n, kw]
            return xp[bi[:, None, None], :, iy[:, :, None], ix[:, None, :]].reshape(idx.numel(), -1)

        self._merge(step, keys, gather)

    def _merge(self, step: int, keys: torch.Tensor, rows_of) -> None:
        """Keep the ``capacity`` lowest priorities among the kept rows and the offered ``keys`` (in
        ascending order); ``rows_of(indices)`` materialises only the offered rows that win a slot."""
        if keys.numel() > self.capacity:
            cand, idx = torch.topk(keys, self.capacity, largest=False)
        else:
            cand, idx = keys, torch.arange(keys.numel())
        all_keys = torch.cat([self.keys[step], cand])
        best = torch.topk(all_keys, self.capacity, largest=False).indices
        from_old = best < self.capacity
        rows = torch.empty_like(self.rows[step])
        rows[from_old] = self.rows[step][best[from_old]]
        if not bool(from_old.all()):
            rows[~from_old] = rows_of(idx[best[~from_old] - self.capacity]).to("cpu", torch.float16)
        self.rows[step] = rows
        self.keys[step] = all_keys[best]
        self.count[step] += keys.numel()

    def samples(self, step: int) -> torch.Tensor:
        """[min(count, capacity), C] float16: the kept rows of ``step``."""
        return self.rows[step][torch.isfinite(self.keys[step])]

    def weighted_rows(self, balance: bool = False, per_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of every observed step with weights that make each step count equally.

        Returns (rows [n, C] fp32, weights [n] fp32): step t's ``n_t`` rows (at most ``per_step``, a
        uniform subsample since slots are kept in priority order) weigh ``1 / (T' n_t)`` over the
        ``T'`` observed steps, so ``Σ w xᵀx`` is the mean over steps of each step's second moment.
        ``balance=True`` also divides by the step's mean squared row norm: every step then
        contributes the same input energy, and steps with ten times larger activations cannot
        dominate a Hessian or an error objective. No observed step gives zero rows.
        """
        filled = torch.isfinite(self.keys)  # [T, capacity]; kept rows come first in each step
        if per_step is not None:
            filled[:, per_step:] = False
        counts = filled.sum(1)
        steps = torch.nonzero(counts > 0).flatten()
        if steps.numel() == 0:
            return self.rows.new_zeros((0, self.rows.shape[-1]), dtype=torch.float32), torch.zeros(0)
        x = self.rows[filled].float()  # [n, C], step-major
        step_of = torch.arange(self.rows.shape[0]).repeat_interleave(counts)
        w_step = torch.zeros(self.rows.shape[0])
        w_step[steps] = 1.0 / (counts[steps].float() * steps.numel())
        if balance:
            energy = torch.zeros(self.rows.shape[0]).index_add_(0, step_of, x.square().sum(1))
            energy = energy / counts.clamp_min(1)
            w_step[steps] = w_step[steps] / energy[steps].clamp_min(1e-30)
            w_step = w_step / w_step[step_of].sum().clamp_min(1e-30)
        return x, w_step[step_of]

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}/reservoir_rows": self.rows, f"{name}/reservoir_keys": self.keys,
                f"{name}/reservoir_count": self.count}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str) -> InputReservoir:
        return cls(tensors[f"{name}/reservoir_rows"], tensors[f"{name}/reservoir_keys"],
                   tensors[f"{name}/reservoir_count"])
