"""Whole-pipeline quantization on every tiny family: calibrate, quantize with every preset,
generate; save/load round trips; errors for bad input."""

import copy

import pytest
import torch

import diffq
from diffq.calibration import CalibrationStats, calibrate, grouping_mse
from diffq.errors import CalibrationError, CheckpointError, RecipeError, UnsupportedModelError
from diffq.generation import generate
from diffq.modules import quantizable_layers, quantized_modules
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import TINY_FAMILIES, tiny_pipeline

PRESETS = [p for p in diffq.PRESETS if p != "mixed"]  # "mixed" needs a bit plan: tests/test_allocation.py
PROMPTS = ["a cat", "a dog"]
STEPS = 4


@pytest.fixture(scope="module")
def calibrated():
    """(pipe, stats, fp images) per family, built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            pipe = tiny_pipeline(family)
            prompts = _prompts(pipe)
            stats = calibrate(pipe, prompts, num_inference_steps=STEPS, progress=False, reservoir=16)
            ref = generate(pipe, prompts, [0, 1], num_inference_steps=STEPS)
            cache[family] = (pipe, stats, ref)
        return cache[family]

    return get


def _prompts(pipe):
    if adapter_for(pipe).name == "dit":
        return [0, 1]
    return PROMPTS


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_calibration_covers_every_layer_and_step(family, calibrated):
    pipe, stats, _ = calibrated(family)
    den = adapter_for(pipe).denoiser(pipe)
    layers = quantizable_layers(den)
    assert stats.num_steps == STEPS
    assert all(b >= 0 for b in stats.step_buckets), stats.step_buckets
    # buckets follow the denoising order: high noise (large t) first
    assert stats.step_buckets[0] > stats.step_buckets[-1]
    unobserved = set(stats.meta["unobserved_layers"])
    for name in layers:
        if name in unobserved:
            continue
        st = stats.layers[name]
        assert bool(st.observed.all()), f"{name} misses steps"
        assert torch.isfinite(st.absmax).all()
    assert len(unobserved) <= len(layers) // 10, f"too many layers never ran: {sorted(unobserved)[:5]}"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_preset_quantizes_and_generates(family, preset, calibrated):
    pipe, stats, ref = calibrated(family)
    p = copy.deepcopy(pipe)
    summary = diffq.quantize(p, preset, calibration=stats, progress=False)
    assert len(summary.quantized) >= len(summary.layers) // 2, summary.table()
    # every quantized layer names what computes it on a GPU; dense layers name nothing
    assert all(r.kernel.startswith(("triton ", "reference (")) for r in summary.quantized)
    assert all(r.kernel == "-" for r in summary.layers if r.skipped) and "sm_" in summary.kernel_target
    # static activation tables (a [1001] timestep -> group map per layer) outweigh the savings of
    # these 32-wide toy layers; at real layer sizes they are noise (benchmarks/sd15_size.py)
    if not diffq.get_preset(preset).act_static:
        assert summary.size_ratio > 1.0
    out = generate(p, _prompts(p), [0, 1], num_inference_steps=STEPS)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if preset == "w8a8":  # 8-bit weights and activations stay close to full precision even on random weights
        mse = float((out - ref).pow(2).mean())
        assert 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item() > 20


@pytest.mark.parametrize(
    ("family", "preset"), [("sd", "w4a4-svd"), ("sd", "w8a8-static"), ("flux", "fp4"), ("dit", "w4a8"), ("sd3", "w3a8")]
)
def test_save_load_bit_identical(tmp_path, calibrated, family, preset):
    pipe, stats, _ = calibrated(family)
    p = copy.deepcopy(pipe)
    summary = diffq.quantize(p, preset, calibration=stats, progress=False)
    out = generate(p, _prompts(p), [0, 1], num_inference_steps=STEPS)
    d = tmp_path / f"{family}-{preset}"
    diffq.save(p, d, standalone=False)
    size = (d / "quantized.safetensors").stat().st_size
    # a delta checkpoint holds what the summary says the quantized layers hold (header overhead < 5%)
    assert summary.packed_bytes <= size <= summary.packed_bytes * 1.05 + 16384
    q = diffq.load(d, copy.deepcopy(pipe))
    assert len(quantized_modules(adapter_for(q).denoiser(q))) == len(summary.quantized)
    out2 = generate(q, _prompts(q), [0, 1], num_inference_steps=STEPS)
    assert torch.equal(out, out2)


def test_load_refuses_other_base_and_corruption(tmp_path, calibrated):
    pipe, _stats, _ = calibrated("sd")
    p = copy.deepcopy(pipe)
    diffq.quantize(p, "w8a8", progress=False)
    diffq.save(p, tmp_path / "ck")
    other = tiny_pipeline("sd", seed=1)
    with pytest.raises(CheckpointError, match="different base model"):
        diffq.load(tmp_path / "ck", other)
    f = tmp_path / "ck" / "quantized.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        diffq.load(tmp_path / "ck", copy.deepcopy(pipe))
    with pytest.raises(CheckpointError, match="not a diffq checkpoint"):
        diffq.load(tmp_path / "nothing", copy.deepcopy(pipe))


def test_calibration_stats_round_trip(tmp_path, calibrated):
    _pipe, stats, _ = calibrated("sdxl")
    stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert back.step_buckets == stats.step_buckets and back.splits == stats.splits
    for name, st in stats.layers.items():
        assert torch.equal(back.layers[name].hist, st.hist)
        assert torch.equal(back.layers[name].absmax, st.absmax)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        CalibrationStats.load(tmp_path / "bad.safetensors")


def test_timestep_groups_lower_activation_mse_than_one_static_range(calibrated):
    _pipe, stats, _ = calibrated("sd")
    for bits in (8, 4):
        grouped = sum(grouping_mse(stats, n, bits, groups=None, threshold=0.05) for n in stats.layers)
        static = sum(grouping_mse(stats, n, bits, groups=1) for n in stats.layers)
        assert grouped < static, (bits, grouped, static)


def test_split_shortcut_found_for_unet_up_blocks(calibrated):
    pipe, stats, _ = calibrated("sd")
    assert stats.splits, "UNet up blocks concatenate skip inputs"
    p = copy.deepcopy(pipe)
    diffq.quantize(p, "w8a8", calibration=stats, progress=False)
    mods = quantized_modules(p.unet)
    for name, (main, skip) in stats.splits.items():
        if name in mods:
            assert mods[name].act.splits == (main, skip)


def test_errors_name_the_fix(calibrated):
    pipe, _stats, _ = calibrated("sd")
    with pytest.raises(CalibrationError, match="at least one prompt"):
        calibrate(pipe, [], num_inference_steps=2)
    with pytest.raises(RecipeError, match="unknown preset"):
        diffq.quantize(copy.deepcopy(pipe), "w3a3")
    with pytest.raises(CalibrationError, match="needs calibration"):
        diffq.quantize(copy.deepcopy(pipe), "w4a4-svd")
    other_stats = calibrated("pixart")[1]
    with pytest.raises(CalibrationError, match="different model"):
        diffq.quantize(copy.deepcopy(pipe), "w8a8-static", calibration=other_stats)
    p = copy.deepcopy(pipe)
    diffq.quantize(p, "w8a8")
    with pytest.raises(RecipeError, match="already quantized"):
        diffq.quantize(p, "w8a8")

    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedModelError, match="supported pipeline families"):
        diffq.quantize(NotAPipeline(), "w8a8")


def test_nan_in_calibration_names_layer_and_step(calibrated):
    pipe = copy.deepcopy(calibrated("sd")[0])
    name, mod = next((n, m) for n, m in quantizable_layers(pipe.unet).items() if "down_blocks.0" in n)
    calls = {"n": 0}

    def poison(module, args):  # runs before calibration's own hook, which then sees the NaN
        calls["n"] += 1
        if calls["n"] == 2:  # second denoiser call = step 1
            return (args[0] * float("nan"),)

    h = mod.register_forward_pre_hook(poison)
    try:
        with pytest.raises(CalibrationError, match=rf"NaN/Inf in the input of layer '{name}' at step 1"):
            calibrate(pipe, ["a cat"], num_inference_steps=3, progress=False)
    finally:
        h.remove()


def test_text_encoders_go_through_the_recipe_formats(tmp_path, calibrated):
    """recipe.text_encoder quantizes every Linear of every text encoder with the recipe's weight and
    activation formats (static activations become dynamic per token), and save/load keeps them."""
    pipe, stats, _ = calibrated("sdxl")
    p = copy.deepcopy(pipe)
    recipe = diffq.get_preset("w4a8").with_overrides(["text_encoder=true"])
    diffq.quantize(p, recipe, calibration=stats, progress=False)
    for enc in (p.text_encoder, p.text_encoder_2):
        mods = quantized_modules(enc)
        linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
        assert mods and not linears, "every text-encoder Linear is quantized"
        assert {m.wspec.dtype for m in mods.values()} == {"int4"}
        assert {m.act.spec.describe() for m in mods.values()} == {"int8[tok]"}
        assert all(m.rank == 0 and m.smooth is None for m in mods.values())
    out = generate(p, PROMPTS, [0, 1], num_inference_steps=STEPS)
    diffq.save(p, tmp_path / "te")
    q = diffq.load(tmp_path / "te", copy.deepcopy(pipe))
    assert len(quantized_modules(q.text_encoder_2)) == len(quantized_modules(p.text_encoder_2))
    assert torch.equal(generate(q, PROMPTS, [0, 1], num_inference_steps=STEPS), out)
    static = diffq.get_preset("w8a8-static").with_overrides(["text_encoder=true"])
    p2 = copy.deepcopy(pipe)
    diffq.quantize(p2, static, calibration=stats, progress=False)
    assert {m.act.spec.describe() for m in quantized_modules(p2.text_encoder).values()} == {"int8[tok]"}
    assert not any(m.act.static for m in quantized_modules(p2.text_encoder).values())
