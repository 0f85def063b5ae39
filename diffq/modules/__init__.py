"""Thin torch modules that hold quantized state: QuantLinear, QuantConv2d, ActQuantizer; which
layers of a denoiser are quantizable; the timestep tracker the activation quantizers read."""

from diffq.modules.activation import ActQuantizer
from diffq.modules.layers import in_out, quantizable_layers, quantized_modules, structure_fingerprint
from diffq.modules.quant_linear import QuantConv2d, QuantLinear, conv_weight_rows
from diffq.modules.shifted_activation import ShiftedActQuantizer
from diffq.modules.swap import set_submodule
from diffq.modules.timestep import NUM_BUCKETS, TimestepTracker, register_timestep_hook

__all__ = [
    "NUM_BUCKETS",
    "ActQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "ShiftedActQuantizer",
    "TimestepTracker",
    "conv_weight_rows",
    "in_out",
    "quantizable_layers",
    "quantized_modules",
    "register_timestep_hook",
    "set_submodule",
    "structure_fingerprint",
]
