"""The 4-bit methods on a synthetic layer built to show them: outlier input channels, outlier weights,
inputs whose scale changes over the denoising steps. Each method must lower the output error on
held-out inputs, in the order the issue asks for; GPTQ must lower ``‖XWᵀ - XQ(W)ᵀ‖`` on its own
calibration inputs for every integer and FP4 format; the shifted unsigned activations must be exact
in full precision and better than signed ones on GELU outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffq.calibration import CalibrationStats
from diffq.calibration.reservoir import InputReservoir
from diffq.calibration.stats import LayerStats
from diffq.errors import CalibrationError
from diffq.formats import NVFP4, QuantSpec, decode_scale, dequantize, grid_values, quantize, range_grid
from diffq.methods.gptq import DAMP, feedback_matrix, gptq_quantize
from diffq.methods.lowrank import top_subspace
from diffq.methods.smooth_search import output_error, search_alpha
from diffq.methods.smoothing import apply_smoothing, channel_profile, smooth_factors
from diffq.modules import ActQuantizer, ShiftedActQuantizer
from diffq.pipelines.input_bounds import FLOORS
from diffq.quantization.build import build_layer
from diffq.quantization.presets import get_preset
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice

K, N, STEPS, ROWS = 128, 96, 4, 96
W4 = QuantSpec("int4", "group", 32, "fp16")
A4 = QuantSpec("int4", "group", 32)


def _inputs(seed: int, steps: int = STEPS, rows: int = ROWS) -> list[torch.Tensor]:
    """Per step [rows, K]: correlated channels (16 latent directions + noise, like real activations),
    6 outlier channels (x12), a scale that grows over the steps. The directions are fixed, the rows
    drawn from ``seed``."""
    mix = torch.randn(16, K, generator=torch.Generator().manual_seed(99)) / 4
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(K)
    scale[torch.arange(0, K, K // 6)[:6]] = 12.0
    return [(torch.randn(rows, 16, generator=g) @ mix + 0.3 * torch.randn(rows, K, generator=g)) * scale
            * (1.0 + 0.5 * t) for t in range(steps)]


def _layer() -> nn.Linear:
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        lin.weight[torch.randint(0, N, (12,), generator=g), torch.randint(0, K, (12,), generator=g)] = 0.8
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return lin


def _stats(name: str, steps: list[torch.Tensor]) -> CalibrationStats:
    st = LayerStats.empty(len(steps), K)
    res = InputReservoir.empty(len(steps), ROWS, K)
    gen = torch.Generator().manual_seed(0)
    for t, x in enumerate(steps):
        st.update(t, x)
        res.update(t, x, gen)
    return CalibrationStats("test", "none", len(steps), list(range(900, 0, -900 // len(steps)))[: len(steps)],
                            {name: st}, reservoirs={name: res})


def _error(recipe: Recipe, lin: nn.Linear, stats: CalibrationStats | None, x: torch.Tensor) -> float:
    choice = LayerChoice("layer", "other", lin, weight=recipe.weight, act=recipe.act, rank=recipe.rank,
                         smooth_alpha=recipe.smooth_alpha, recipe=recipe)
    q = build_layer(choice, stats)
    with torch.no_grad():
        ref = lin(x)
        return float((q(x) - ref).square().sum() / ref.square().sum())


@pytest.fixture(scope="module")
def setting():
    lin = _layer()
    stats = _stats("layer", _inputs(seed=1))
    held_out = torch.cat(_inputs(seed=2))
    return lin, stats, held_out


def _recipe(**kw) -> Recipe:
    base = {"weight": W4, "act": A4, "weight_clip": "mse"}
    return Recipe(**(base | kw))


def test_each_method_lowers_the_held_out_output_error_in_order(setting):
    lin, stats, x = setting
    err = {
        "rtn": _error(_recipe(), lin, stats, x),
        "smooth": _error(_recipe(smooth_alpha=0.5), lin, stats, x),
        "smooth+svd": _error(_recipe(smooth_alpha=0.5, rank=8), lin, stats, x),
        "+search": _error(_recipe(smooth_alpha=0.5, rank=8, smooth_search=True), lin, stats, x),
        "+gptq": _error(_recipe(smooth_alpha=0.5, rank=8, rounding="gptq"), lin, stats, x),
        "+both": _error(_recipe(smooth_alpha=0.5, rank=8, smooth_search=True, rounding="gptq"), lin, stats, x),
    }
    assert err["rtn"] > err["smooth"] > err["smooth+svd"], err
    assert err["smooth+svd"] > err["+search"], err
    assert err["smooth+svd"] > err["+gptq"], err
    assert err["+both"] < min(err["+search"], err["+gptq"]) * 1.02, err
    assert err["+both"] < 0.5 * err["rtn"], err


def test_asymmetric_weights_and_refit_do_not_hurt_on_held_out_inputs(setting):
    lin, stats, x = setting
    base = _error(_recipe(smooth_alpha=0.5, rank=8), lin, stats, x)
    assert _error(_recipe(smooth_alpha=0.5, rank=8, lowrank_refit=3), lin, stats, x) <= base * 1.001
    asym = _recipe(smooth_alpha=0.5, rank=8, weight=QuantSpec("uint4", "group", 32, "fp16"))
    assert _error(asym, lin, stats, x) < base


FORMATS = [W4, QuantSpec("uint4", "group", 32, "fp16"), QuantSpec("int4", "channel"), QuantSpec("int8", "channel"),
           QuantSpec("int3", "group", 32, "fp16"), NVFP4, QuantSpec("fp4_e2m1", "group", 32, "e8m0")]


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_calibration_output_error_for_every_format(spec, act_order):
    lin = _layer()
    x = torch.cat(_inputs(seed=1))
    w = lin.weight.detach()
    rtn = quantize(w, spec)
    q = gptq_quantize(w, rtn, x, act_order=act_order)
    # same format and scale layout; act-order and per-row formats keep RTN's scales ("static groups"),
    # otherwise each group's scales follow the compensated weights; the NVFP4 tensor scale never moves
    assert q.spec == rtn.spec and q.codes.dtype == rtn.codes.dtype and q.scale.shape == rtn.scale.shape
    assert (q.global_scale is None) == (rtn.global_scale is None)
    if rtn.global_scale is not None:
        assert torch.equal(q.global_scale, rtn.global_scale)
    if act_order or spec.granularity != "group":
        assert torch.equal(q.scale, rtn.scale)
    # the stored scales decode to the effective ones (what a checkpoint holds is what runs)
    assert torch.equal(decode_scale(q.scale_stored, spec, q.global_scale), q.scale)
    e_rtn = (x @ (w - dequantize(rtn)).t()).square().sum()
    e_gptq = (x @ (w - dequantize(q)).t()).square().sum()
    assert e_gptq < 0.9 * e_rtn, (float(e_gptq), float(e_rtn))


def _textbook_gptq(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """GPTQ as published, in float64, one column at a time: the upper Cholesky factor U of the damped
    H⁻¹, the *updated* column rounded, its error scaled by 1/U_jj and moved onto the later columns;
    group scales (min-max) from the updated columns when a group starts. Returns the rounded values."""
    w = w.double().clone()
    h = (x.t() @ x).double()
    h += DAMP * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = spec.group_size if spec.granularity == "group" else w.shape[1]
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % g == 0:
            scale = range_grid(spec, w[:, j : j + g].abs().amax(1).float())[0].double()
        q[:, j] = grid_values(w[:, j], scale, spec)
        w[:, j + 1 :] -= ((w[:, j] - q[:, j]) / u[j, j])[:, None] * u[j, j + 1 :][None]
    return q


@pytest.mark.parametrize("spec", [W4, QuantSpec("int4", "channel")], ids=lambda s: s.describe())
def test_gptq_is_the_textbook_algorithm(spec):
    """The implementation (lazy batches, feedback through the Cholesky factor of H itself, dynamic
    groups from the compensated columns) rounds like the textbook algorithm: the same codes up to
    fp32 noise (GPTQ is chaotic: one flipped tie changes the later columns) and the same error."""
    lin = _layer()
    x = torch.cat(_inputs(seed=1))
    w = lin.weight.detach()
    ref = _textbook_gptq(w, x, spec)
    got = dequantize(gptq_quantize(w, quantize(w, spec), x)).double()
    same = ((got - ref).abs() <= 1e-6 * ref.abs().amax()).double().mean()
    err = lambda v: float((x.double() @ (w.double() - v).t()).square().sum())
    assert same > 0.98, float(same)
    assert abs(err(got) / err(ref) - 1) < 0.005, (err(got), err(ref))


def test_gptq_in_place_rounding_equals_the_copying_form():
    """gptq_quantize rounds its transposed working copy in place (originals transposed a block at a
    time from the input): the same codes as rounding a copy, for dynamic groups and static grids,
    and with more input channels than one Hessian block."""
    from diffq.methods.gptq import expand_grid, round_columns, transposed

    torch.manual_seed(0)
    w, x = torch.randn(40, 320), torch.randn(200, 320) * (torch.rand(320) * 3)
    for spec in (W4, QuantSpec("int4", "channel")):
        grid = quantize(w, spec)
        got = gptq_quantize(w, grid, x, max_columns=128)  # 3 Hessian blocks, in place
        scale, _ = expand_grid(grid)
        wt, st = transposed(w), transposed(scale)
        copy = torch.cat([round_columns(wt[c:c + 128], st[c:c + 128], None, spec, x[:, c:c + 128].t() @ x[:, c:c + 128])
                          for c in range(0, 320, 128)])
        assert torch.equal(wt, transposed(w))  # the copying form leaves its input alone
        if spec.granularity == "channel":  # static grid: compare with the copying form directly
            assert torch.equal(dequantize(got), transposed(copy))
        inplace = wt.clone()
        done = round_columns(inplace[:128], st[:128], None, spec, x[:, :128].t() @ x[:, :128],
                             original=lambda b1, b2: w[:, b1:b2].t().contiguous())
        assert done.data_ptr() == inplace.data_ptr() and torch.equal(done, copy[:128])


def test_transposed_copies_are_exact_for_every_layout():
    """transposed (tiles for column slices, one copy for contiguous matrices) equals x.t().contiguous()
    bit for bit, also for a row count that is not a multiple of the tile."""
    from diffq.methods.layout import TRANSPOSE_TILE, transposed

    x = torch.randn(3 * TRANSPOSE_TILE + 5, 1100)
    for view in (x, x[:, 128:256], x[:, 7:900], x[:40, :30]):
        got = transposed(view)
        assert got.is_contiguous() and torch.equal(got, view.t().contiguous())


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64), QuantSpec("uint4", "group", 64), NVFP4])
def test_gptq_with_dynamic_groups_needs_only_the_grid(spec):
    """quantize_grid (no codes) gives GPTQ the same start as quantize: the same result bit for bit."""
    from diffq.formats import quantize_grid

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=g)
    x = torch.randn(96, 256, generator=g) * torch.rand(256, generator=g)
    full, grid = quantize(w, spec), quantize_grid(w, spec)
    assert grid.codes.numel() == 0 and grid.shape == full.shape
    for f in ("scale", "scale_stored", "zero", "global_scale"):
        a, b = getattr(full, f), getattr(grid, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    a, b = gptq_quantize(w, full, x), gptq_quantize(w, grid, x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale_stored, b.scale_stored)
    assert not torch.equal(a.codes, full.codes)  # GPTQ moved codes: the comparison is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reversed_matrices_are_flips_bit_for_bit_in_either_layout(dtype):
    """The fast reversal of GPTQ's Hessian and factor: values, layout and torch's alignment of a flip."""
    from diffq.methods.gptq import _reversed

    a = torch.randn(300, 300, dtype=dtype)
    for m in (a, a.t(), a[::2, ::3]):  # row-major, column-major (LAPACK's factors), neither
        got, want = _reversed(m), m.flip(0, 1)
        assert torch.equal(got, want) and got.stride() == want.stride() and got.data_ptr() % 64 == 0
        assert got.untyped_storage().data_ptr() != m.untyped_storage().data_ptr()  # a copy, as flip's


def test_gptq_group_columns_match_the_triangular_solve():
    """_group_columns applies the inverse of the group's unit triangular block of M with one product:
    the compensated columns of the solve they replace, to fp32 rounding, as rows [R, g]."""
    from diffq.methods.gptq import _group_columns

    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 128, generator=g)
    h = a.t() @ a + torch.eye(128)
    m = feedback_matrix(h)
    w0b, fed = torch.randn(128, 70, generator=g), torch.randn(128, 70, generator=g)
    got = _group_columns(w0b, fed, m, 64, 128, 0)
    solve = torch.linalg.solve_triangular(m[64:, 64:].t(), fed[64:] - w0b[64:], upper=False, unitriangular=True)
    ref = (solve + w0b[64:]).t()
    assert got.shape == (70, 64) and got.is_contiguous()
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max())), float((got - ref).abs().max())


@pytest.mark.parametrize("kind", ["zero", "rank1", "nan_free_tiny"])
def test_singular_hessian_is_damped_never_a_crash(kind):
    w = _layer().weight.detach()
    if kind == "zero":
        x = torch.zeros(8, K)
    elif kind == "rank1":
        x = torch.ones(64, 1) * torch.randn(1, K)
    else:
        x = torch.randn(4, K) * 1e-20
    q = gptq_quantize(w, quantize(w, W4), x)
    assert torch.isfinite(dequantize(q)).all()
    m = feedback_matrix(x.t() @ x)
    assert torch.isfinite(m).all() and m.shape == (K, K) and torch.equal(m.diagonal(), torch.ones(K))



def _conv_input(seed: int) -> torch.Tensor:
    """Spatially smooth, channel-correlated conv inputs [4, 32, 8, 8] (neighbouring pixels alike)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 8, 8, 8, generator=g)
    z = F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    return torch.einsum("bchw,kc->bkhw", z, mix) + 0.1 * torch.randn(4, 32, 8, 8, generator=g)


