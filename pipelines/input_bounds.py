"""Which layers' inputs have a known lower bound: they follow a GELU / SiLU / ReLU directly.

Unsigned activation quantization (:class:`diffq.modules.ShiftedActQuantizer`) needs a bound that
holds for every input, not only the calibration ones, so it comes from the structure of the model,
never from data: the input of a ResNet block's ``conv1`` / ``conv2`` is ``act(norm(h))`` (diffusers'
``ResnetBlock2D``, whose optional up/down-sampling is nearest / average pooling and keeps the bound),
and the input of a feed-forward's output projection ``ff.net.2`` is ``gelu(proj(x))`` when the FFN
is not gated (DiT, PixArt, SD3, FLUX's double blocks; the GEGLU of SD1.x/SDXL UNets multiplies by an
unbounded value, so those get no bound, nor does FLUX's single-block ``proj_out``, half of whose
input is the attention output). The bounds are the activations' minima, rounded away from zero:
SiLU -0.2785 (at x = -1.278), GELU -0.1700 (erf and tanh forms), x·sigmoid(1.702x) -0.1636.
"""

from __future__ import annotations

from torch import nn

#: lower bound of the activation's output, rounded down (a little below the true minimum)
FLOORS = {"SiLU": -0.279, "Mish": -0.309, "GELU": -0.171, "ReLU": 0.0, "ApproximateGELU": -0.164}


def _act_floor(act: nn.Module) -> float | None:
    name = type(act).__name__
    if name == "LinearActivation":  # diffusers' proj + activation module (e.g. "linear-silu")
        return _act_floor(getattr(act, "activation", None)) if isinstance(getattr(act, "activation", None),
                                                                              nn.Module) else None
    return FLOORS.get(name)


def _keeps_bound(sampler: nn.Module | None) -> bool:
    """Up/down-sampling inside a ResNet block keeps a lower bound when it is nearest / average pooling."""
    if sampler is None:
        return True
    return not getattr(sampler, "use_conv", True) and getattr(sampler, "fir_kernel", None) is None \
        and getattr(sampler, "kernel", None) is None


def input_floors(denoiser: nn.Module) -> dict[str, float]:
    """Qualified layer name -> lower bound of every element of its input, for the layers that have one."""
    out: dict[str, float] = {}
    for name, mod in denoiser.named_modules():
        prefix = f"{name}." if name else ""
        cls = type(mod).__name__
        if cls == "ResnetBlock2D":
            floor = _act_floor(getattr(mod, "nonlinearity", None) or nn.Identity())
            if floor is None:
                continue
            out[f"{prefix}conv2"] = floor
            if _keeps_bound(getattr(mod, "upsample", None)) and _keeps_bound(getattr(mod, "downsample", None)):
                out[f"{prefix}conv1"] = floor
        elif cls == "FeedForward" and isinstance(getattr(mod, "net", None), nn.ModuleList) and len(mod.net) > 2:
            act = mod.net[0]
            if type(act).__name__ == "GELU":
                out[f"{prefix}net.2"] = FLOORS["GELU"]
            elif type(act).__name__ == "ApproximateGELU":
                out[f"{prefix}net.2"] = FLOORS["ApproximateGELU"]
            elif type(act).__name__ == "LinearActivation" and _act_floor(act) is not None:
                out[f"{prefix}net.2"] = _act_floor(act)
    return out
