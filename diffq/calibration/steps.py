"""Which calibration step a denoiser call belongs to: by its timestep value, not by counting calls.

A *step* is one distinct timestep of the scheduler's schedule (``scheduler.timesteps`` after the
pipeline's ``set_timesteps``), in schedule order. Counting calls is wrong whenever the denoiser runs
more than once per scheduler step:

- second-order schedulers call it twice per step: Heun at the same timestep as the next step's first
  call (``[t0, t1, t1, t2, t2, ...]``: 2N-1 calls, N distinct timesteps -> N steps), KDPM2/DPM2 at an
  interpolated timestep in between (2N-1 distinct timesteps -> 2N-1 steps);
- FLUX's true CFG (``true_cfg_scale`` with a negative prompt) calls it twice at the same timestep.

Each call is mapped to the schedule entry nearest its timestep, so both calls at one timestep fold
into the same step's statistics, and an activation range calibrated there is looked up by exactly that
timestep at inference. A call whose timestep is not in the schedule (within rounding: half a unit plus
0.5%, which covers a bf16 timestep) is refused rather than attributed to the wrong step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffq.errors import CalibrationError


def distinct_timesteps(timesteps) -> list[float]:
    """Schedule (tensor or sequence, 0..1000 scale) -> its distinct values in first-appearance order."""
    values = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    out: list[float] = []
    seen: set[float] = set()
    for v in values:
        key = round(v, 3)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


@dataclass(frozen=True)
class StepMap:
    """The steps of one calibration run: ``timesteps[i]`` is step i's timestep (0..1000 scale)."""

    timesteps: tuple[float, ...]

    @classmethod
    def from_scheduler(cls, scheduler) -> StepMap:
        ts = getattr(scheduler, "timesteps", None)
        if ts is None or len(ts) == 0:
            raise CalibrationError(
                f"the pipeline's scheduler ({type(scheduler).__name__}) has no timesteps at the first denoiser "
                f"call; calibration maps calls to steps by the schedule's timesteps, so the pipeline must call "
                f"scheduler.set_timesteps before running the denoiser"
            )
        return cls(tuple(distinct_timesteps(ts)))

    def __len__(self) -> int:
        return len(self.timesteps)

    def step_of(self, t: float) -> int:
        """Index of the schedule entry ``t`` belongs to; CalibrationError when it matches none."""
        i = min(range(len(self.timesteps)), key=lambda k: abs(self.timesteps[k] - t))
        if abs(self.timesteps[i] - t) > 0.5 + 0.005 * abs(self.timesteps[i]):
            shown = ", ".join(f"{v:.1f}" for v in self.timesteps[:8]) + (" ..." if len(self) > 8 else "")
            raise CalibrationError(
                f"the denoiser was called at timestep {t:.2f}, which is not in the scheduler's schedule "
                f"[{shown}]; calibration only records calls of the pipeline's own denoising loop"
            )
        return i

    def buckets(self) -> list[int]:
        """Timestep bucket (rounded to 0..1000) of every step."""
        return [int(min(max(round(v), 0), 1000)) for v in self.timesteps]
