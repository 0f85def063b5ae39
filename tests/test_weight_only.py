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
    on = diffq.quantize(pipe, {"preset": "w4a8", "rounding": "rtn"}, progress=False)  # RTN: no calibration
    off = diffq.quantize(kept, get_preset("w4a8").with_overrides({"weight_only_roles": [], "rounding": "rtn"}),
                         progress=False)
    layers = _adanorm(pipe)
    assert layers and not _adanorm(kept)
    # weight-only: no activation quantizer, no smoothing; the recipe's weight format and 16-bit low-rank branch
    assert all(m.act is None and m.smooth is None and m.wspec.bits == 4 for m in layers.values())
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
    assert wo and all(c.skip is None and c.act is None and c.rank == 32 and c.smooth_alpha is None for c in wo)


def test_unets_are_unchanged():
    pipe = tiny_pipeline("sd")
    a = adapter_for(pipe)
    on = choose_layers(a.denoiser(pipe), get_preset("w4a4-svd"), role_of=a.role_of)
    off = choose_layers(a.denoiser(pipe), get_preset("w4a4-svd").with_overrides({"weight_only_roles": []}),
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
