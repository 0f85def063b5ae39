"""Number formats: exact packing, error bounds versus the grid, clear errors on bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffq.errors import FormatError, QuantizationError
from diffq.formats import (
    MXFP4,
    NVFP4,
    QuantSpec,
    dequantize,
    fake_quantize,
    int_range,
    pack_bits,
    pack_int4,
    pack_multiple,
    quantize,
    rtn_values,
    unpack_bits,
    unpack_int4,
)
from diffq.formats.floating import E2M1_VALUES, FP_MAX

INT_SPECS = [
    QuantSpec(f"int{b}", g, gs)
    for b in (2, 3, 4, 8)
    for g, gs in (("tensor", None), ("channel", None), ("group", 8))
] + [QuantSpec(f"uint{b}", "group", 8) for b in (2, 4, 8)]

FP_SPECS = [
    QuantSpec("fp8_e4m3", "token"),
    QuantSpec("fp8_e5m2", "channel"),
    QuantSpec("fp4_e2m1", "group", 8),
    NVFP4,
    MXFP4,
]


def test_pack_unpack_every_signed_code_exact():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(codes, codes).to(torch.int8)  # every pair of nibbles
    packed = pack_int4(grid)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert len(set(packed.flatten().tolist())) == 256  # a bijection onto bytes
    assert torch.equal(unpack_int4(packed), grid)


def test_pack_unpack_every_unsigned_code_exact():
    codes = torch.arange(0, 16, dtype=torch.uint8)
    grid = torch.cartesian_prod(codes, codes).to(torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(grid), signed=False), grid)


def test_pack_layout_low_nibble_first():
    packed = pack_int4(torch.tensor([[1, 2, -1, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0x21, 0x7F]]


def test_pack_rejects_odd_and_out_of_range():
    with pytest.raises(FormatError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([9, -1], dtype=torch.int16))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_bits_round_trips_every_code_in_every_position(bits, signed):
    m = pack_multiple(bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    dtype = torch.int8 if signed else torch.uint8
    values = torch.arange(lo, hi + 1)
    # every code at every position of a packing run: rows are rolls of the code list
    n = max(len(values), m) // m * m + m
    row = values.repeat(n // len(values) + 1)[:n]
    grid = torch.stack([row.roll(i) for i in range(m)]).to(dtype)
    packed = pack_bits(grid, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (m, n * bits // 8)  # really bits per code
    assert torch.equal(unpack_bits(packed, bits, signed=signed), grid)


def test_pack_bits_at_4_is_the_nibble_layout_and_3_bit_layout_is_little_endian():
    c = torch.tensor([[1, 2, -1, 7]], dtype=torch.int8)
    assert torch.equal(pack_bits(c, 4), pack_int4(c))
    # 3-bit codes 1,2,3,4,5,6,7,0 -> bit stream 001 010 011 100 101 110 111 000 (LSB first)
    word = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    packed = pack_bits(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_pack_bits_rejects_bad_width_length_and_range():
    with pytest.raises(FormatError, match="divisible by 8"):
        pack_bits(torch.zeros(12, dtype=torch.int8), 3)
    with pytest.raises(FormatError, match=r"\[-4, 3\]"):
        pack_bits(torch.tensor([4, -1] + [0] * 6, dtype=torch.int16), 3)
    with pytest.raises(FormatError, match="2..7 bits"):
        pack_bits(torch.zeros(8, dtype=torch.int8), 8)
    with pytest.raises(FormatError, match="multiples of 3 bytes"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 3)


finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw, cols=32):
    rows = draw(st.integers(1, 4))
    vals = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, cols) * scale


@settings(max_examples=60, deadline=None)
@given(x=matrices(), idx=st.integers(0, len(INT_SPECS) - 1))
def test_int_error_within_half_step(x, idx):
    spec = INT_SPECS[idx]
    q = quantize(x, spec)
    lo, hi = int_range(spec)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    err = (dequantize(q) - x).abs()
    if spec.granularity == "group":
        step = q.scale.repeat_interleave(spec.group_size, dim=1)
    else:
        step = q.scale.expand_as(x)
    # half a step, plus fp32 rounding of x/scale and of codes*scale
    assert torch.all(err <= 0.5 * step * (1 + 1e-5) + 1e-6 * x.abs()), (spec, (err / step).max())


def _e_grid(spec):
    if spec.dtype == "fp4_e2m1":
        return E2M1_VALUES
    dt = torch.float8_e4m3fn if spec.dtype == "fp8_e4m3" else torch.float8_e5m2
    allb = torch.arange(256, dtype=torch.uint8).view(dt).float()
    return allb[torch.isfinite(allb)].abs().unique()


@settings(max_examples=60, deadline=None)
@given(x=matrices(), idx=st.integers(0, len(FP_SPECS) - 1))
def test_fp_never_exceeds_max_and_rounds_to_nearest(x, idx):
    spec = FP_SPECS[idx]
    q = quantize(x, spec)
    d = dequantize(q)
    fmax = FP_MAX[spec.dtype]
    g = spec.group_size or x.shape[1]
    scale = q.scale.repeat_interleave(g, dim=1) if spec.granularity == "group" else q.scale.expand_as(x)
    y = x / scale  # the value the format had to represent
    assert torch.all(d.abs() <= fmax * scale * (1 + 1e-6))
    # dequantized/scale lies on the grid and is the nearest grid point to y (saturated)
    grid = _e_grid(spec)
    v = (d / scale).abs()
    dist_to_grid = (v.reshape(-1, 1) - grid.reshape(1, -1)).abs().min(1).values
    assert torch.all(dist_to_grid <= 1e-4 * v.reshape(-1).clamp_min(1))
    ys = y.abs().clamp(max=fmax).reshape(-1, 1)
    best = (ys - grid.reshape(1, -1)).abs().min(1).values
    got = (ys.reshape(-1) - v.reshape(-1)).abs()
    assert torch.all(got <= best * (1 + 1e-4) + 1e-6 * ys.reshape(-1))


@pytest.mark.parametrize("spec", INT_SPECS[:3] + FP_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_raise_clear_error(spec, bad):
    x = torch.ones(2, 16)
    x[1, 3] = bad
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(x, spec)


@pytest.mark.parametrize("spec", INT_SPECS + FP_SPECS, ids=lambda s: s.describe())
def test_zero_size_and_all_zero(spec):
    q = quantize(torch.empty(0, 32), spec)
    assert q.codes.shape == (0, 32)
    z = torch.zeros(3, 32)
    q = quantize(z, spec)
    assert torch.all(q.scale > 0), "zero scales are clamped, never 0"
    assert torch.equal(dequantize(q), z)


RTN_SPECS = INT_SPECS + FP_SPECS + [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("uint4", "group", 64, "fp16")]


@pytest.mark.parametrize("spec", RTN_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("clipped", [False, True])
def test_rtn_values_are_the_round_trip_bit_for_bit(spec, clipped):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 128, generator=g) * torch.logspace(-3, 1, 128)  # a range of magnitudes and outliers
    x[5, 7] = 40.0
    ratio = None
    if clipped:
        groups = {"tensor": (1, 1), "channel": (24, 1), "token": (24, 1)}.get(spec.granularity, (24, 128 // (spec.group_size or 1)))
        ratio = 0.5 + 0.5 * torch.rand(groups, generator=g)
    assert torch.equal(rtn_values(x, spec, clip_ratio=ratio), dequantize(quantize(x, spec, clip_ratio=ratio)))
    # the activation path's fake quantization is the same round trip (dynamic and static ranges, bf16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(fake_quantize(xb, spec, clip_ratio=ratio),
                       dequantize(quantize(xb, spec, clip_ratio=ratio), dtype=torch.bfloat16))
    amax = 2.0 * torch.rand(24, 1, generator=g) if spec.granularity != "tensor" else 1.5
    assert torch.equal(fake_quantize(x, spec, amax=amax), dequantize(quantize(x, spec, amax=amax)))


def test_huge_range_saturates_not_overflows():
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0] * 8])
    for spec in INT_SPECS + FP_SPECS:
        d = dequantize(quantize(x, spec))
        assert torch.isfinite(d).all(), spec


def test_fp16_scales_clamp_to_normal_range_as_documented():
    spec = QuantSpec("int4", "group", 8, "fp16")
    x = torch.randn(4, 16)
    q = quantize(x, spec)
    assert q.scale_stored.dtype == torch.float16
    err = (dequantize(q) - x).abs()
    assert torch.all(err <= 0.5 * q.scale.repeat_interleave(8, dim=1) * (1 + 1e-5))
    # beyond fp16's max scale values saturate at qmax * 65504 instead of overflowing
    big = quantize(torch.full((1, 8), 1e6), spec)
    assert float(big.scale.max()) == 65504.0
    assert torch.allclose(dequantize(big), torch.full((1, 8), 7 * 65504.0))
    tiny = quantize(torch.full((1, 8), 1e-9), spec)
    assert float(tiny.scale.min()) == 2.0**-14  # never denormal


def test_group_size_must_divide():
    with pytest.raises(FormatError, match="does not divide"):
        quantize(torch.randn(2, 10), QuantSpec("int4", "group", 4))


def test_bad_specs_rejected():
    with pytest.raises(FormatError):
        QuantSpec("int9")
    with pytest.raises(FormatError):
        QuantSpec("int4", "group")
    with pytest.raises(FormatError):
        QuantSpec("int4", "channel", 32)
    with pytest.raises(FormatError):
        QuantSpec("int4", "group", 32, "e8m0")


def test_int8_relative_error_small_on_gaussian():
    x = torch.randn(64, 256)
    d = dequantize(quantize(x, QuantSpec("int8", "channel")))
    rel = (d - x).norm() / x.norm()
    assert rel < 0.01
    d4 = dequantize(quantize(x, QuantSpec("int4", "group", 32)))
    assert (d4 - x).norm() / x.norm() > rel  # fewer bits, more error


def test_nvfp4_beats_mxfp4_on_gaussian():
    # finer blocks and non-power-of-two scales: NVFP4 should be more accurate than MXFP4
    x = torch.randn(32, 256)
    e_nv = (dequantize(quantize(x, NVFP4)) - x).pow(2).mean()
    e_mx = (dequantize(quantize(x, MXFP4)) - x).pow(2).mean()
    assert e_nv < e_mx


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    y = fake_quantize(x, QuantSpec("int4", "group", 32))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not torch.equal(y.detach(), x.detach())


def test_amax_override_and_clip_ratio():
    x = torch.linspace(-1, 1, 32).reshape(1, 32)
    q = quantize(x, QuantSpec("int8", "tensor"), amax=0.5)
    assert math.isclose(float(q.scale), 0.5 / 127, rel_tol=1e-6)
    assert float(dequantize(q).max()) <= 0.5 + 1e-6  # clipped
    q2 = quantize(x, QuantSpec("int8", "tensor"), clip_ratio=0.5)
    assert torch.allclose(q2.scale, q.scale)


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("int8", "channel"),
                                  QuantSpec("int4", "channel")])
def test_coarse_to_fine_mse_clip_is_within_half_a_percent_of_exhaustive_search(spec):
    from diffq.methods.weight_clipping import MSE_GRID, _per_group, mse_clip_ratio

    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * torch.rand(128, 1, generator=g)
    w[0, 3] = 20.0  # an outlier row, where clipping matters most
    err = lambda r: _per_group((dequantize(quantize(w, spec, clip_ratio=r)) - w).pow(2), spec)
    exhaustive = torch.stack([err(r) for r in MSE_GRID]).amin(0)
    fast = err(mse_clip_ratio(w, spec))
    assert float(fast.sum()) <= 1.005 * float(exhaustive.sum())
    assert float(fast.sum()) <= float(err(1.0).sum())  # never worse than min-max (strictly better at 4 bits)
    if spec.dtype == "int4":
        assert float(fast.sum()) < 0.99 * float(err(1.0).sum())


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("uint4", "group", 64, "fp16"),
                                  QuantSpec("int4", "channel")])
def test_coarse_mse_clip_is_the_exhaustive_best_of_the_coarse_ratios(spec):
    """``mse-coarse`` (refine=False) picks, per group, the lowest-error ratio of 1.0, 0.9 .. 0.5 (the
    first of equal errors); the full search is never worse than it and better somewhere here."""
    from diffq.methods.weight_clipping import MSE_GRID, _per_group, clip_ratio_for, mse_clip_ratio

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    w[2, 9] = 25.0
    per_group = lambda r: _per_group((dequantize(quantize(w, spec, clip_ratio=r)) - w).pow(2), spec)
    coarse = MSE_GRID[::4]
    assert coarse == pytest.approx((1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    errs = torch.stack([per_group(r) for r in coarse])  # [6, R, G]
    want = torch.tensor(coarse)[errs.argmin(0)]
    got = clip_ratio_for(w, spec, "mse-coarse")
    assert torch.equal(got, mse_clip_ratio(w, spec, refine=False))
    assert torch.allclose(got.expand_as(want), want)
    full = per_group(mse_clip_ratio(w, spec))
    assert bool((full <= per_group(got) * (1 + 1e-6)).all())
    assert float(full.sum()) < float(per_group(got).sum())


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("uint4", "group", 64, "fp16"),
                                  NVFP4])
def test_mse_clip_ratio_does_not_depend_on_the_chunk_size(spec, monkeypatch):
    """The clip search's row chunks (CHUNK_ELEMENTS, a speed setting) change nothing: the same ratios
    with one row per chunk, a few rows, and the whole tensor at once; with and without importance."""
    import diffq.methods.weight_clipping as wc

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g)
    w[5, 7] = 30.0
    imp = torch.rand(256, generator=g)
    out = []
    for elements in (1, 5 * 4 * 64 * 7, 1 << 30):
        monkeypatch.setattr(wc, "CHUNK_ELEMENTS", elements)
        out.append((wc.mse_clip_ratio(w, spec), wc.mse_clip_ratio(w, spec, importance=imp)))
    for plain, weighted in out[1:]:
        assert torch.equal(plain, out[0][0]) and torch.equal(weighted, out[0][1])
    assert not torch.equal(out[0][0], out[0][1])  # the importance does change the choice here


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("uint4", "group", 64, "fp16"),
                                  QuantSpec("fp8_e4m3", "channel"), NVFP4])
def test_requantize_in_row_chunks_is_exact(spec, monkeypatch):
    """requantize encodes large tensors in row chunks (bounded temporaries): the same codes as one pass."""
    from diffq.formats import core

    torch.manual_seed(0)
    w = torch.randn(600, 256) * 3
    q = quantize(w, spec)
    y = w + 0.05 * torch.randn_like(w)
    chunked = core.requantize(q, y)
    monkeypatch.setattr(core, "REQUANTIZE_ROWS", 10_000)
    whole = core.requantize(q, y)
    assert chunked.codes.dtype == whole.codes.dtype
    assert torch.equal(chunked.codes.view(torch.uint8), whole.codes.view(torch.uint8))


def test_abs_max_equals_abs_then_amax_bit_for_bit():
    from diffq.formats import abs_max

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 64, generator=g) * torch.logspace(-8, 8, 64)
    x[0, 0, 5] = float("nan")
    x[1, 2] = -0.0  # an all-negative-zero group: +0, as |x| gives
    x[2, 1, :] = -3.0
    for dim, keep in ((-1, False), (1, True), ((0, 1), False)):
        want, got = x.abs().amax(dim, keepdim=keep), abs_max(x, dim, keepdim=keep)
        assert got.shape == want.shape
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert not torch.signbit(got).any()