def test_gptq_conv_exact_patch_hessian_beats_per_tap_beats_rtn():
    torch.manual_seed(3)
    conv = nn.Conv2d(32, 16, 3, padding=1)
    x = _conv_input(0)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 32)
    gen = torch.Generator().manual_seed(0)
    res, patches = InputReservoir.empty(1, rows.shape[0], 32), InputReservoir.empty(1, rows.shape[0], 288)
    res.update(0, rows, gen)
    patches.update_patches(0, x, conv, gen)
    st = LayerStats.empty(1, 32)
    st.update(0, rows)
    per_tap = CalibrationStats("test", "none", 1, [500], {"conv": st}, reservoirs={"conv": res})
    exact = CalibrationStats("test", "none", 1, [500], {"conv": st}, reservoirs={"conv": res},
                             patches={"conv": patches})
    spec = QuantSpec("int4", "group", 16, "fp16")
    held_out = _conv_input(1)
    errs = {}
    for label, recipe, stats in (("rtn", Recipe(weight=spec), None), ("per_tap", Recipe(weight=spec, rounding="gptq"),
                                 per_tap), ("patches", Recipe(weight=spec, rounding="gptq"), exact)):
        ch = LayerChoice("conv", "resblock_conv", conv, weight=spec, recipe=recipe)
        with torch.no_grad():
            errs[label] = float((build_layer(ch, stats)(held_out) - conv(held_out)).square().sum())
    assert errs["rtn"] > errs["per_tap"] > errs["patches"], errs


