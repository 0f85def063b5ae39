"""The one quantizer core: tensor -> (codes, scales[, zero points]) -> tensor.

Every recipe, module and kernel reference in diffq goes through these functions, so a format is
defined in exactly one place. Tensors are viewed as rows ``[R, C]`` (weights ``[N, K]``,
activations ``[M, K]``; leading dims are flattened): ``tensor`` granularity has one scale,
``channel``/``token`` one per row, ``group`` one per ``group_size`` consecutive columns.

Scale rule (documented, used by kernels too): symmetric integer ``scale = amax / qmax`` with
``qmax = 2^(b-1) - 1`` and codes in ``[-qmax, qmax]``; FP ``scale = amax / fmax``. A scale is
never zero or denormal: fp32 scales are clamped below at ``SCALE_MIN = 2^-32``, fp16 scales to
fp16's normal range ``[2^-14, 65504]``, E4M3 block scales to ``[2^-9, 448]``, E8M0 exponents to
``[-127, 127]``. Codes are computed with the *stored* scale, so dequantizing what was saved is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from diffq.errors import FormatError, QuantizationError
from diffq.formats import floating
from diffq.formats.spec import QuantSpec

SCALE_MIN = 2.0**-32
FP16_SCALE_MIN, FP16_SCALE_MAX = 2.0**-14, 65504.0


@dataclass
class QTensor:
    """A quantized tensor.

    codes: int8 (signed int formats), uint8 (unsigned int / FP4 sign-magnitude codes, one per
        element, unpacked) or an FP8 dtype; shape ``[R, C]``.
    scale: fp32 effective scale, shape ``[R or 1, groups or 1]``; ``scale_stored`` is its storage
        form (``spec.scale_dtype``) and ``global_scale`` the NVFP4 per-tensor fp32 scale (or None).
    zero: zero point (fp32, integer-valued) for unsigned formats, else None; same shape as scale.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    shape: torch.Size
    zero: torch.Tensor | None = None
    scale_stored: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


def int_range(spec: QuantSpec) -> tuple[int, int]:
    """Code range of an integer spec: symmetric [-qmax, qmax], asymmetric [0, 2^b - 1]."""
    if spec.symmetric:
        q = 2 ** (spec.bits - 1) - 1
        return -q, q
    return 0, 2**spec.bits - 1


