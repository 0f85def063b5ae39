"""Calibration records by timestep value, not by call count: correct for Heun / DPM2 (two denoiser calls
per scheduler step) and FLUX's true CFG (two calls at the same timestep); resume still works."""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler, KDPM2DiscreteScheduler

import diffq
from diffq.calibration import CalibrationStats, calibrate
from diffq.calibration.steps import StepMap, distinct_timesteps
from diffq.errors import CalibrationError
from diffq.generation import generate
from diffq.pipelines.testing import tiny_pipeline

STEPS = 8


def _with(scheduler_cls):
    pipe = tiny_pipeline("sd")
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


def _rows_per_call(stats: CalibrationStats, layer: str) -> int:
    """Rows one denoiser call feeds ``layer`` (the count of a step that had a single call)."""
    return int(stats.layers[layer].count[0])


def test_heun_covers_every_step_exactly_once():
    """Heun at 8 steps calls the UNet 15 times at 8 distinct timesteps ([t0, t1, t1, ..., t7, t7]).
    Counting calls recorded only t0..t4 (the first 8 calls) and put t1's second call into step 2; by
    timestep every one of the 8 steps is recorded, with both of its calls."""
    pipe = _with(HeunDiscreteScheduler)
    stats = calibrate(pipe, ["a cat"], num_inference_steps=STEPS, progress=False)
    pipe.scheduler.set_timesteps(STEPS)
    schedule = distinct_timesteps(pipe.scheduler.timesteps)
    assert len(pipe.scheduler.timesteps) == 2 * STEPS - 1 and len(schedule) == STEPS
    assert stats.num_steps == STEPS
    assert stats.step_buckets == [round(t) for t in schedule]  # each step once, in denoising order
    assert len(set(stats.step_buckets)) == STEPS and stats.step_buckets[-1] == 0
    layer = next(iter(stats.layers))
    per_call = _rows_per_call(stats, layer)
    counts = stats.layers[layer].count.tolist()
    assert counts == [per_call] + [2 * per_call] * (STEPS - 1)  # t0 once, every later timestep twice
    assert stats.meta["num_inference_steps"] == STEPS


def test_dpm2_interpolated_timesteps_are_steps_of_their_own():
    pipe = _with(KDPM2DiscreteScheduler)
    stats = calibrate(pipe, ["a cat"], num_inference_steps=STEPS, progress=False)
    assert stats.num_steps == 2 * STEPS - 1  # KDPM2 calls the UNet at 2N-1 distinct timesteps
    assert stats.step_buckets == sorted(stats.step_buckets, reverse=True) and len(set(stats.step_buckets)) == 2 * STEPS - 1
    layer = next(iter(stats.layers))
    assert len(set(stats.layers[layer].count.tolist())) == 1, "one call per distinct timestep"


def test_flux_true_cfg_folds_both_calls_into_their_step():
    pipe = tiny_pipeline("flux")
    plain = calibrate(pipe, ["a cat"], num_inference_steps=4, progress=False)
    cfg = calibrate(pipe, ["a cat"], num_inference_steps=4, progress=False,
                    pipeline_kwargs={"true_cfg_scale": 4.0, "negative_prompt": "blurry"})
    assert cfg.step_buckets == plain.step_buckets and cfg.num_steps == 4
    layer = next(iter(plain.layers))
    assert torch.equal(cfg.layers[layer].count, 2 * plain.layers[layer].count)


def test_heun_calibration_resumes_bit_identically(tmp_path, monkeypatch):
    import diffq.calibration.run as run_mod

    pipe = _with(HeunDiscreteScheduler)
    prompts = ["a cat", "a dog", "a bird"]
    kw = {"num_inference_steps": 4, "batch_size": 1, "progress": False}
    full = calibrate(pipe, prompts, **kw)
    real, calls = run_mod.generate, {"n": 0}

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    ck = tmp_path / "ck.safetensors"
    monkeypatch.setattr(run_mod, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        calibrate(pipe, prompts, checkpoint=ck, **kw)
    monkeypatch.setattr(run_mod, "generate", real)
    assert CalibrationStats.load(ck).meta["done"] == 2
    resumed = calibrate(pipe, prompts, checkpoint=ck, **kw)
    assert resumed.step_buckets == full.step_buckets
    for name, st in full.layers.items():
        assert torch.equal(resumed.layers[name].absmax, st.absmax) and torch.equal(resumed.layers[name].count, st.count)


def test_static_ranges_from_heun_calibration_quantize_and_generate():
    pipe = _with(HeunDiscreteScheduler)
    stats = calibrate(pipe, ["a cat"], num_inference_steps=4, progress=False)
    ref = generate(pipe, ["a cat"], [0], num_inference_steps=4)
    diffq.quantize(pipe, "w8a8-static", calibration=stats, progress=False)
    out = generate(pipe, ["a cat"], [0], num_inference_steps=4)
    assert torch.isfinite(out).all() and (out - ref).abs().mean() < 0.1


def test_a_call_outside_the_schedule_is_refused():
    steps = StepMap((999.0, 500.0, 0.0))
    assert steps.step_of(500.4) == 1 and steps.step_of(999.0) == 0
    with pytest.raises(CalibrationError, match="not in the scheduler's schedule"):
        steps.step_of(250.0)
