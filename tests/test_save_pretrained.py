"""diffusers' own save_pretrained / from_pretrained round-trip a quantized denoiser (the "diffq"
quantization backend), bit for bit, whatever torch_dtype the loader asks for; what cannot round-trip
is refused at save time with the diffq call that works."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import diffq
from diffq.attention import installed_formats
from diffq.errors import DiffqError
from diffq.modules import QuantConv2d, QuantLinear, quantized_modules
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pipeline
from diffq.quantization.state import quant_state
from diffq.tensor_file import ALIGNMENT

CASES = [("sd", "w4a4-svd"), ("sdxl", "w8a8-static"), ("flux", "fp4"), ("sd3", "w3a8"), ("sd", "w8a8-attn")]


def _quantized(family, preset):
    pipe = tiny_pipeline(family)
    stats = diffq.calibrate(pipe, [0] if family == "dit" else ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    diffq.quantize(pipe, preset, calibration=stats, progress=False)
    return pipe


def _images(pipe, family):
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}  # 2 steps: enough to compare, half the time
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


def _reload(folder, like, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(like, "default_sample_size"):  # the tiny FLUX fixture's instance setting
        pipe.default_sample_size = like.default_sample_size
    return pipe


@pytest.mark.parametrize(("family", "preset"), CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_pipeline_round_trip_is_bit_identical(tmp_path, family, preset):
    pipe = _quantized(family, preset)
    out = _images(pipe, family)
    pipe.save_pretrained(tmp_path)
    den_dir = tmp_path / adapter_for(pipe).denoiser_attr
    cfg = json.loads((den_dir / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "diffq" and cfg["recipe"]["name"] == preset and cfg["family"] == family
    back = _reload(tmp_path, pipe)
    den = adapter_for(back).denoiser(back)
    state = quant_state(den)
    assert state is not None and state.recipe == quant_state(adapter_for(pipe).denoiser(pipe)).recipe
    assert len(quantized_modules(den)) == len(quantized_modules(adapter_for(pipe).denoiser(pipe)))
    # quantized attention holds no tensors: the config's module list rebuilds it (w8a8-attn)
    assert installed_formats(den) == installed_formats(adapter_for(pipe).denoiser(pipe))
    # diffusers hands over views of its memory map; the backend gives them torch's alignment
    assert not [n for n, t in [*den.named_parameters(), *den.named_buffers()] if t.data_ptr() % ALIGNMENT]
    assert torch.equal(_images(back, family), out)


def test_torch_dtype_does_not_touch_the_quantized_buffers(tmp_path):
    """from_pretrained(torch_dtype=bf16) casts the dense layers; scales, ranges, smoothing and the
    16-bit branch of quantized layers are stored as integer bit patterns and come back exactly."""
    pipe = _quantized("sd", "w4a4-svd")
    pipe.unet.save_pretrained(tmp_path)
    from diffusers import UNet2DConditionModel

    back = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    orig = quantized_modules(pipe.unet)
    loaded = quantized_modules(back)
    assert set(orig) == set(loaded)
    for name, m in orig.items():
        for bname, b in m.named_buffers():
            got = dict(loaded[name].named_buffers())[bname]
            assert got.dtype == b.dtype and torch.equal(got, b), f"{name}.{bname}"
    assert next(p for n, p in back.named_parameters() if "norm" in n).dtype == torch.bfloat16


def test_refusals_name_the_call_that_works(tmp_path):
    pipe = _quantized("sd", "w8a8")
    with pytest.raises(DiffqError, match="safetensors only"):
        pipe.unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    lora = copy.deepcopy(pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    m = lora.unet.get_submodule(name)
    diffq.lora.load_lora(lora, {f"unet.{name}.lora_A.weight": torch.randn(2, m.in_features),
                                f"unet.{name}.lora_B.weight": torch.randn(m.out_features, 2)})
    with pytest.raises(DiffqError, match=r"diffq.save\(pipe, dir\)"):
        lora.save_pretrained(tmp_path / "lora")
    te = tiny_pipeline("sd")
    diffq.quantize(te, diffq.get_preset("w8a8").with_overrides(["text_encoder=true"]), progress=False)
    with pytest.raises(DiffqError, match=r"diffq.save\(pipe, dir\)"):
        te.text_encoder.save_pretrained(tmp_path / "te")
    with pytest.raises(DiffqError, match=r"diffq.save\(pipe, dir\)"):
        te.unet.save_pretrained(tmp_path / "te-unet")


def test_a_fresh_process_loads_it_after_import_diffq(tmp_path):
    """``import diffq`` (which does not import diffusers) is enough for from_pretrained to find the backend."""
    pipe = _quantized("dit", "w8a8")
    pipe.save_pretrained(tmp_path)
    code = (
        "import diffq, sys\n"
        "assert 'diffusers' not in sys.modules\n"
        "from diffusers import DiffusionPipeline\n"
        "from diffq.quantization.state import quant_state\n"
        f"p = DiffusionPipeline.from_pretrained({str(tmp_path)!r})\n"
        "print(quant_state(p.transformer).recipe.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "w8a8"


def test_quantized_layers_expose_a_shape_only_weight_in_state_dict():
    """diffusers' LoRA loaders read ``state_dict()[name + ".weight"].shape``; the entry is a meta tensor
    (no data) that diffq never saves and load_state_dict ignores."""
    pipe = _quantized("flux", "w8a8")
    den = pipe.transformer
    sd = den.state_dict()
    for name, m in quantized_modules(pipe.transformer).items():
        w = sd[f"{name}.weight"]
        assert w.is_meta and tuple(w.shape) == tuple(m.weight.shape)
        assert isinstance(m, (QuantLinear, QuantConv2d))
    sample = {"hidden_states": torch.randn(1, 16, 32), "encoder_hidden_states": torch.randn(1, 8, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}
    with torch.no_grad():
        out = den(**sample)[0]
        den.load_state_dict(sd, strict=True)  # the placeholders are dropped, nothing else changes
        assert torch.equal(den(**sample)[0], out)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a real dense weight is refused, not dropped
        name = next(iter(quantized_modules(pipe.transformer)))
        pipe.transformer.load_state_dict({**sd, f"{name}.weight": torch.zeros(sd[f"{name}.weight"].shape)})
