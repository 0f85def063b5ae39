"""Timestep-aware calibration: per-step activation statistics from real pipeline runs."""

from diffq.calibration.act_scales import grouping_mse, step_groups, timestep_act_ranges
from diffq.calibration.container import CalibrationStats
from diffq.calibration.run import calibrate, uniform_steps
from diffq.calibration.stats import LayerStats

__all__ = [
    "CalibrationStats",
    "LayerStats",
    "calibrate",
    "grouping_mse",
    "step_groups",
    "timestep_act_ranges",
    "uniform_steps",
]
