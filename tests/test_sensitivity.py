"""Sensitivity analysis on a tiny random SD pipeline: measurements, resume from cache, plans, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffq.mixed.measure as sens_mod
from diffq import quantize
from diffq.calibration import calibrate
from diffq.errors import CalibrationError, CheckpointError, RecipeError
from diffq.eval import image_distance
from diffq.generation import generate
from diffq.mixed.allocate import allocate, uniform_plan
from diffq.mixed.measure import sensitivity
from diffq.mixed.plan import DENSE
from diffq.mixed.table import CONDITIONING_JUDGES, SensitivityTable
from diffq.mixed.units import group_layers
from diffq.modules import QuantConv2d, QuantLinear
from diffq.pipelines.testing import tiny_pipeline

PROMPTS = ["a photo of a cat", "a red car"]
KW = {"prompts": PROMPTS, "candidates": ("w8a8", "w4a8"), "num_inference_steps": 2, "guidance_scale": 5.0,
      "progress": False, "quality": image_distance("ssim")}
LAYERS = r"^(down_blocks\.0\.attentions|mid_block\.resnets\.0)\."


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """A stand-in alignment scorer: any deterministic image statistic works for plumbing tests."""
    return images.mean(dim=(1, 2, 3)) * 100


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU two threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def calib(pipe):
    """w4a8 rounds with GPTQ, which needs calibration input rows."""
    return calibrate(pipe, PROMPTS, num_inference_steps=2, guidance_scale=5.0, reservoir=16, progress=False)


@pytest.fixture(scope="module")
def cached(pipe, calib, tmp_path_factory):
    cache = tmp_path_factory.mktemp("sens")
    table = sensitivity(pipe, groups="block_role", layers=LAYERS, scorer=brightness, cache_dir=cache,
                        calibration=calib, **KW)
    return table, cache


def test_table_measures_every_unit_and_candidate(cached, pipe):
    table, _ = cached
    assert table.meta["computed"] == table.meta["evaluations"] == 2 * len(table.units)
    assert table.candidates == [DENSE, "w8a8", "w4a8"]
    assert set(table.metrics) == {"quality", "alignment"}
    # default judges: every unit by both metrics; the MixDQ-style map restricts alignment
    assert all(table.judged_by(u) == ("quality", "alignment") for u in table.units)
    xa = [u for u in table.units if u.endswith(":cross_attn")]
    assert xa and all(table.judged_by(u, CONDITIONING_JUDGES) == ("quality", "alignment") for u in xa)
    assert table.judged_by("mid_block.resnets.0:resblock_conv", CONDITIONING_JUDGES) == ("quality",)
    for u in table.units:
        assert table.raw["quality"][u][DENSE] == 0.0
        assert all(v >= 0 for v in table.raw["quality"][u].values())  # 1 - SSIM
    q = table.raw["quality"]
    # 4-bit weights hurt more than 8-bit in total over the units
    assert sum(q[u]["w4a8"] for u in table.units) > sum(q[u]["w8a8"] for u in table.units) > 0
    for n in table.layers:
        b = table.layer_bytes[n]
        assert b["w4a8"] < b["w8a8"] < b[DENSE]
        assert table.macs[n] > 0
    # normalisation: the mean over units of the worst candidate is 1 for each metric
    for m in table.metrics:
        norm = table.normalised(m)
        worst = [max(norm[u].values()) for u in table.units]
        assert sum(worst) / len(worst) == pytest.approx(1.0) or max(worst) == 0
    # the pipeline is left exactly as it was
    den = pipe.unet
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in den.modules())
    assert isinstance(den.get_submodule(table.layers[0]), (nn.Linear, nn.Conv2d))


def test_second_run_resumes_from_cache_and_computes_nothing(cached, pipe, calib, monkeypatch):
    table, cache = cached
    calls = []
    real = sens_mod.generate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sens_mod, "generate", counting)
    again = sensitivity(pipe, groups="block_role", layers=LAYERS, scorer=brightness, cache_dir=cache,
                        calibration=calib, **KW)
    assert calls == [] and again.meta["computed"] == 0
    assert again.raw == table.raw and again.layer_bytes == table.layer_bytes


def test_interrupted_run_resumes(pipe, calib, tmp_path, monkeypatch):
    real = sens_mod.generate
    state = {"n": 0}

    def dies_after_four(*a, **k):
        state["n"] += 1
        if state["n"] > 4:  # the reference and three units
            raise KeyboardInterrupt
        return real(*a, **k)

    kw = dict(KW, layers=r"^down_blocks\.0\.", scorer=brightness, calibration=calib)
    monkeypatch.setattr(sens_mod, "generate", dies_after_four)
    with pytest.raises(KeyboardInterrupt):
        sensitivity(pipe, groups="block", cache_dir=tmp_path, **kw)
    monkeypatch.setattr(sens_mod, "generate", real)
    done = sensitivity(pipe, groups="block", cache_dir=tmp_path, **kw)
    assert done.meta["computed"] == done.meta["evaluations"] - 3
    assert not list(tmp_path.rglob(".*.tmp"))


def test_save_load_and_rejudge(cached, tmp_path):
    table, _ = cached
    back = SensitivityTable.load(table.save(tmp_path / "t.json"))
    assert back.raw == table.raw and back.judges == table.judges and back.members == table.members
    assert back.combined() == table.combined()
    q_only = table.with_judges({"*": ("quality",)})
    assert all(q_only.judged_by(u) == ("quality",) for u in table.units)
    assert q_only.combined()  # no new measurements needed
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CheckpointError):
        SensitivityTable.load(tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="metrics"):
        table.with_judges({"*": ("beauty",)})


def test_plan_quantizes_with_mixed_recipe(cached, calib, tmp_path):
    table, _ = cached
    fresh = tiny_pipeline("sd")
    uni = uniform_plan(table, fresh.unet, "w4a8")
    # without the preset's skip rules every analysed layer that can hold w4a8 gets it: smaller
    every = uniform_plan(table, fresh.unet, "w4a8", skip_rules=False)
    assert set(every.assignments.values()) == {"w4a8"}
    assert every.realised["avg_bits"] <= uni.realised["avg_bits"]
    plan = allocate(table, budget=(uni.realised["avg_bits"] + 8.0) / 2)
    assert plan.realised["avg_bits"] <= plan.budget
    assert {"w8a8", "w4a8"} & set(plan.assignments.values())
    path = plan.save(tmp_path / "plan.json")
    summary = quantize(fresh, {"preset": "mixed", "bit_plan": str(path)}, calibration=calib, progress=False)
    got = {row.name: row for row in summary.layers}
    for name, cand in plan.assignments.items():
        if cand == DENSE:
            assert got[name].skipped is not None
        else:
            assert got[name].skipped is None
            assert got[name].weight.startswith("int8" if cand == "w8a8" else "int4")
    # layers outside the plan stay dense
    outside = [r for r in summary.layers if r.name not in plan.assignments]
    assert outside and all(r.skipped for r in outside)
    img = generate(fresh, PROMPTS[:1], num_inference_steps=2, guidance_scale=5.0)
    assert torch.isfinite(img).all()


def test_plots_write_pngs(cached, tmp_path):
    from diffq.mixed.plots import plot_plan, plot_sensitivity

    table, _ = cached
    plan = allocate(table, budget=8.0)
    for p in (plot_sensitivity(table, tmp_path / "s.png"), plot_plan(plan, table, tmp_path / "p.png")):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_scorer_disables_alignment_with_a_warning(pipe, calib):
    with pytest.warns(UserWarning, match="alignment metric disabled"):
        t = sensitivity(pipe, groups="block", layers=r"^mid_block\.resnets\.0\.", calibration=calib,
                        **dict(KW, candidates=("w4a8",)))
    assert t.metrics == ["quality"] and all(t.judged_by(u) == ("quality",) for u in t.units)


def test_bad_arguments(pipe, calib):
    with pytest.raises(RecipeError, match="not a preset"):
        sensitivity(pipe, **dict(KW, candidates=("w3a3",)))
    with pytest.raises(CalibrationError, match="calibration"):
        sensitivity(pipe, **dict(KW, candidates=("w8a8-static",)))
    bare = calibrate(pipe, PROMPTS[:1], num_inference_steps=2, guidance_scale=5.0, progress=False)
    with pytest.raises(CalibrationError, match="reservoir="):  # GPTQ (w4a8) needs input rows
        sensitivity(pipe, calibration=bare, **KW)
    with pytest.raises(RecipeError, match="seeds"):
        sensitivity(pipe, seeds=[1], **KW)
    with pytest.raises(RecipeError, match="metrics"):
        sensitivity(pipe, metrics=("speed",), **KW)
    with pytest.raises(RecipeError, match="groups"):
        sensitivity(pipe, groups="layerwise", scorer=brightness, calibration=calib, **KW)
    with pytest.raises(RecipeError, match=r"image_distance\('ssim'\)"):
        sensitivity(pipe, **dict(KW, quality=None))


def test_grouping():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
             "down_blocks.0.resnets.0.conv1", "transformer_blocks.3.attn.to_q", "conv_in"]
    assert list(group_layers(names, "block")) == [
        "down_blocks.0.attentions.0", "down_blocks.0.resnets.0", "transformer_blocks.3", "conv_in"]
    br = group_layers(names, "block_role")
    assert br["down_blocks.0.attentions.0:cross_attn"] == names[:2]
    assert len(group_layers(names, None)) == len(names)