def abs_max(x: torch.Tensor, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim)`` bit for bit (NaN propagates), from a max and a min reduction:
    no full-size ``|x|`` temporary, about 2x faster on CPU for a weight-sized ``x``."""
    return torch.maximum(x.amax(dim, keepdim=keepdim), x.amin(dim, keepdim=keepdim).neg_()).abs_()


def _as_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if x.dim() == 0:
        x = x.reshape(1, 1)
    elif x.dim() == 1:
        x = x.reshape(1, -1)
    else:
        x = x.reshape(-1, x.shape[-1])
    if spec.granularity == "group" and x.shape[-1] % spec.group_size:
        raise FormatError(
            f"group size {spec.group_size} does not divide the last dimension {x.shape[-1]}; "
            f"choose a group size that divides it (or use per-channel granularity)"
        )
    return x


def _grouped(x2: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[R, C] -> [R, G, C/G] view whose last dim shares one scale."""
    r, c = x2.shape
    if spec.granularity == "tensor":
        return x2.reshape(1, 1, r * c)
    if spec.granularity in ("channel", "token"):
        return x2.reshape(r, 1, c)
    return x2.reshape(r, c // spec.group_size, spec.group_size)


def _ungroup(xg: torch.Tensor, r: int, c: int) -> torch.Tensor:
    return xg.reshape(r, c)


#: environment switch for the (costly, host-syncing) NaN/Inf checks on activations
FINITE_CHECK_ENV = "DIFFQ_CHECK_FINITE"


def finite_check_requested() -> bool:
    """Whether ``DIFFQ_CHECK_FINITE`` asks for NaN/Inf checks on the activation path."""
    return os.environ.get(FINITE_CHECK_ENV, "") not in ("", "0")


def _check_finite(x: torch.Tensor) -> None:
    # min and max propagate NaN and show ±Inf: one reduction pass, about 10x cheaper on CPU than a
    # boolean tensor of the whole input (measured on a 3072 x 15360 weight)
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise QuantizationError(
            f"cannot quantize a tensor with {n_nan} NaN and {n_inf} Inf values; "
            f"find where they come from (diffq.calibrate names the layer and step; at inference set "
            f"DIFFQ_CHECK_FINITE=1 or use diffq.numerics.check_finite)"
        )


def store_scale(scale: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale -> (stored form, exact fp32 value of the stored form), with the clamping rule."""
    if spec.scale_dtype == "fp16":
        stored = scale.clamp(FP16_SCALE_MIN, FP16_SCALE_MAX).to(torch.float16)
        return stored, stored.float()
    if spec.scale_dtype == "e4m3":
        return floating.e4m3_scale(scale)
    if spec.scale_dtype == "e8m0":
        return floating.e8m0_scale(scale)
    s = scale.clamp_min(SCALE_MIN)
    return s, s


def decode_scale(stored: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored scale -> fp32 effective scale (inverse of :func:`store_scale`, times the global scale)."""
    if spec.scale_dtype == "e8m0":
        s = floating.e8m0_decode(stored)
    else:
        s = stored.float()
    if global_scale is not None:
        s = s * global_scale.float()
    return s


def range_grid(
    spec: QuantSpec, hi: torch.Tensor, lo: torch.Tensor | None = None, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The grid covering a range per scale group: (effective fp32 scale, stored scale, zero or None,
    NVFP4 global scale or None), all of the shape of ``hi`` (any shape: a stack of candidate ranges
    works too).

    hi: the abs-max (symmetric and FP formats) or the upper end of the range (unsigned formats, which
    also take ``lo``, both containing 0). global_scale: the NVFP4 per-tensor scale to use; by default
    ``max(hi) / (6 * 448)``, so that the block scales use E4M3's range.
    """
    if spec.is_int and not spec.symmetric:
        qlo, qhi = int_range(spec)
        stored, scale = store_scale(((hi - lo) / (qhi - qlo)).float(), spec)
        zero = torch.round(-lo.float() / scale).clamp(qlo, qhi)
        return scale, stored, zero, None
    if spec.is_int:
        stored, scale = store_scale(hi / int_range(spec)[1], spec)
        return scale, stored, None, None
    fmax = floating.FP_MAX[spec.dtype]
    raw = hi / fmax
    if spec.scale_dtype != "e4m3":
        stored, scale = store_scale(raw, spec)
        return scale, stored, None, None
    if global_scale is None:
        global_scale = (hi.amax() / (fmax * 448.0)).clamp_min(SCALE_MIN).reshape(1)
    stored, scale = store_scale(raw / global_scale, spec)
    return scale * global_scale, stored, None, global_scale


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    amax: torch.Tensor | float | None = None,
    clip_ratio: torch.Tensor | float | None = None,
    check_finite: bool = True,
) -> QTensor:
    """Quantize ``x`` (any float dtype, any shape viewed as rows ``[R, C]``).

    amax: override the range (static activation scales from calibration; broadcastable to the
        scale shape ``[R or 1, groups or 1]``). For unsigned formats it is used as ``[-amax, amax]``.
    clip_ratio: multiply the observed range (MSE/percentile clipping picks it), broadcastable likewise.
    check_finite: raise QuantizationError on NaN/Inf (default; weights always are checked). The
        activation path passes False unless ``DIFFQ_CHECK_FINITE`` is set: the check is a
        reduction plus a device-to-host sync and a data-dependent branch, which would break
        ``torch.compile`` graphs and stall the GPU once per layer per step.
    Zero-size input gives zero-size codes and scales.
    """
    return _quantize(x, spec, amax, clip_ratio, check_finite, with_codes=True)


def quantize_grid(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """The grid :func:`quantize` puts on ``x`` (min-max range: scales, zero points, NVFP4 global
    scale) without encoding ``x``: ``codes`` is empty ([0, 0]). For callers that set every code
    themselves with :func:`requantize` (GPTQ with per-group scales chosen as it goes, which keeps
    only the grid's format, shapes and global scale)."""
    return _quantize(x, spec, None, None, True, with_codes=False)


def _quantize(x, spec, amax, clip_ratio, check_finite: bool, *, with_codes: bool) -> QTensor:
    if check_finite:
        _check_finite(x)
    x2 = _as_rows(x.detach().float(), spec)
    r, c = x2.shape
    xg = _grouped(x2, spec)
    shape = (r, c) if with_codes else (0, 0)
    if xg.numel() == 0:
        empty_scale = torch.empty(xg.shape[:2], dtype=torch.float32, device=x.device)
        codes = torch.empty(shape, dtype=_code_dtype(spec), device=x.device)
        return QTensor(codes, empty_scale, spec, x.shape, scale_stored=empty_scale)

    scale, stored, zero, global_scale = _grid_of(xg, spec, amax, clip_ratio)
    if with_codes:
        codes = _ungroup(encode(xg, scale.unsqueeze(-1), spec, None if zero is None else zero.unsqueeze(-1)), r, c)
    else:
        codes = torch.empty(shape, dtype=_code_dtype(spec), device=x.device)
    return QTensor(codes, scale, spec, x.shape, zero=zero, scale_stored=stored, global_scale=global_scale)


def _grid_of(xg: torch.Tensor, spec: QuantSpec, amax, clip_ratio) -> tuple:
    """The grid :func:`quantize` puts on grouped values ``xg`` [R', G, g]: range_grid's 4-tuple."""
    if spec.is_int and not spec.symmetric:
        if amax is not None:
            a = _fit(torch.as_tensor(amax, dtype=torch.float64, device=xg.device), xg)
            lo, hi = -a, a
        else:
            # the range in float64 (fp32 -> fp64 is exact and monotone: reduce first, convert the [R', G] result)
            lo = xg.amin(-1).double().clamp(max=0)
            hi = xg.amax(-1).double().clamp(min=0)
        if clip_ratio is not None:
            cr = _fit(torch.as_tensor(clip_ratio, dtype=torch.float64, device=xg.device), xg)
            lo, hi = lo * cr, hi * cr
    else:
        lo = None
        if amax is None:
            hi = abs_max(xg)
        else:
            hi = _fit(torch.as_tensor(amax, dtype=torch.float32, device=xg.device), xg).float()
        if clip_ratio is not None:
            hi = hi * _fit(torch.as_tensor(clip_ratio, dtype=torch.float32, device=xg.device), xg)
    return range_grid(spec, hi, lo)


def rtn_values(x: torch.Tensor, spec: QuantSpec, *, clip_ratio: torch.Tensor | float | None = None) -> torch.Tensor:
    """``dequantize(quantize(x, spec, clip_ratio=...))`` [R, C] fp32 of a 2-D ``x`` (rows as
    :func:`quantize` views them), bit for bit (tests/test_formats.py), without materialising codes:
    what a search that only scores the rounded values needs, in about half the passes over the
    data. No NaN/Inf check (quantize the chosen result to get one)."""
    return _round_trip(x, spec, None, clip_ratio)


def _round_trip(x: torch.Tensor, spec: QuantSpec, amax, clip_ratio) -> torch.Tensor:
    """The values of ``quantize(x, spec, amax=, clip_ratio=)`` dequantized, [R, C] fp32, with the
    same saturation at the fp32 range as :func:`dequantize_parts`."""
    x2 = _as_rows(x.detach().float(), spec)
    r, c = x2.shape
    xg = _grouped(x2, spec)
    if xg.numel() == 0:
        return x2.clone()
    scale, _, zero, _ = _grid_of(xg, spec, amax, clip_ratio)
    v = grid_values(xg, scale.unsqueeze(-1), spec, None if zero is None else zero.unsqueeze(-1))
    f32max = torch.finfo(torch.float32).max
    return _ungroup(v.clamp_(-f32max, f32max), r, c)


def _fit(t: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
    """Broadcast a user range/ratio to the scale shape [R', G]."""
    try:
        return torch.broadcast_to(t, xg.shape[:2]).to(t.dtype)
    except RuntimeError as e:
        raise FormatError(
            f"range of shape {tuple(t.shape)} does not broadcast to the scale shape {tuple(xg.shape[:2])}"
        ) from e


def encode(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of ``x`` on the grid of effective ``scale`` (and integer-valued ``zero`` for unsigned
    formats), elementwise with broadcasting: the one rounding rule of every format (round half to
    even, saturate at the format's range)."""
    if spec.is_int:
        qlo, qhi = int_range(spec)
        if not spec.symmetric:
            return (torch.round(x / scale) + zero).clamp(qlo, qhi).to(torch.uint8)
        return torch.round(x / scale).clamp(qlo, qhi).to(torch.int8)
    if spec.dtype == "fp4_e2m1":
        return floating.e2m1_encode(x / scale)
    return floating.round_fp8(x / scale, spec.dtype)


def grid_values(
    x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, zero: torch.Tensor | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(encode(x, scale, spec, zero))`` in fp32 without materialising codes: the value
    each element rounds to (what error-feedback and clip searches need, column by column or for a
    stack of candidate grids). Same broadcasting as :func:`encode`. ``out``: an fp32 tensor of the
    result's shape to write into (``x`` itself is allowed: rounding in place)."""
    y = torch.div(x.float(), scale, out=out)  # a new tensor (or out): the rest works in place on it
    if spec.is_int:
        qlo, qhi = int_range(spec)
        if not spec.symmetric:
            return y.round_().add_(zero).clamp_(qlo, qhi).sub_(zero).mul_(scale)
        return y.round_().clamp_(qlo, qhi).mul_(scale)
    if spec.dtype == "fp4_e2m1":
        v = floating.e2m1_round(y).mul_(scale)
    else:
        v = floating.round_fp8(y, spec.dtype).float().mul_(scale)
    return v if out is None else out.copy_(v)


def expand_grid(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid of ``q`` per element: (effective scale [R, C] fp32, zero point [R, C] or None).

    Any reshape or column permutation of the weight can be applied to these as well, which is how
    GPTQ keeps the grid fixed while it reorders columns or splits conv taps."""
    r, c = q.codes.shape
    spec = q.spec

    def full(t: torch.Tensor) -> torch.Tensor:
        if spec.granularity == "tensor":
            return t.reshape(1, 1).expand(r, c).contiguous()
        if spec.granularity == "group":
            return t.repeat_interleave(spec.group_size, dim=1).expand(r, c).contiguous()
        return t.reshape(-1, 1).expand(r, c).contiguous()

    return full(q.scale.float()), None if q.zero is None else full(q.zero.float())


def requantize(q: QTensor, x: torch.Tensor) -> QTensor:
    """Codes of ``x`` (same shape as ``q``) on ``q``'s grid: same scales, zero points and global scale.

    Used after error-compensating rounding (GPTQ), whose values already lie on that grid."""
    _check_finite(x)
    x2 = _as_rows(x.detach().float(), q.spec)
    r, c = x2.shape
    if q.spec.granularity == "tensor" or r <= REQUANTIZE_ROWS:
        zero = None if q.zero is None else q.zero.unsqueeze(-1)
        codes = _ungroup(encode(_grouped(x2, q.spec), q.scale.unsqueeze(-1), q.spec, zero), r, c)
    else:  # rows are independent: encode in chunks, so the float temporaries stay a few MB
        scale = q.scale.reshape(r, -1)
        zeros = None if q.zero is None else q.zero.reshape(r, -1)
        codes = None
        for i in range(0, r, REQUANTIZE_ROWS):
            j = min(i + REQUANTIZE_ROWS, r)
            z = None if zeros is None else zeros[i:j].unsqueeze(-1)
            part = _ungroup(encode(_grouped(x2[i:j], q.spec), scale[i:j].unsqueeze(-1), q.spec, z), j - i, c)
            if codes is None:
                codes = torch.empty(r, c, dtype=part.dtype, device=part.device)
            codes[i:j] = part
    return QTensor(codes, q.scale, q.spec, q.shape, zero=q.zero, scale_stored=q.scale_stored,
                   global_scale=q.global_scale)


#: rows per chunk of :func:`requantize` (a 15360-wide layer's chunk: 16 MB of fp32 per temporary)
REQUANTIZE_ROWS = 256


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.is_int:
        return torch.int8 if spec.symmetric else torch.uint8
    if spec.dtype == "fp4_e2m1":
        return torch.uint8
    return floating.FP8_DTYPES[spec.dtype]


def code_values(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes -> their fp32 grid values (before scaling; zero point not yet removed)."""
    if spec.dtype == "fp4_e2m1":
        return floating.e2m1_decode(codes)
    return codes.float()


def dequantize_parts(
    codes: torch.Tensor,
    scale: torch.Tensor,
    spec: QuantSpec,
    zero: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes [R, C] with fp32 effective scale [R|1, G|1] (and zero) -> values [R, C] in ``dtype``."""
    r, c = codes.shape
    vals = code_values(codes, spec)
    vg = _grouped(vals, spec) if spec.granularity != "tensor" else vals.reshape(1, 1, r * c)
    # a range spanning most of fp32 can round past its max (e.g. (code - zero) * scale, or an E8M0
    # scale rounded up): saturate at the fp32 max rather than produce inf
    f32max = torch.finfo(torch.float32).max
    if zero is not None:
        out = (vg.double() - zero.unsqueeze(-1).double()) * scale.unsqueeze(-1).double()
    else:
        out = vg * scale.unsqueeze(-1)
    out = out.clamp(-f32max, f32max).float()
    return _ungroup(out, r, c).to(dtype)


def dequantize(q: QTensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QTensor -> tensor of the original shape."""
    return dequantize_parts(q.codes, q.scale, q.spec, q.zero, dtype=dtype).reshape(q.shape)


def _fake_quantize(x, spec, amax, clip_ratio, check_finite) -> torch.Tensor:
    """``dequantize(quantize(x, ...), dtype=x.dtype)`` bit for bit, without materialising codes."""
    if check_finite:
        _check_finite(x)
    return _round_trip(x, spec, amax, clip_ratio).reshape(x.shape).to(x.dtype)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, amax, clip_ratio, check_finite):
        return _fake_quantize(x, spec, amax, clip_ratio, check_finite)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    amax: torch.Tensor | float | None = None,
    clip_ratio: torch.Tensor | float | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize, same shape and dtype; the gradient passes straight through
    (inference without autograd skips the autograd.Function: the same math, plainer to trace)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuant.apply(x, spec, amax, clip_ratio, check_finite)
    return _fake_quantize(x, spec, amax, clip_ratio, check_finite)
