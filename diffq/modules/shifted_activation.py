"""Unsigned activation quantization of inputs with a known lower bound (after GELU / SiLU / ReLU).

``Q(x + c) - c`` with a constant per-channel shift ``c >= -min(x)``: the shifted input is
non-negative, so an unsigned format (``uint4``: codes 0..15, zero point 0) spends all its levels on
the values that occur instead of half of them on negatives that never do. Subtracting ``c`` back
makes it exact in full precision; a kernel folds it into the bias instead
(``b' = b - c · deq(W_q)ᵀ``, one vector per layer), which is why the shift is a constant and not a
per-token zero point.
"""

from __future__ import annotations

import torch

from diffq.formats import QuantSpec
from diffq.modules.activation import ActQuantizer


class ShiftedActQuantizer(ActQuantizer):
    """``x [..., C]`` -> ``fake_quantize(x + shift) - shift``, same shape/dtype; ``shift`` [C] fp32 buffer.

    Everything else (dynamic or static scales, split segments) is :class:`ActQuantizer`'s."""

    def __init__(self, spec: QuantSpec, shift: torch.Tensor, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.register_buffer("shift", shift.detach().float().reshape(-1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.shift.to(x.dtype)
        return super().forward(x + c) - c

    def extra_repr(self) -> str:
        return super().extra_repr() + ", shifted"
