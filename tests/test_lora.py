"""LoRA on quantized layers rides on the 16-bit branch: no re-quantization, exact removal."""

import copy

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
    stats = calibrate(pipe, prompts, num_inference_steps=4, progress=False)
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
