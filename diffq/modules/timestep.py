"""How a quantized module knows the current denoising step: one shared tracker per denoiser.

A forward pre-hook on the denoiser turns the pipeline's timestep argument into an integer
*bucket* in ``[0, NUM_BUCKETS)`` (timesteps normalised to the 0..1000 scale of DDPM-style
schedulers; flow-matching sigmas are scaled by 1000 by the family adapter). Each activation
quantizer maps bucket -> timestep group with a precomputed table, so the per-step cost is one
table lookup, and any number of inference steps works with scales calibrated at other steps.

The bucket is a 0-d int64 *tensor* computed with tensor ops on the timestep's own device: no
``float(t)``/``int(t)`` (a device-to-host sync per call on a GPU, a graph break under
``torch.compile``), no Python branch on its value. ``calls`` counts eager calls only (it is a
debugging aid for :mod:`diffq.numerics`); compiled calls leave it alone so that no Python int
is guarded on and re-specialised every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NUM_BUCKETS = 1001


def timestep_bucket(t: float | torch.Tensor) -> torch.Tensor:
    """Timestep (0..1000 scale; a number, a 0-d tensor or a per-sample ``[B]`` tensor whose first
    entry is used) -> 0-d int64 bucket in ``[0, NUM_BUCKETS)``, on the timestep's device."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[:1].reshape(()) if t.numel() else t.new_zeros(())
        return t.float().round().clamp(0, NUM_BUCKETS - 1).long()
    return torch.tensor(int(min(max(round(float(t)), 0), NUM_BUCKETS - 1)), dtype=torch.long)


class TimestepTracker:
    """The current timestep bucket of one denoiser (plain Python state, not a module).

    bucket: 0-d int64 tensor, set by the denoiser's pre-hook; calls: eager denoiser calls seen.
    """

    def __init__(self) -> None:
        self.bucket: torch.Tensor = torch.zeros((), dtype=torch.long)
        self.calls: int = 0

    def set_timestep(self, t: float | torch.Tensor) -> None:
        self.bucket = timestep_bucket(t)
        if not torch.compiler.is_compiling():
            self.calls += 1


TimestepGetter = Callable[[tuple, dict], "float | torch.Tensor | None"]


def register_timestep_hook(
    denoiser: nn.Module, timestep_of: TimestepGetter, tracker_of: Callable[[nn.Module], TimestepTracker]
):
    """Feed every call's timestep to ``tracker_of(denoiser)``; returns the hook handle.

    The tracker is looked up on the called module at each call, not captured: a deep-copied
    denoiser shares this hook function but must drive its own (copied) tracker.
    """

    def hook(module, args, kwargs):
        t = timestep_of(args, kwargs)
        if t is not None:
            tracker_of(module).set_timestep(t)

    return denoiser.register_forward_pre_hook(hook, with_kwargs=True)