def test_gptq_without_reservoir_names_the_layer_and_the_fix(setting):
    lin, stats, _ = setting
    bare = CalibrationStats("test", "none", STEPS, stats.step_buckets, stats.layers)
    ch = LayerChoice("layer", "other", lin, weight=W4, recipe=_recipe(rounding="gptq"))
    with pytest.raises(CalibrationError, match=r"'layer'.*reservoir="):
        build_layer(ch, bare)
    with pytest.raises(CalibrationError, match="reservoir="):
        build_layer(ch, None)


def test_balanced_profile_is_not_set_by_the_loudest_steps():
    absmax = torch.ones(4, 8)
    absmax[0] = 10.0  # one loud step, every channel 10x
    absmax[0, 3] = 100.0  # channel 3 an outlier only in that step
    absmax[1:, 5] = 4.0  # channel 5 an outlier in every other step
    observed = torch.ones(4, dtype=torch.bool)
    plain = channel_profile(absmax, observed, "max")
    balanced = channel_profile(absmax, observed, "balanced")
    assert plain[3] / plain[5] == 10.0  # the loud step decides: channel 3 looks 10x worse than 5
    assert balanced[5] > balanced[3]  # three steps of four see channel 5 as the outlier


@pytest.mark.parametrize("act", ["SiLU", "GELU", "GELU_tanh", "ApproximateGELU"])
def test_structural_floors_hold_for_the_activations(act):
    z = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    y = {"SiLU": F.silu(z), "GELU": F.gelu(z), "GELU_tanh": F.gelu(z, approximate="tanh"),
         "ApproximateGELU": z * torch.sigmoid(1.702 * z)}[act]
    floor = FLOORS[act.split("_")[0]]
    assert float(y.min()) >= floor
    assert float(y.min()) - floor < 2e-3  # tight: the shift wastes almost no range


