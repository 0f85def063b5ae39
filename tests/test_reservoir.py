"""The optional capped reservoir of real layer inputs kept by calibration."""

from __future__ import annotations

import torch

from diffq.calibration import CalibrationStats, calibrate
from diffq.calibration.reservoir import InputReservoir
from diffq.modules.layers import quantizable_layers
from diffq.pipelines.testing import tiny_pipeline


def test_reservoir_keeps_everything_until_full_then_caps():
    res = InputReservoir.empty(num_steps=2, capacity=8, channels=3)
    g = torch.Generator().manual_seed(0)
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    res.update(0, x, g)
    kept = res.samples(0).float()
    assert kept.shape == (5, 3)
    assert sorted(kept[:, 0].tolist()) == x[:, 0].tolist()  # all offered rows, unchanged
    for _ in range(10):
        res.update(0, torch.randn(7, 3), g)
    assert res.samples(0).shape == (8, 3) and int(res.count[0]) == 75
    assert res.samples(1).shape == (0, 3)


def test_reservoir_sample_is_roughly_uniform_over_batches():
    # 100 batches of 10 rows, each row tagged with its batch; a uniform sample of 200 rows should
    # draw from early and late batches alike
    res = InputReservoir.empty(num_steps=1, capacity=200, channels=1)
    g = torch.Generator().manual_seed(1)
    for b in range(100):
        res.update(0, torch.full((10, 1), float(b)), g)
    tags = res.samples(0).float().flatten()
    early, late = int((tags < 50).sum()), int((tags >= 50).sum())
    assert abs(early - late) < 50, (early, late)


def test_calibration_reservoir_per_layer_and_step_round_trips(tmp_path):
    pipe = tiny_pipeline("sd")
    stats = calibrate(pipe, ["a cat", "a dog"], num_inference_steps=3, reservoir=16, progress=False)
    layers = quantizable_layers(pipe.unet)
    assert set(stats.reservoirs) == set(stats.layers) and set(stats.layers) <= set(layers)
    for name, res in stats.reservoirs.items():
        st = stats.layers[name]
        assert res.rows.shape[:2] == (3, 16)
        for step in range(3):
            rows = res.samples(step).float()
            assert 0 < len(rows) <= 16
            # real inputs: inside the range the statistics saw at that step (fp16 rounding aside)
            assert float(rows.abs().max()) <= float(st.absmax[step].max()) * 1.001 + 1e-3
    path = stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(path)
    for name, res in stats.reservoirs.items():
        assert torch.equal(back.reservoirs[name].rows, res.rows)
        assert torch.equal(back.reservoirs[name].count, res.count)
    again = calibrate(pipe, ["a cat", "a dog"], num_inference_steps=3, reservoir=16, progress=False)
    name = next(iter(stats.reservoirs))
    assert torch.equal(again.reservoirs[name].rows, stats.reservoirs[name].rows), "seeded, deterministic"
    plain = calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False)
    assert plain.reservoirs == {}


def test_interrupted_calibration_with_reservoir_resumes_bit_identically(tmp_path, monkeypatch):
    import diffq.calibration.run as run_mod

    pipe = tiny_pipeline("sd")
    prompts = ["a cat", "a dog", "a bird"]
    kw = {"num_inference_steps": 2, "batch_size": 1, "reservoir": 8, "progress": False}
    full = calibrate(pipe, prompts, **kw)
    real_generate, calls = run_mod.generate, {"n": 0}

    def dies_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    ck = tmp_path / "ck.safetensors"
    monkeypatch.setattr(run_mod, "generate", dies_on_second_batch)
    try:
        calibrate(pipe, prompts, checkpoint=ck, **kw)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(run_mod, "generate", real_generate)
    assert CalibrationStats.load(ck).meta["done"] == 1
    resumed = calibrate(pipe, prompts, checkpoint=ck, **kw)
    for name, res in full.reservoirs.items():
        assert torch.equal(resumed.reservoirs[name].rows, res.rows), name
        assert torch.equal(resumed.layers[name].absmax, full.layers[name].absmax)


def test_attention_operands_recorded_per_step_and_saved(tmp_path):
    from diffq.calibration.operands import attention_operands

    pipe = tiny_pipeline("sd3")  # joint attention with q/k normalisation
    ops = attention_operands(pipe.transformer)
    assert any(n.endswith(".added_q") for n in ops) and any(n.endswith(".q") for n in ops)

    class QKNormAttention(torch.nn.Module):  # the FLUX / SD3.5 layout: q and k normalised per head
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(4, 4) for _ in range(3))
            self.norm_q, self.norm_k = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)

    block = torch.nn.ModuleDict({"attn": QKNormAttention()})
    found = attention_operands(block)
    assert found["attn.q"] is block["attn"].norm_q and found["attn.k"] is block["attn"].norm_k
    assert found["attn.v"] is block["attn"].to_v and set(found) == {"attn.q", "attn.k", "attn.v"}
    stats = calibrate(pipe, ["a cat"], num_inference_steps=2, attention_operands=True, progress=False)
    assert set(stats.operands) == set(ops)
    for st in stats.operands.values():
        assert bool(st.observed.all()) and float(st.absmax.max()) > 0
    back = CalibrationStats.load(stats.save(tmp_path / "s.safetensors"))
    name = next(iter(stats.operands))
    assert torch.equal(back.operands[name].absmax, stats.operands[name].absmax)
    assert calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False).operands == {}


def test_conv_patches_are_the_im2col_rows_of_the_stored_weight_layout():
    """update_patches keeps real im2col patches (channel-fastest, like the stored conv weight rows), so
    a kept patch times the weight rows is exactly that output pixel of the conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 5, 7, 9)
    res = InputReservoir.empty(num_steps=1, capacity=6, channels=45)
    res.update_patches(0, x, conv, torch.Generator().manual_seed(0))
    kept = res.samples(0).float()
    assert kept.shape == (6, 45) and int(res.count[0]) == 2 * 4 * 5
    y = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)  # every output pixel
    w_rows = conv.weight.detach().permute(0, 2, 3, 1).reshape(3, -1)
    got = kept @ w_rows.t()
    # each kept patch reproduces one output pixel (fp16 storage of the patch aside)
    dist = (got[:, None, :] - y[None, :, :]).abs().amax(-1).amin(1)
    assert float(dist.max()) < 5e-3 * float(y.abs().max())


def test_calibration_keeps_patches_of_kxk_convs_only(tmp_path):
    pipe = tiny_pipeline("sd")
    stats = calibrate(pipe, ["a cat"], num_inference_steps=2, reservoir=8, progress=False)
    layers = quantizable_layers(pipe.unet)
    assert stats.patches and set(stats.patches) <= set(stats.reservoirs)
    for name, res in stats.patches.items():
        m = layers[name]
        assert m.kernel_size != (1, 1) and res.rows.shape[-1] == m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    back = CalibrationStats.load(stats.save(tmp_path / "p.safetensors"))
    name = next(iter(stats.patches))
    assert torch.equal(back.patches[name].rows, stats.patches[name].rows)
