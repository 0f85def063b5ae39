"""Large skipped roles (FLUX/SD3 adaLN) are quantized weight-only by default; sizes from shapes and
formats (benchmarks.family_sizes) are the bytes diffq really builds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import diffq
from diffq.errors import RecipeError
from diffq.formats import QuantSpec
from diffq.modules import quantized_modules
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import tiny_pipeline
from diffq.quantization.build import build_layer
from diffq.quantization.presets import get_preset
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import choose_layers
from diffq.sizes import module_bytes


def _adanorm(pipe) -> dict:
    a = adapter_for(pipe)
    return {n: m for n, m in quantized_modules(a.denoiser(pipe)).items() if a.role_of(n) == "adanorm"}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_adaln_is_quantized_weight_only_by_default(family):
    pipe = tiny_pipeline(family)
    kept = tiny_pipeline(family)
    on = diffq.quantize(pipe, {"preset": "w4a8", "rounding": "rtn", "smooth_alpha": None, "smooth_search": False}, progress=False)  # RTN: no calibration
    off = diffq.quantize(kept, get_preset("w4a8").with_overrides({"weight_only_roles": [], "rounding": "rtn", "smooth_alpha": None, "smooth_search": False}),
                         progress=False)
    layers = _adanorm(pipe)
    assert layers and not _adanorm(kept)
    # weight-only: no activation quantizer, no smoothing; int8 per channel without a branch where that is
    # no larger than the recipe's int4 format with its branch (the tiny fixtures' narrow adaLN), else int4
    assert all(m.act is None and m.smooth is None and m.wspec.bits in (4, 8) for m in layers.values())
    assert all(m.rank == 0 for m in layers.values() if m.wspec.bits == 8)  # w4a8 has no branch: int4 is smaller
    assert on.size_ratio > off.size_ratio * 1.1
    # weight-only int4 of a modulation layer: close to the dense layer on its own input
    dense = adapter_for(kept).denoiser(kept)
    name, m = next(iter(layers.items()))
    x = torch.randn(8, m.in_features, generator=torch.Generator().manual_seed(0))
    ref = dense.get_submodule(name)(x)
    assert (m(x) - ref).norm() / ref.norm() < 0.1


def test_small_share_follows_the_skip_rules():
    pipe = tiny_pipeline("flux")
    a = adapter_for(pipe)
    recipe = get_preset("w4a4-svd").with_overrides({"weight_only_share": 0.9})
    choices = choose_layers(a.denoiser(pipe), recipe, role_of=a.role_of)
    assert all(c.skip for c in choices if c.role == "adanorm")
    default = choose_layers(a.denoiser(pipe), get_preset("w4a4-svd"), role_of=a.role_of)
    wo = [c for c in default if c.role == "adanorm"]
    assert wo and all(c.skip is None and c.act is None and c.smooth_alpha is None for c in wo)
    assert all(c.rank == (0 if c.weight.bits >= 8 else 32) for c in wo)


@pytest.mark.parametrize("shape,bits,rank", [((768, 128), 8, 0), ((18432, 3072), 4, 32), ((3072, 3072), 4, 32), ((128, 2048), 8, 0)])
def test_weight_only_takes_int8_only_where_it_is_no_larger(shape, bits, rank):
    """digits-dit's adaLN (768 x 128): int8 per channel is smaller than int4 g64 + a rank-32 branch, so it
    is taken (and has no branch); FLUX's (18432 x 3072) keep int4 + branch. An
    explicit ``weight_only`` format is used as given."""
    n, k = shape
    layer = nn.Sequential(nn.Linear(k, n, device="meta"))
    recipe = get_preset("w4a4-svd").with_overrides({"weight_only_share": 0.0})
    ch = choose_layers(layer, recipe, role_of=lambda name: "adanorm")[0]
    assert (ch.weight.bits, ch.rank, ch.act) == (bits, rank, None)
    w4 = QuantSpec("int4", "group", 64, "fp16")
    int8_bytes, four_bit = QuantSpec("int8", "channel").stored_bytes(n, k), w4.stored_bytes(n, k) + 2 * 32 * (n + k)
    assert (int8_bytes <= four_bit) == (bits == 8)
    forced = choose_layers(layer, recipe.with_overrides({"weight_only": "int4:g64"}), role_of=lambda name: "adanorm")[0]
    assert (forced.weight.bits, forced.rank) == (4, 32)


@pytest.mark.parametrize("spec", [QuantSpec("int4", "group", 64, "fp16"), QuantSpec("int8", "channel"),
                                  QuantSpec("uint4", "group", 64, "fp16"), QuantSpec("int3", "group", 64, "fp16")])
def test_stored_bytes_are_the_bytes_a_layer_holds(spec):
    from diffq.formats import NVFP4, quantize
    from diffq.modules import QuantLinear

    for s in (spec, NVFP4):
        m = QuantLinear(quantize(torch.randn(96, 256), s), bias=None, act=None, lr_down=None, lr_up=None,
                        smooth=None, dtype=torch.bfloat16)
        assert s.stored_bytes(96, 256) == module_bytes(m, float_bits=16)


def test_unets_are_unchanged_by_the_adaln_rule():
    pipe = tiny_pipeline("sd")
    a = adapter_for(pipe)
    on = choose_layers(a.denoiser(pipe), get_preset("w4a4-svd"), role_of=a.role_of)
    off = choose_layers(a.denoiser(pipe), get_preset("w4a4-svd").with_overrides({"weight_only_roles": ["resample"]}),
                        role_of=a.role_of)
    assert [(c.name, c.skip, c.weight, c.act) for c in on] == [(c.name, c.skip, c.weight, c.act) for c in off]


def test_weight_only_format_and_validation():
    r = Recipe(weight_only=QuantSpec("int8", "channel"))
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.with_overrides(["weight_only=int4:g32"]).weight_only == QuantSpec("int4", "group", 32)
    with pytest.raises(RecipeError, match="weight_only_roles"):
        Recipe(weight_only_roles=("adaln",))
    with pytest.raises(RecipeError, match="weight_only_share"):
        Recipe(weight_only_share=1.5)


def test_family_size_bytes_are_the_bytes_diffq_builds():
    """The proxy-layer extrapolation of benchmarks.family_sizes equals building the full-width layer."""
    from benchmarks.family_sizes import LayerBytes

    recipe = get_preset("w4a4-svd").with_overrides({"weight_clip": "minmax", "rounding": "rtn", "smooth_search": False})
    sizer = LayerBytes()
    for mod in (nn.Linear(192, 1000), nn.Linear(192, 1000, bias=False), nn.Conv2d(64, 640, 3, padding=1)):
        ch = choose_layers(nn.Sequential(mod), recipe)[0]
        ch = replace(ch, smooth_alpha=None)  # the real build here has no calibration statistics
        assert sizer(ch) == module_bytes(build_layer(ch, None), float_bits=16)


@pytest.mark.parametrize("mod,role,bits,rank", [
    (nn.Conv2d(320, 320, 3, padding=1, device="meta"), "resample", 4, 32),  # SD1.5's narrowest resample conv
    (nn.Conv2d(32, 32, 3, padding=1, device="meta"), "resample", 8, 0),  # digits-sd's: int8 is smaller
    (nn.Linear(1280, 320, device="meta"), "embed", 8, 0),  # a UNet time_emb_proj
    (nn.Linear(3072, 3072, device="meta"), "embed", 8, 0),
])
def test_w4a4_svd_resample_weight_only_and_embeddings_int8(mod, role, bits, rank):
    """w4a4-svd: the resample convs follow adaLN's weight-only rule at any share (int8 where it is no
    larger than int4 + branch), the embeddings are int8 weight-only; neither gets activation
    quantization or smoothing; the pre-change recipe kept embeddings in 16 bits and resample at int8."""
    for preset in ("w4a4-svd", "fp4-svd"):
        ch = choose_layers(nn.Sequential(mod), get_preset(preset), role_of=lambda name: role)[0]
        assert ch.skip is None and ch.act is None and ch.smooth_alpha is None
        assert ch.weight.bits == bits and ch.rank == rank
    before = get_preset("w4a4-svd").with_overrides(
        {"int8_weight_roles": ["shortcut", "resample", "proj"], "weight_only_roles": ["adanorm"], "weight_only_share": 0.1})
    ch = choose_layers(nn.Sequential(mod), before, role_of=lambda name: role)[0]
    assert (ch.skip is not None) if role == "embed" else (ch.weight.bits == 8 and ch.rank == 0)


def test_unet_reference_set_stores_int8_weights():
    """The UNets' shortcut/resample/proj layers stay out of 4-bit quantization (16-bit activations, no
    branch, no smoothing) with int8 per-channel weights; ``int8_weight_roles=()`` keeps them in 16 bits."""
    pipe = tiny_pipeline("sd")
    a = adapter_for(pipe)
    den = a.denoiser(pipe)
    on = choose_layers(den, get_preset("w4a4-svd").without_calibration(), role_of=a.role_of)
    # w4a4-svd's resample convs are weight-only (int8 on these narrow ones); without that and the int8 set: 16 bits
    off = choose_layers(den, get_preset("w4a4-svd").without_calibration().with_overrides(
        {"int8_weight_roles": ["embed"], "weight_only_roles": ["adanorm"]}), role_of=a.role_of)
    ref_set = [c for c in on if c.role in ("shortcut", "resample", "proj")]
    assert {c.role for c in ref_set} == {"shortcut", "resample", "proj"}
    assert all(c.skip is None and c.weight == QuantSpec("int8", "channel") and c.act is None and c.rank == 0
               and c.smooth_alpha is None for c in ref_set)
    assert all(c.skip for c in off if c.role in ("shortcut", "resample", "proj"))
    # the other layers are chosen the same way
    rest = lambda cs: [(c.name, c.skip, c.weight, c.act, c.rank) for c in cs if c.role not in ("shortcut", "resample", "proj")]
    assert rest(on) == rest(off)
    # presets that quantize those roles anyway (w4a8) are unaffected
    w4a8 = choose_layers(den, get_preset("w4a8"), role_of=a.role_of)
    assert all(c.weight.bits == 4 and c.act is not None for c in w4a8 if c.role in ("shortcut", "resample", "proj"))
    # int8 weights of a 1x1 shortcut conv: close to the dense layer
    ch = next(c for c in ref_set if c.role == "shortcut")
    q = build_layer(ch, None)
    x = torch.randn(2, ch.module.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ch.module(x)
        assert (q(x) - ref).norm() / ref.norm() < 0.01
