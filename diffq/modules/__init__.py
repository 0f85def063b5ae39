"""Thin torch modules that hold quantized state: QuantLinear, QuantConv2d, ActQuantizer."""

from diffq.modules.act_quant import ActQuantizer
from diffq.modules.quant_linear import QuantConv2d, QuantLinear, conv_weight_rows
from diffq.modules.timestep import NUM_BUCKETS, TimestepTracker, attach_tracker

__all__ = [
    "NUM_BUCKETS",
    "ActQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "TimestepTracker",
    "attach_tracker",
    "conv_weight_rows",
]
