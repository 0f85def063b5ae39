"""LoRA through diffusers' own API on quantized pipelines (PEFT layers for QuantLinear/QuantConv2d):
load_lora_weights, set_adapters, fuse_lora/unfuse_lora, unload_lora_weights, delete_adapters, text-encoder
keys, the order refusal, and what diffq.save does with a loaded LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffq
from diffq.errors import CheckpointError, DiffqError, RecipeError
from diffq.modules import QuantConv2d, QuantLinear
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pipeline

FAMILIES = ["sd", "sdxl", "flux", "sd3"]
#: module-name endings a test LoRA targets (UNet: self/cross attention, FFN, a 3x3 conv; DiT: attention, FFN)
TARGETS = ("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "ff.net.2", "resnets.0.conv1", "attn.to_q", "attn.to_k",
           "attn.add_v_proj")
RANK = 4


def _denoiser(pipe):
    return adapter_for(pipe).denoiser(pipe)


def _prefix(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def make_lora(den: nn.Module, prefix: str, seed: int, rank: int = RANK, amp: float = 0.3) -> dict[str, torch.Tensor]:
    """A random diffusers-format LoRA on the TARGETS layers of ``den`` (conv layers get conv factors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in den.named_modules():
        if not n.endswith(TARGETS) or not isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)):
            continue
        if isinstance(m, (nn.Conv2d, QuantConv2d)):
            kh, kw = m.kernel_size
            a, b = torch.randn(rank, m.in_channels, kh, kw, generator=g), torch.randn(m.out_channels, rank, 1, 1, generator=g)
        else:
            a, b = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        out[f"{prefix}.{n}.lora_A.weight"] = a * amp
        out[f"{prefix}.{n}.lora_B.weight"] = b * amp
    assert out
    return out


def _dense_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() == 4:
        return torch.einsum("nr,rchw->nchw", b.flatten(1), a)
    return b @ a


def _images(pipe, family):
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}  # 2 steps: enough to compare, half the time
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def quantized():
    """family -> (full-precision pipe, quantized pipe), built once; tests deep-copy what they change."""
    cache = {}

    def get(family):
        if family not in cache:
            fp = tiny_pipeline(family)
            q = copy.deepcopy(fp)
            diffq.quantize(q, "w8a8", progress=False)
            cache[family] = (fp, q)
        return cache[family]

    return get


