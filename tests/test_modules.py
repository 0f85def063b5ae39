"""QuantLinear / QuantConv2d: agreement with the dense layers, honest byte counts, low-rank branch."""

import pytest
import torch
from torch import nn

from diffq.errors import ShapeError
from diffq.formats import NVFP4, QuantSpec, quantize
from diffq.methods.lowrank import lowrank_split
from diffq.modules import ActQuantizer, QuantConv2d, QuantLinear, conv_weight_rows
from diffq.quantization.build import build_layer
from diffq.quantization.presets import get_preset
from diffq.quantization.selection import LayerChoice


def _choice(mod, recipe, name="layer"):
    # a preset's formats without its calibrated parts (GPTQ, smoothing): these layers have no calibration
    r = get_preset(recipe).without_calibration() if isinstance(recipe, str) else recipe
    return LayerChoice(name, "other", mod, weight=r.weight, act=r.act, rank=r.rank, smooth_alpha=r.smooth_alpha, recipe=r)


def test_w8_linear_matches_dense_within_tolerance():
    lin = nn.Linear(128, 64)
    q = QuantLinear(quantize(lin.weight.detach(), QuantSpec("int8", "channel")), bias=lin.bias)
    x = torch.randn(4, 10, 128)
    ref, out = lin(x), q(x)
    # int8 per-channel weights: relative error of the output well under 1%
    assert (out - ref).norm() / ref.norm() < 5e-3
    assert out.shape == ref.shape and out.dtype == ref.dtype


@torch.no_grad()
def test_w8a8_linear_tolerance_and_int4_worse():
    torch.manual_seed(1)
    lin = nn.Linear(256, 128)
    x = torch.randn(32, 256)
    ref = lin(x)
    errs = {}
    for preset in ("w8a8", "w4a8", "w3a8", "w4a4"):
        q = build_layer(_choice(lin, preset), None)
        errs[preset] = float((q(x) - ref).norm() / ref.norm())
    assert errs["w8a8"] < 0.01
    assert errs["w8a8"] < errs["w4a8"] < errs["w4a4"] < 0.3
    assert errs["w4a8"] < errs["w3a8"] < 0.3  # one weight bit fewer, same activations


@pytest.mark.parametrize("spec", [QuantSpec("int8", "channel"), QuantSpec("int4", "group", 32, "fp16"),
                                  QuantSpec("uint4", "group", 32), QuantSpec("int3", "group", 32, "fp16"),
                                  QuantSpec("int2", "channel"), NVFP4, QuantSpec("fp8_e4m3", "channel")],
                         ids=lambda s: s.describe())
def test_reported_bytes_equal_bytes_held(spec):
    lin = nn.Linear(64, 48)
    act = ActQuantizer(QuantSpec("int8", "tensor"), amax=torch.ones(3, 1), bucket_to_group=None)
    l1, l2, _ = lowrank_split(lin.weight.detach(), 4)
    q = QuantLinear(quantize(lin.weight.detach(), spec), bias=lin.bias, act=act, lr_down=l1, lr_up=l2,
                    smooth=torch.ones(64))
    held = sum(t.untyped_storage().nbytes() for t in q.buffers())
    assert q.storage_bytes() == held
    # sub-byte codes really are bit-packed (4-bit: two per byte, 3-bit: eight per three bytes)
    expected_codes = 48 * 64 * spec.bits // 8
    assert q.qweight.numel() * q.qweight.element_size() == expected_codes


def test_conv_matches_dense_and_layout():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    x = torch.randn(2, 32, 8, 8)
    q = build_layer(_choice(conv, "w8a8"), None)
    assert isinstance(q, QuantConv2d)
    ref = conv(x)
    assert (q(x) - ref).norm() / ref.norm() < 0.01
    # stored rows are channel-fastest: [N, kh, kw, Cin]
    rows = conv_weight_rows(conv.weight)
    assert torch.equal(rows[0, :32], conv.weight[0, :, 0, 0])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lowrank_branch_is_exact_in_full_precision(kind):
    """W = L1ᵀL2-product + R exactly; with R in 8 bits the layer is as good as W8 alone or better."""
    torch.manual_seed(0)
    mod = nn.Linear(64, 64) if kind == "linear" else nn.Conv2d(64, 64, 1)
    w = mod.weight.detach().reshape(64, 64)
    l1, l2, r = lowrank_split(w, 8)
    assert torch.allclose((l1 @ l2).t() + r, w, atol=1e-5)
    recipe = get_preset("w4a16").without_calibration().with_overrides({"rank": 16})
    q_lr = build_layer(_choice(mod, recipe), None)
    q_plain = build_layer(_choice(mod, "w4a16"), None)
    assert q_lr.rank == 16
    x = torch.randn(4, 64) if kind == "linear" else torch.randn(2, 64, 4, 4)
    ref = mod(x)
    e_lr = (q_lr(x) - ref).norm()
    e_plain = (q_plain(x) - ref).norm()
    assert e_lr < e_plain


def test_shape_errors():
    q = QuantLinear(quantize(torch.randn(8, 32), QuantSpec("int8", "channel")))
    with pytest.raises(ShapeError, match=r"\[\.\.\., 32\]"):
        q(torch.randn(2, 16))


def test_act_quantizer_splits():
    spec = QuantSpec("int4", "token")
    x = torch.cat([torch.randn(4, 8) * 100, torch.randn(4, 8) * 0.01], dim=-1)
    joint = ActQuantizer(spec)(x)
    split = ActQuantizer(spec, splits=(8, 8))(x)
    # the small half is destroyed by a shared scale and preserved by its own
    assert (split[:, 8:] - x[:, 8:]).abs().max() < (joint[:, 8:] - x[:, 8:]).abs().max()