def test_shifted_unsigned_activations_are_exact_and_beat_signed_on_gelu_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    x = F.gelu(torch.randn(256, K) * 2)
    rec = {"signed": _recipe(rounding="rtn"), "unsigned": _recipe(act_unsigned=True)}
    out = {}
    for label, recipe in rec.items():
        ch = LayerChoice("ffn", "ffn_down", lin, weight=recipe.weight, act=recipe.act, recipe=recipe)
        q = build_layer(ch, None, floor=FLOORS["GELU"])
        with torch.no_grad():
            out[label] = (q, q(x))
    q, y = out["unsigned"]
    assert isinstance(q.act, ShiftedActQuantizer) and q.act.spec.dtype == "uint4"
    # exact: the kernel form Q(x + c)·Wqᵀ + (b - c·Wqᵀ) is the module's output
    c = q.act.shift
    wq = q.weight
    with torch.no_grad():
        xq = ActQuantizer.forward(q.act, x + c)  # the unsigned codes' values, before the shift comes off
        folded = xq @ wq.t() + (q.bias - c @ wq.t())
    torch.testing.assert_close(folded, y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = lin(x)
    signed_err = float((out["signed"][1] - ref).square().sum())
    unsigned_err = float((y - ref).square().sum())
    assert unsigned_err < 0.8 * signed_err


def _modulated_tokens(seed: int, samples: int = 8, tokens: int = 64) -> torch.Tensor:
    """[samples, tokens, K]: a normalised token part plus a per-sample, per-channel offset (the
    shift of an adaLN-modulated norm: the same for every token of a sample, different per sample)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, tokens, K, generator=g) + 4.0 * torch.randn(samples, 1, K, generator=g)


def test_centered_activations_remove_per_sample_channel_offsets():
    lin = _layer()
    x = _modulated_tokens(3)
    plain = ActQuantizer(A4)
    centered = ActQuantizer(A4, center=True)
    with torch.no_grad():
        c = x.mean(dim=1, keepdim=True)
        # the definition: Q(x - c) + c with c each sample's channel means over its tokens
        torch.testing.assert_close(centered(x), ActQuantizer.forward(plain, x - c) + c)
        # rows without a token axis are quantized as they are
        torch.testing.assert_close(centered(x[0]), plain(x[0]))
        err = {k: float((q(x) - x).square().sum()) for k, q in (("plain", plain), ("centered", centered))}
    assert err["centered"] < 0.25 * err["plain"]
    # in a layer built by the recipe, and through the layer's output
    out = {}
    for label, recipe in {"plain": _recipe(rounding="rtn"), "centered": _recipe(rounding="rtn", act_center=True)}.items():
        ch = LayerChoice("layer", "ffn_up", lin, weight=recipe.weight, act=recipe.act, recipe=recipe)
        q = build_layer(ch, None)
        assert q.act.center == (label == "centered")
        with torch.no_grad():
            out[label] = float((q(x) - lin(x)).square().sum())
    assert out["centered"] < 0.75 * out["plain"]  # the weight error is the same in both
    # conv inputs are not centred (measured to hurt on digits-sd)
    conv = nn.Conv2d(K, N, 3, padding=1)
    recipe = _recipe(rounding="rtn", act_center=True)
    assert not build_layer(LayerChoice("conv", "resblock_conv", conv, weight=recipe.weight, act=recipe.act,
                                       recipe=recipe), None).act.center


def test_centered_layer_round_trips_through_its_record():
    from diffq.quantization.layer_record import layer_info, rebuild_layer

    recipe = _recipe(rounding="rtn", act_center=True)
    q = build_layer(LayerChoice("layer", "ffn_up", _layer(), weight=recipe.weight, act=recipe.act, recipe=recipe), None)
    back = rebuild_layer(layer_info(q), dict(q.state_dict()))
    assert back.act.center
    x = _modulated_tokens(5)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_act_center_needs_dynamic_signed_activations():
    from diffq.errors import RecipeError

    with pytest.raises(RecipeError, match="act_unsigned"):
        _recipe(act_center=True, act_unsigned=True)
    with pytest.raises(RecipeError, match="dynamic"):
        _recipe(act=None, act_center=True)
    with pytest.raises(ValueError, match="dynamic"):
        ActQuantizer(QuantSpec("int8", "tensor"), amax=torch.ones(1, 1), center=True)


def test_alpha_search_scores_are_the_explicit_output_errors():
    """search_alpha's shortcuts (dense part once, the branch through its factors, the smoothed weight
    never materialised, values without codes) give the error of the explicitly built candidate."""
    lin = _layer()
    w = lin.weight.detach().float()
    x = torch.cat(_inputs(seed=1))
    rw = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(4)) + 0.5
    profile = x.abs().amax(0)
    wv = lambda r, s: dequantize(quantize(r, W4))
    av = lambda xs, s: dequantize(quantize(xs, A4))
    found = search_alpha(w, profile, x, rw, rank=8, weight_values=wv, act_values=av, outputs=64)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:64].sort().values
    for alpha, got in found.errors.items():
        s = smooth_factors(profile, w, alpha, K)
        ws = apply_smoothing(w, s)
        u, sv, vh = top_subspace(ws, 8)
        r = ws[rows] - (u[rows] * sv) @ vh
        want = output_error(x / s, av(x / s, s), r, wv(r, s), rw)
        assert abs(got - want) <= 1e-4 * want, (alpha, got, want)


def test_alpha_search_keeps_the_chosen_candidates_subspace_for_the_split():
    """keep_subspace returns the subspace the chosen α was scored with; on a small layer (full SVD)
    the split from it is the split of the smoothed weight bit for bit, and a wrong-shaped one is
    refused with a ShapeError."""
    from diffq.errors import ShapeError
    from diffq.methods.lowrank import lowrank_split

    lin = _layer()
    w = lin.weight.detach().float()
    x = torch.cat(_inputs(seed=1))
    rw = torch.ones(x.shape[0])
    profile = x.abs().amax(0)
    wv = lambda r, s: dequantize(quantize(r, W4))
    av = lambda xs, s: dequantize(quantize(xs, A4))
    found = search_alpha(w, profile, x, rw, rank=8, weight_values=wv, act_values=av, keep_subspace=True)
    assert found.subspace is not None and found.alpha in found.errors
    assert search_alpha(w, profile, x, rw, rank=8, weight_values=wv, act_values=av).subspace is None
    ws = apply_smoothing(w, smooth_factors(profile, w, found.alpha, K))
    for got, want in zip(lowrank_split(ws, 8, subspace=found.subspace), lowrank_split(ws, 8)):
        assert torch.equal(got, want)
    with pytest.raises(ShapeError, match="subspace"):
        lowrank_split(ws, 4, subspace=found.subspace)


def test_a_searched_layer_splits_with_the_searchs_subspace(setting, monkeypatch):
    """build_layer hands the α search's subspace of the chosen smoothing to the low-rank split (no
    second SVD); on a small layer (full SVDs) the layer equals the one split from scratch."""
    import diffq.quantization.build as build_mod

    lin, stats, x = setting
    recipe = _recipe(smooth_alpha=0.5, smooth_search=True, rank=8, rounding="gptq")
    choice = lambda: LayerChoice("layer", "other", lin, weight=recipe.weight, act=recipe.act, rank=8,
                                 smooth_alpha=0.5, recipe=recipe)
    seen = []
    real = build_mod.lowrank_split

    def spy(w, rank, subspace=None):
        seen.append(subspace)
        return real(w, rank, subspace=subspace)

    monkeypatch.setattr(build_mod, "lowrank_split", spy)
    reused = build_layer(choice(), stats)
    monkeypatch.setattr(build_mod, "lowrank_split", lambda w, rank, subspace=None: real(w, rank))
    fresh = build_layer(choice(), stats)
    assert len(seen) == 1 and seen[0] is not None and seen[0][1].numel() == 8
    a, b = reused.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if a[k].device.type != "meta")
    assert reused.lr_down is not None and torch.equal(reused.lr_down, fresh.lr_down)
    with torch.no_grad():
        assert torch.equal(reused(x), fresh(x))


def test_one_power_iteration_per_warm_candidate_is_converged():
    """Why ``smooth_power_iters`` is 1: on a layer wider than 512 (randomized range finder) with a
    top-16 structure and one outlier input channel, one iteration per warm-started candidate scores
    every candidate within 0.1% of three iterations, and none (the subspace of the previous
    candidate's smoothing, projected once) scores some candidate over 0.5% worse."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(600, 16, generator=g) @ torch.randn(16, 640, generator=g) + 0.05 * torch.randn(600, 640, generator=g)
    x = torch.randn(256, 640, generator=g)
    x[:, 3] *= 20
    rw = torch.ones(256)
    wv = lambda r, s: dequantize(quantize(r, W4))
    av = lambda xs, s: dequantize(quantize(xs, A4))
    runs = {i: search_alpha(w, x.abs().amax(0), x, rw, rank=16, weight_values=wv, act_values=av, power_iters=i,
                            grid=(0.3, 0.5, 0.7), outputs=128).errors for i in (0, 1, 3)}
    for a, e in runs[3].items():
        assert abs(runs[1][a] - e) <= 1e-3 * e, (a, runs[1][a], e)
    assert max(runs[0][a] / e for a, e in runs[3].items()) > 1.005


def test_search_cost_settings_are_validated():
    from diffq.errors import RecipeError

    for bad in ({"smooth_outputs": 0}, {"smooth_power_iters": -1}, {"smooth_power_iters": 9},
                {"smooth_clip": "coarse"}, {"act_clip": "mse-coarse"}, {"weight_clip": "fast"}):
        with pytest.raises(RecipeError):
            _recipe(**bad)
    assert _recipe(smooth_clip="mse-coarse", weight_clip="mse-coarse").smooth_clip == "mse-coarse"


def test_range_finder_with_column_scale_is_that_of_the_scaled_weight():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(600, 40, generator=g) @ torch.randn(40, 700, generator=g) + 0.01 * torch.randn(600, 700, generator=g)
    col = torch.rand(700, generator=g) * 3 + 0.1
    u1, s1, vh1 = top_subspace(w, 16, col_scale=col)  # randomized: min side 600 > 512
    u2, s2, vh2 = top_subspace(w * col, 16)
    assert torch.allclose(s1, s2, rtol=1e-4)
    assert torch.allclose((u1 * s1) @ vh1, (u2 * s2) @ vh2, atol=1e-3 * float(s2[0]) / 700 ** 0.5)


def test_presets_that_need_rows_say_so():
    assert get_preset("w4a4-svd").needs_reservoir == (get_preset("w4a4-svd").rounding == "gptq"
                                                        or get_preset("w4a4-svd").smooth_search)
    plain = get_preset("w4a4-svd").without_calibration()
    assert not plain.needs_calibration and plain.weight == get_preset("w4a4-svd").weight