def _layer_input(mod: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(mod, (nn.Conv2d, QuantConv2d)):
        return torch.randn(2, mod.in_channels, 8, 8, generator=g)
    return torch.randn(3, 5, mod.in_features, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_lora_weights_moves_quantized_layers_like_full_precision(family, quantized):
    """Layer level: the LoRA'd quantized layer changes by exactly the LoRA update (unfused and fused),
    and its output moves towards the LoRA'd full-precision layer, to within the quantization error."""
    fp, q0 = quantized(family)
    q = copy.deepcopy(q0)
    lora = make_lora(_denoiser(fp), _prefix(fp), seed=0)
    q.load_lora_weights(dict(lora), adapter_name="a")
    den, fden = _denoiser(q), _denoiser(fp)
    checked = 0
    for key, a in lora.items():
        if not key.endswith("lora_A.weight"):
            continue
        name = key[len(_prefix(fp)) + 1 : -len(".lora_A.weight")]
        wrapped, dense = den.get_submodule(name), fden.get_submodule(name)
        base = wrapped.get_base_layer()
        assert type(wrapped).__name__.startswith("QuantLora") and isinstance(base, (QuantLinear, QuantConv2d))
        b = lora[key.replace("lora_A", "lora_B")]
        x = _layer_input(base)
        with torch.no_grad():
            delta_fp = _conv_or_linear(dense, x, _dense_delta(a, b))
            fp_lora = dense(x) + delta_fp
            q_plain, q_lora = base(x), wrapped(x)
        d = q_lora - q_plain
        assert (d - delta_fp).norm() / delta_fp.norm() < 1e-5, name  # the update itself is exact
        err_lora = (q_lora - fp_lora).norm() / fp_lora.norm()
        err_plain = (q_plain - fp_lora).norm() / fp_lora.norm()
        assert err_lora < 0.02 and err_lora < err_plain, (name, float(err_lora), float(err_plain))
        checked += 1
    assert checked >= 2
    codes = {n: m.qweight.clone() for n, m in den.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    q.fuse_lora()
    for key, a in lora.items():
        if key.endswith("lora_A.weight"):
            name = key[len(_prefix(fp)) + 1 : -len(".lora_A.weight")]
            base = den.get_submodule(name).get_base_layer()
            x = _layer_input(base)
            with torch.no_grad():
                delta_fp = _conv_or_linear(fden.get_submodule(name), x, _dense_delta(a, lora[key.replace("lora_A", "lora_B")]))
                fused = den.get_submodule(name)(x) - _without_branch_delta(base, x, RANK)
            assert (fused - delta_fp).norm() / delta_fp.norm() < 1e-4, name
    for n, m in den.named_modules():  # the 4/8-bit codes are never re-quantized
        if isinstance(m, (QuantLinear, QuantConv2d)):
            assert torch.equal(m.qweight, codes[n])


def _conv_or_linear(dense: nn.Module, x: torch.Tensor, delta_w: torch.Tensor) -> torch.Tensor:
    if isinstance(dense, nn.Conv2d):
        return nn.functional.conv2d(x, delta_w, None, dense.stride, dense.padding, dense.dilation)
    return nn.functional.linear(x, delta_w)


def _without_branch_delta(base, x: torch.Tensor, rank: int) -> torch.Tensor:
    """``base(x)`` with the last ``rank`` columns of its branch (the fused LoRA) removed."""
    saved = (base.lr_down, base.lr_up)
    keep = base.lr_down.shape[1] - rank
    base.lr_down, base.lr_up = (saved[0][:, :keep], saved[1][:keep]) if keep else (None, None)
    try:
        return base(x)
    finally:
        base.lr_down, base.lr_up = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_fuse_unfuse_unload_delete(family, quantized):
    """Several adapters with weights, fuse == unfused within tolerance, unfuse and unload restore the
    outputs bit for bit, delete_adapters leaves exactly the other adapter."""
    fp, q0 = quantized(family)
    q = copy.deepcopy(q0)
    base = _images(q, family)
    la, lb = make_lora(_denoiser(fp), _prefix(fp), 0), make_lora(_denoiser(fp), _prefix(fp), 1)
    q.load_lora_weights(dict(la), adapter_name="first")
    q.load_lora_weights(dict(lb), adapter_name="second")
    q.set_adapters(["first", "second"], adapter_weights=[0.5, 1.5])
    both = _images(q, family)
    assert (both - base).abs().max() > 1e-3, "the LoRAs must change the images"
    # the weights really weight the adapters, layer by layer
    name = next(k for k in la if k.endswith("lora_A.weight"))[len(_prefix(fp)) + 1 : -len(".lora_A.weight")]
    layer = _denoiser(q).get_submodule(name)
    x = _layer_input(layer.get_base_layer())
    with torch.no_grad():
        got = layer(x) - layer.get_base_layer()(x)
    pa, pb = (f"{_prefix(fp)}.{name}.lora_{s}.weight" for s in "AB")
    dense = _denoiser(fp).get_submodule(name)
    want = _conv_or_linear(dense, x, 0.5 * _dense_delta(la[pa], la[pb]) + 1.5 * _dense_delta(lb[pa], lb[pb]))
    assert (got - want).norm() / want.norm() < 1e-5
    wrapped = {n: m for n, m in _denoiser(q).named_modules() if hasattr(m, "lora_A")}
    xs = {n: _layer_input(m.get_base_layer()) for n, m in wrapped.items()}
    with torch.no_grad():
        unfused = {n: m(xs[n]) for n, m in wrapped.items()}
    q.fuse_lora()
    with torch.no_grad():  # fused into the 16-bit branch == the adapters beside the layer, layer by layer
        for n, m in wrapped.items():
            assert m.merged and (m(xs[n]) - unfused[n]).norm() / unfused[n].norm() < 1e-5, n
    # whole images: 1e-7 differences can flip a downstream int8 activation rounding, so compare the mean
    assert (_images(q, family) - both).abs().mean() < 5e-3
    q.unfuse_lora()
    assert torch.equal(_images(q, family), both)
    q.delete_adapters("first")
    only_b = copy.deepcopy(q0)
    only_b.load_lora_weights(dict(lb), adapter_name="second")
    only_b.set_adapters(["second"], adapter_weights=[1.5])
    assert torch.allclose(_images(q, family), _images(only_b, family), atol=1e-6)
    q.unload_lora_weights()
    assert torch.equal(_images(q, family), base)
    assert not any(hasattr(m, "lora_A") for m in _denoiser(q).modules())


def test_lora_alpha_is_honoured_through_diffusers(quantized):
    """FLUX-style alpha keys (diffusers converts them to network alphas): alpha = r/2 halves the update."""
    fp, q0 = quantized("flux")
    lora = make_lora(_denoiser(fp), "transformer", 0)
    halved = dict(lora)
    for key in lora:
        if key.endswith("lora_A.weight"):
            halved[key.replace("lora_A.weight", "alpha")] = torch.tensor(RANK / 2)
    deltas = []
    for sd in (lora, halved):
        q = copy.deepcopy(q0)
        q.load_lora_weights(dict(sd), adapter_name="a")
        name = next(k for k in lora if k.endswith("lora_A.weight"))[len("transformer.") : -len(".lora_A.weight")]
        layer = q.transformer.get_submodule(name)
        x = _layer_input(layer.get_base_layer())
        with torch.no_grad():
            deltas.append(layer(x) - layer.get_base_layer()(x))
    assert torch.allclose(deltas[1], 0.5 * deltas[0], rtol=1e-5, atol=1e-6)


def test_kohya_lora_through_diffusers_on_sd(quantized):
    """A kohya-style SD LoRA (lora_unet_..._lora_down.weight with alphas) loads on a quantized UNet."""
    fp, q0 = quantized("sd")
    q = copy.deepcopy(q0)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    m = fp.unet.get_submodule(name)
    a, b = torch.randn(RANK, m.in_features) * 0.3, torch.randn(m.out_features, RANK) * 0.3
    key = "lora_unet_" + name.replace(".", "_")
    q.load_lora_weights({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(2.0)})
    layer = q.unet.get_submodule(name)
    x = _layer_input(m)
    with torch.no_grad():
        got = layer(x) - layer.get_base_layer()(x)
    want = x @ (b @ a).t() * (2.0 / RANK)
    assert (got - want).norm() / want.norm() < 1e-5


def test_text_encoder_keys_go_to_the_dense_text_encoder(quantized):
    fp, q0 = quantized("sd")
    q = copy.deepcopy(q0)
    lora = make_lora(fp.unet, "unet", 0)
    te = next(n for n, _ in fp.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    lin = fp.text_encoder.get_submodule(te)
    lora[f"text_encoder.{te}.lora_A.weight"] = torch.randn(RANK, lin.in_features)
    lora[f"text_encoder.{te}.lora_B.weight"] = torch.randn(lin.out_features, RANK)
    ids = q.tokenizer(["a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = q.text_encoder(ids)[0]
    q.load_lora_weights(lora, adapter_name="a")
    wrapped = q.text_encoder.get_submodule(te)
    assert hasattr(wrapped, "lora_A") and type(wrapped.get_base_layer()) is nn.Linear
    with torch.no_grad():
        assert (q.text_encoder(ids)[0] - before).abs().max() > 1e-4
    q.unload_lora_weights()
    with torch.no_grad():
        assert torch.equal(q.text_encoder(ids)[0], before)


def test_lora_loaded_before_quantizing_is_refused_with_the_order_that_works():
    pipe = tiny_pipeline("sd")
    pipe.load_lora_weights(make_lora(pipe.unet, "unet", 0), adapter_name="a")
    with pytest.raises(RecipeError, match=r"quantize first.*load_lora_weights.*fuse_lora\(\); pipe.unload_lora_weights"):
        diffq.quantize(pipe, "w8a8", progress=False)
    pipe.fuse_lora()  # the other order that works: bake it in, then quantize
    pipe.unload_lora_weights()
    diffq.quantize(pipe, "w8a8", progress=False)


def test_save_with_diffusers_lora_refuses_unless_baked_in(tmp_path, quantized):
    fp, q0 = quantized("sd")
    q = copy.deepcopy(q0)
    q.load_lora_weights(make_lora(fp.unet, "unet", 0), adapter_name="a")
    with pytest.raises(CheckpointError, match="unload_lora_weights"):
        diffq.save(q, tmp_path / "ck")
    with pytest.raises(DiffqError, match="unload_lora_weights"):
        q.save_pretrained(tmp_path / "sp")
    q.fuse_lora()
    q.unload_lora_weights()  # baked into the 16-bit branch, as diffusers' fuse-then-unload does
    out = _images(q, "sd")
    diffq.save(q, tmp_path / "ck")
    back = diffq.load(tmp_path / "ck", copy.deepcopy(fp))
    assert torch.equal(_images(back, "sd"), out)
