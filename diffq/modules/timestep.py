"""How a quantized module knows the current denoising step: one shared tracker per denoiser.

A forward pre-hook on the denoiser turns the pipeline's timestep argument into an integer
*bucket* in ``[0, NUM_BUCKETS)`` (timesteps normalised to the 0..1000 scale of DDPM-style
schedulers; flow-matching sigmas are scaled by 1000 by the family adapter). Each activation
quantizer maps bucket -> timestep group with a precomputed table, so the per-step cost is one
integer lookup, and any number of inference steps works with scales calibrated at other steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NUM_BUCKETS = 1001


class TimestepTracker:
    """Holds the current timestep bucket of one denoiser (plain Python state, not a module)."""

    def __init__(self) -> None:
        self.bucket: int = 0
        self.calls: int = 0

    def set_timestep(self, t: float | torch.Tensor) -> None:
        if isinstance(t, torch.Tensor):
            t = float(t.reshape(-1)[0]) if t.numel() else 0.0
        self.bucket = int(min(max(round(float(t)), 0), NUM_BUCKETS - 1))
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
