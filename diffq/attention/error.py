"""How far quantized attention is from full precision, measured inside a running pipeline.

:func:`probe_attention` swaps every covered attention module's processor for one whose attention
returns the full-precision result (so the pipeline's trajectory is unchanged) and, for each format
asked for, also computes the quantized attention of the same Q, K, V and mask and reports
``(Σ (out_q - out_fp)², Σ out_fp²)`` to a callback: the relative L2 error of the attention output
(before the output projection) is ``sqrt`` of their ratio, summed over whatever calls share a
step. Calibration uses this (``calibrate(attention_operands=True)``), and so do the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from diffq.attention.install import choose_attention, swap_processors
from diffq.attention.processors import quantized_attention, sdpa
from diffq.attention.spec import ATTN_FORMATS, attn_format, format_label
from diffq.kernels.attention_reference import AttnFormat

#: ``record(module name, format label, Σ err², Σ ref²)`` (0-d fp64 tensors)
Record = Callable[[str, str, torch.Tensor, torch.Tensor], None]


def default_probe_formats() -> dict[str, AttnFormat]:
    """Every recipe format with K smoothing, and each again without it (``.../no-smooth``)."""
    fmts = [attn_format(n, smooth_k=s) for s in (True, False) for n in ATTN_FORMATS]
    return {format_label(f): f for f in fmts}


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``‖out - ref‖ / ‖ref‖`` over all elements (fp64, 0-d)."""
    return (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)


class ErrorProbe:
    """``attend`` that returns full-precision SDPA and reports each format's error to ``record``;
    ``observe(name, q, k, v, mask)``, if given, sees the operands first."""

    def __init__(self, name: str, formats: dict[str, AttnFormat], record: Record, backend: str = "auto",
                 observe: Callable | None = None) -> None:  # fmt: skip
        self.name, self.formats, self.record, self.backend, self.observe = name, dict(formats), record, backend, observe

    def __call__(self, q, k, v, mask=None):
        if self.observe is not None:
            self.observe(self.name, q, k, v, mask)
        ref = sdpa(q, k, v, mask)
        ref64 = ref.double()
        ref_sq = ref64.pow(2).sum()
        for label, fmt in self.formats.items():
            out = quantized_attention(q, k, v, fmt, mask, backend=self.backend)
            self.record(self.name, label, (out.double() - ref64).pow(2).sum(), ref_sq)
        return ref


@contextmanager
def probe_attention(
    denoiser: nn.Module, formats: dict[str, AttnFormat], record: Record, *, backend: str = "auto",
    observe: Callable | None = None,
) -> Iterator[list[str]]:
    """Within the block, every covered attention module of ``denoiser`` reports its errors
    (:class:`ErrorProbe`); yields the probed module names. The original processors are restored on exit."""
    choices = [c for c in choose_attention(denoiser) if c.skip is None]
    restore = swap_processors(choices, lambda ch: ErrorProbe(ch.name, formats, record, backend, observe))
    try:
        yield [c.name for c in choices]
    finally:
        restore()
