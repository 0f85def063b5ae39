"""fuse_qkv_projections() on a quantized denoiser fuses the quantized q/k/v into one quantized layer
(rows, scales, biases and low-rank branches concatenated), or refuses and changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffq
from diffq.attention import installed_formats
from diffq.errors import DiffqError
from diffq.formats import QuantSpec, quantize
from diffq.methods.lowrank import lowrank_split
from diffq.modules import ActQuantizer, QuantLinear
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pipeline
from diffq.quantization.fused_qkv import FUSED_NAMES, fuse_quant_linears

CASES = [("sd", "w8a8"), ("sdxl", "w8a8-static"), ("flux", "w4a8"), ("sd3", "fp8"), ("sd3", "w4a4-svd:shared")]


def _images(pipe, family):
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}  # 2 steps: enough to compare, half the time
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize(("family", "preset"), CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_fused_quantized_qkv_equals_unfused(family, preset, tmp_path):
    pipe = tiny_pipeline(family)
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    name, _, shared = preset.partition(":")
    diffq.quantize(pipe, {"preset": name, "shared_smoothing": True} if shared else name, calibration=stats, progress=False)
    den = adapter_for(pipe).denoiser(pipe)
    unfused = _images(pipe, family)
    den.fuse_qkv_projections()
    fused = {n: m for n, m in den.named_modules() if n.rpartition(".")[2] in FUSED_NAMES}
    assert fused and all(isinstance(m, QuantLinear) for m in fused.values()), "QKV stays quantized"
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in fused.values()]
    out = _images(pipe, family)
    for h in handles:
        h.remove()
    assert calls, "the attention processors run the fused layers"
    # same codes and scales, one GEMM instead of three: only float summation order differs
    assert (out - unfused).abs().max() < 1e-4
    diffq.save(pipe, tmp_path / "ck")  # the fused copies are not saved; fuse again after loading
    back = diffq.load(tmp_path / "ck", tiny_pipeline(family))
    assert not any(n.rpartition(".")[2] in FUSED_NAMES for n, _ in adapter_for(back).denoiser(back).named_modules())
    assert (_images(back, family) - unfused).abs().max() == 0


def test_smoothed_projections_share_one_vector():
    """q/k/v (and the added q/k/v) get one smoothing vector (one α); unshared, they differ."""
    stats = None
    for shared in (True, False):
        pipe = tiny_pipeline("sd3")
        stats = stats or diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
        diffq.quantize(pipe, {"preset": "w4a4-svd", "shared_smoothing": shared}, calibration=stats, progress=False)
        attn = pipe.transformer.transformer_blocks[0].attn
        for parts in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            vecs = [getattr(attn, n).smooth for n in parts]
            assert all(v is not None for v in vecs)
            same = all(torch.equal(v, vecs[0]) for v in vecs[1:])
            assert same == shared, (parts, shared)
            assert all(v.data_ptr() != vecs[0].data_ptr() for v in vecs[1:])  # own buffers (safetensors)


def test_smoothed_projections_are_refused_and_nothing_changes():
    pipe = tiny_pipeline("sd3")
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    diffq.quantize(pipe, "w4a4-svd", calibration=stats, progress=False)  # each projection smoothed on its own
    before = set(pipe.transformer.state_dict())
    with pytest.raises(DiffqError, match="smoothed with its own factors.*shared_smoothing=True.*keep the projections unfused"):
        pipe.transformer.fuse_qkv_projections()
    assert set(pipe.transformer.state_dict()) == before
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())


def test_quantized_attention_is_not_silently_replaced_by_fused_processors():
    pipe = tiny_pipeline("flux")
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    diffq.quantize(pipe, "w8a8-attn", calibration=stats, progress=False)
    formats = installed_formats(pipe.transformer)
    assert formats
    with pytest.raises(DiffqError, match="quantized attention.*attn='none'"):
        pipe.transformer.fuse_qkv_projections()
    assert installed_formats(pipe.transformer) == formats
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())


def test_fuse_quant_linears_concatenates_rows_scales_bias_and_branches():
    torch.manual_seed(0)
    act_spec = QuantSpec("int8", "token")
    parts = []
    for n, rank in ((32, 4), (48, 0), (32, 2)):
        w = torch.randn(n, 64)
        l1 = l2 = None
        if rank:
            l1, l2, w = lowrank_split(w, rank)
        parts.append(QuantLinear(quantize(w, QuantSpec("int4", "group", 32, "fp16")), bias=torch.randn(n),
                                 act=ActQuantizer(act_spec), lr_down=l1, lr_up=l2))
    fused = fuse_quant_linears(parts)
    x = torch.randn(5, 64)
    want = torch.cat([p(x) for p in parts], dim=-1)
    assert fused.out_features == 112 and fused.rank == 6
    assert torch.allclose(fused(x), want, rtol=1e-5, atol=1e-5)
    other = QuantLinear(quantize(torch.randn(16, 64), QuantSpec("int8", "channel")))
    with pytest.raises(DiffqError, match="weight formats"):
        fuse_quant_linears([parts[0], other])


def test_mixed_dense_and_quantized_projections_are_refused():
    pipe = tiny_pipeline("flux")
    recipe = diffq.get_preset("w8a8").with_overrides({"skip_patterns": [r"attn\.to_k$"]})
    diffq.quantize(pipe, recipe, progress=False)
    with pytest.raises(DiffqError, match="some of .* are quantized and some are dense"):
        pipe.transformer.fuse_qkv_projections()
    assert not any(isinstance(getattr(m, "to_qkv", None), nn.Module) for m in pipe.transformer.modules())
