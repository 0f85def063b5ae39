"""LoRA on quantized layers rides on the 16-bit branch: no re-quantization, exact removal."""

import copy

import pytest
import torch
from torch import nn

import diffq
from diffq.calibration import calibrate
from diffq.generation import generate
from diffq.lora import load_lora, unload_lora
from diffq.pipelines.testing import tiny_pipeline
from diffq.quantization.build import build_layer
from diffq.quantization.presets import get_preset
from diffq.quantization.selection import LayerChoice
from diffq.quantization.state import QuantState, attach_state


class _Holder(nn.Module):
    """A stand-in denoiser so load_lora can address the layer by name."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer


class PixArtAlphaPipeline:
    """Named like the real class so the pixart adapter picks it up."""

    def __init__(self, layer):
        self.transformer = _Holder(layer)


def test_lora_delta_on_svd_layer_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    r = get_preset("w4a4-svd").without_calibration()  # RTN, no smoothing: no calibration rows needed
    q = build_layer(LayerChoice("layer", "attn_qkv", lin, r.weight, r.act, 16, None, r), None)
    q.smooth = torch.rand(64) + 0.5  # the LoRA must see x, not the smoothed x / s
    pipe = PixArtAlphaPipeline(q)
    attach_state(pipe.transformer, QuantState(r, "pixart", "-"), lambda args, kwargs: None)
    x = torch.randn(5, 64)
    before = q(x)
    rank_before = q.rank
    codes = q.qweight.clone()
    a, b = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1
    load_lora(pipe, {"transformer.layer.lora_A.weight": a, "transformer.layer.lora_B.weight": b}, scale=0.7)
    after = q(x)
    expected = 0.7 * x @ a.t() @ b.t()
    assert torch.allclose(after - before, expected, atol=1e-5)
    assert torch.equal(q.qweight, codes), "codes are never re-quantized"
    assert q.rank == rank_before + 4
    unload_lora(pipe)
    assert torch.equal(q(x), before)


def test_lora_changes_quantized_pipeline_like_full_precision():
    pipe = tiny_pipeline("sd")
    torch.manual_seed(3)
    lora = {}
    for n, m in pipe.unet.named_modules():
        if n.endswith(("attn1.to_q", "attn2.to_v")) and isinstance(m, nn.Linear):
            lora[f"unet.{n}.lora_A.weight"] = torch.randn(4, m.in_features) * 0.6
            lora[f"unet.{n}.lora_B.weight"] = torch.randn(m.out_features, 4) * 0.6
    assert lora
    prompts, seeds, kw = ["a cat", "a dog"], [0, 1], {"num_inference_steps": 4}
    fp0 = generate(pipe, prompts, seeds, **kw)
    fp = copy.deepcopy(pipe)
    with torch.no_grad():  # the full-precision reference: W += B A merged by hand
        for key, a in lora.items():
            if key.endswith("lora_A.weight"):
                fp.unet.get_submodule(key[len("unet."):-len(".lora_A.weight")]).weight += (
                    lora[key.replace("lora_A", "lora_B")] @ a)
    fp1 = generate(fp, prompts, seeds, **kw)
    q = copy.deepcopy(pipe)
    stats = calibrate(pipe, prompts, num_inference_steps=4, progress=False, reservoir=16)
    diffq.quantize(q, "w8a8", calibration=stats, progress=False)
    q0 = generate(q, prompts, seeds, **kw)
    load_lora(q, lora)
    q1 = generate(q, prompts, seeds, **kw)
    d_fp, d_q = fp1 - fp0, q1 - q0
    assert d_fp.norm() > 0.1, "the LoRA must visibly change the images"
    # the quantized pipeline moves the same way, up to its own quantization error
    assert (d_q - d_fp).norm() / d_fp.norm() < 0.5
    cos = torch.nn.functional.cosine_similarity(d_q.flatten(), d_fp.flatten(), dim=0)
    assert cos > 0.85


def _sd_quantized():
    pipe = tiny_pipeline("sd")
    q = copy.deepcopy(pipe)
    diffq.quantize(q, "w8a8", progress=False)
    return pipe, q


NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _delta(q, x):
    layer = q.unet.get_submodule(NAME)
    with torch.no_grad():
        return layer(x)


def test_alpha_of_prefixed_keys_is_honoured():
    """``unet.<module>.alpha`` scales the update by alpha / r (it used to be ignored: off by alpha/r)."""
    _, q = _sd_quantized()
    m = q.unet.get_submodule(NAME)
    a, b = torch.randn(4, m.in_features), torch.randn(m.out_features, 4)
    x = torch.randn(3, m.in_features)
    base = _delta(q, x)
    load_lora(q, {f"unet.{NAME}.lora_A.weight": a, f"unet.{NAME}.lora_B.weight": b, f"unet.{NAME}.alpha": torch.tensor(2.0)})
    got = _delta(q, x) - base
    assert torch.allclose(got, (2.0 / 4) * x @ (b @ a).t(), rtol=1e-4, atol=1e-5)


def test_kohya_keys_and_text_encoder_keys_load_and_unload_exactly():
    fp, q = _sd_quantized()
    m = q.unet.get_submodule(NAME)
    te_name = next(n for n, _ in fp.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    te = fp.text_encoder.get_submodule(te_name)
    k_unet, k_te = "lora_unet_" + NAME.replace(".", "_"), "lora_te_" + te_name.replace(".", "_")
    lora = {
        f"{k_unet}.lora_down.weight": torch.randn(4, m.in_features), f"{k_unet}.lora_up.weight": torch.randn(m.out_features, 4),
        f"{k_unet}.alpha": torch.tensor(4.0),
        f"{k_te}.lora_down.weight": torch.randn(4, te.in_features), f"{k_te}.lora_up.weight": torch.randn(te.out_features, 4),
    }
    x = torch.randn(3, m.in_features)
    w_te = q.text_encoder.get_submodule(te_name).weight.clone()
    base = _delta(q, x)
    touched = load_lora(q, lora)
    assert sorted(touched) == sorted([f"denoiser/{NAME}", f"text_encoder/{te_name}"])
    want = x @ (lora[f"{k_unet}.lora_up.weight"] @ lora[f"{k_unet}.lora_down.weight"]).t()
    assert torch.allclose(_delta(q, x) - base, want, rtol=1e-4, atol=1e-4)
    te_delta = lora[f"{k_te}.lora_up.weight"] @ lora[f"{k_te}.lora_down.weight"]
    assert torch.allclose(q.text_encoder.get_submodule(te_name).weight, w_te + te_delta, atol=1e-5)
    unload_lora(q)
    assert torch.equal(_delta(q, x), base) and torch.equal(q.text_encoder.get_submodule(te_name).weight, w_te)


def test_a_refused_lora_changes_nothing():
    from diffq.errors import DiffqError

    _, q = _sd_quantized()
    m = q.unet.get_submodule(NAME)
    good = {f"unet.{NAME}.lora_A.weight": torch.randn(4, m.in_features), f"unet.{NAME}.lora_B.weight": torch.randn(m.out_features, 4)}
    bad = {**good, "unet.no.such.layer.lora_A.weight": torch.randn(4, 8), "unet.no.such.layer.lora_B.weight": torch.randn(8, 4)}
    x = torch.randn(3, m.in_features)
    base = _delta(q, x)
    with pytest.raises(DiffqError, match="does not have"):
        load_lora(q, bad)
    assert torch.equal(_delta(q, x), base)


def test_save_records_a_loaded_lora_and_load_restores_it_exactly(tmp_path):
    fp, q = _sd_quantized()
    kw = {"num_inference_steps": 2}
    plain = generate(q, ["a cat"], [0], **kw)
    lora = {}
    for n, m in fp.unet.named_modules():
        if n.endswith(("attn1.to_q", "attn2.to_v")):
            lora[f"unet.{n}.lora_A.weight"] = torch.randn(4, m.in_features) * 0.5
            lora[f"unet.{n}.lora_B.weight"] = torch.randn(m.out_features, 4) * 0.5
            lora[f"unet.{n}.alpha"] = torch.tensor(2.0)
    load_lora(q, lora, scale=0.8)
    with_lora = generate(q, ["a cat"], [0], **kw)
    assert (with_lora - plain).abs().max() > 1e-3
    diffq.save(q, tmp_path / "ck")
    back = diffq.load(tmp_path / "ck", copy.deepcopy(fp))
    assert torch.equal(generate(back, ["a cat"], [0], **kw), with_lora)  # not silently baked, not lost
    unload_lora(back)
    assert torch.equal(generate(back, ["a cat"], [0], **kw), plain)
