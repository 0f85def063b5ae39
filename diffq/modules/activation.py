"""Activation quantizer: dynamic (per token / per group, computed on the fly) or static per
timestep group (ranges from calibration, picked by a table lookup on the current step).

Inputs are viewed channels-last: rows ``[M, C]`` with C the input channels (QuantConv2d permutes
NCHW to NHWC before calling). ``splits`` quantizes channel segments separately (split shortcut:
the concatenated main and skip inputs of UNet up-block resnets get their own scales).

``center`` (dynamic scales only) quantizes ``x - c`` and adds ``c`` back, with ``c [B, 1, .., C]`` each
sample's per-channel mean over its tokens (pixels): ``Q(x - c) + c``, so the layer computes
``Q(x - c) · Wqᵀ + c · Wqᵀ``. A per-sample channel offset, such as the shift of an adaLN-modulated
norm (the same for all tokens of a sample, different per channel, timestep and condition), then costs
no quantization range; a zero point per token group cannot remove it, a static shift cannot follow it.
Inputs without a token axis (``[M, C]``) are quantized as they are.

The forward is host-sync free and branch free on data: the timestep group is a tensor lookup
(``bucket_to_group[tracker.bucket]``), and NaN/Inf inputs are only checked when
``check_finite`` is set (from ``DIFFQ_CHECK_FINITE`` when the quantizer is built), so it traces
under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffq.formats import QuantSpec, fake_quantize
from diffq.formats.core import finite_check_requested
from diffq.modules.timestep import NUM_BUCKETS, TimestepTracker


class ActQuantizer(nn.Module):
    """Fake-quantizes activations ``x [..., C]`` -> same shape/dtype.

    Static mode holds ``amax [G, S]`` (G timestep groups, S channel segments) and
    ``bucket_to_group [NUM_BUCKETS]`` (int16); dynamic mode holds no state.
    center: quantize ``x - mean_tokens(x)`` per sample and add the mean back (dynamic only; inputs of
    3 or more dims ``[B, tokens.., C]``).
    check_finite: refuse NaN/Inf inputs (a reduction and a host sync per call); default: whether
    ``DIFFQ_CHECK_FINITE`` is set.
    """

    def __init__(
        self,
        spec: QuantSpec,
        *,
        splits: tuple[int, ...] | None = None,
        amax: torch.Tensor | None = None,
        bucket_to_group: torch.Tensor | None = None,
        check_finite: bool | None = None,
        center: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.center = bool(center)
        if self.center and amax is not None:
            raise ValueError("centering needs dynamic scales (static ranges would not follow the offsets)")
        self.check_finite = finite_check_requested() if check_finite is None else bool(check_finite)
        self.splits = tuple(splits) if splits else None
        self.tracker: TimestepTracker | None = None
        if amax is not None:
            nseg = len(self.splits) if self.splits else 1
            amax = amax.float().reshape(amax.shape[0], -1)
            if amax.shape[1] != nseg:
                raise ValueError(f"static amax has {amax.shape[1]} segments, expected {nseg}")
            if bucket_to_group is None:
                bucket_to_group = torch.zeros(NUM_BUCKETS, dtype=torch.int16)
            self.register_buffer("amax", amax.contiguous())
            self.register_buffer("bucket_to_group", bucket_to_group.to(torch.int16).contiguous())
        else:
            self.amax = None
            self.bucket_to_group = None

    @property
    def static(self) -> bool:
        return self.amax is not None

    def current_group(self) -> torch.Tensor:
        """[1] int64 tensor: the timestep group of the current step (a gather, no host sync; a 0-d
        index would be read as a Python int)."""
        if self.tracker is None:
            return self.bucket_to_group[:1].long()
        bucket = self.tracker.bucket.to(self.bucket_to_group.device).reshape(1)
        return self.bucket_to_group[bucket].long()

    def current_amax(self) -> torch.Tensor | None:
        """[S] static ranges of the current timestep group (None when dynamic)."""
        if self.amax is None:
            return None
        return self.amax[self.current_group()][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center and x.dim() >= 3:
            c = x.mean(dim=tuple(range(1, x.dim() - 1)), keepdim=True, dtype=torch.float32).to(x.dtype)
            return self._quantize(x - c) + c
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        amax = self.current_amax()
        check = self.check_finite
        if self.splits is None:
            return fake_quantize(x, self.spec, amax=None if amax is None else amax[0], check_finite=check)
        parts = torch.split(x, self.splits, dim=-1)
        out = [
            fake_quantize(p.contiguous(), self.spec, amax=None if amax is None else amax[i], check_finite=check)
            for i, p in enumerate(parts)
        ]
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        mode = f"static[{self.amax.shape[0]} groups]" if self.static else "dynamic"
        return (f"{self.spec.describe()}, {mode}" + (f", splits={self.splits}" if self.splits else "")
                + (", centered" if self.center else ""))
