"""Denoiser size per family at full real size: FLUX.1, SD3 medium, PixArt-alpha, SD1.5 and SDXL
built on ``meta`` from their configs (:mod:`benchmarks.model_configs`), sizes from shapes and formats.

Nothing of the real models is loaded or allocated. The layer choice is diffq's own
(:func:`~diffq.quantization.selection.choose_layers` with the family adapter's roles), and each
quantized layer's bytes are those of a layer diffq really builds (:func:`~diffq.quantization.build.build_layer`)
with the same input width, formats, rank, smoothing and bias: bytes are linear in the output width,
so two random proxy layers of 128 and 256 rows give the exact bytes of any width with the same
effective rank (narrower layers are built at their own width). Counting follows the quantize
summary: ``module_bytes(..., float_bits=16)``; bf16 = every parameter at 2 bytes.

    python -m benchmarks.family_sizes [--presets w4a4-svd,w4a16,w8a8] [--json benchmarks/results/family_sizes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.model_configs import FLUX_DIT, PIXART_ALPHA_DIT, SD3_MEDIUM_DIT, SD15_UNET, SDXL_UNET
from diffq.methods.lowrank import effective_rank
from diffq.modules.layers import in_out, quantizable_layers
from diffq.pipelines.adapters import FluxAdapter, PixArtAdapter, SD3Adapter, SDAdapter, SDXLAdapter
from diffq.quantization.build import build_layer
from diffq.quantization.presets import get_preset
from diffq.quantization.selection import choose_layers, role_shares
from diffq.sizes import module_bytes

PROXY_ROWS = (128, 256)
#: (label, recipe overrides)
_BEFORE = {"int8_weight_roles": ["shortcut", "resample", "proj"], "weight_only_roles": ["adanorm"],
           "weight_only_share": 0.1}
VARIANTS = (("default", {}), ("weight-only int8", {"weight_only": "int8"}),
            ("adaLN 16-bit", {"weight_only_roles": ["resample"]}),
            # the default before the embeddings went int8 and the resample convs weight-only
            ("embed 16-bit, resample int8 (before)", _BEFORE),
            # the UNets' reference set (shortcut, resample, proj) in 16 bits as the reference keeps it, or
            # int4 weight-only; embeddings in 16 bits
            ("UNet set 16-bit (reference)", {**_BEFORE, "int8_weight_roles": []}),
            ("UNet set int4 weight-only", {"int8_weight_roles": [],
                                           "weight_only_roles": ["adanorm", "shortcut", "resample", "proj"],
                                           "weight_only_share": 0.0}))


def families() -> dict[str, tuple]:
    from diffusers import (
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    return {
        "FLUX.1": (FluxTransformer2DModel, FLUX_DIT, FluxAdapter()),
        "SD3 medium": (SD3Transformer2DModel, SD3_MEDIUM_DIT, SD3Adapter()),
        "PixArt-alpha": (PixArtTransformer2DModel, PIXART_ALPHA_DIT, PixArtAdapter()),
        "SD1.5": (UNet2DConditionModel, SD15_UNET, SDAdapter()),
        "SDXL": (UNet2DConditionModel, SDXL_UNET, SDXLAdapter()),
    }


def meta_model(cls, config: dict) -> nn.Module:
    with torch.device("meta"):
        return cls(**config)


def _proxy(mod: nn.Module, rows: int) -> nn.Module:
    g = torch.Generator().manual_seed(rows)
    if isinstance(mod, nn.Conv2d):
        p = nn.Conv2d(mod.in_channels, rows, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                      dilation=mod.dilation, bias=mod.bias is not None)
    else:
        p = nn.Linear(mod.in_features, rows, bias=mod.bias is not None)
    with torch.no_grad():
        p.weight.copy_(torch.randn(p.weight.shape, generator=g) * 0.02)
        if p.bias is not None:
            p.bias.zero_()
    return p


class LayerBytes:
    """Bytes of the quantized layer of a choice, from layers diffq builds (cached per geometry/format)."""

    def __init__(self) -> None:
        self.cache: dict[tuple, tuple[int, int]] = {}

    def _built(self, choice, rows: int) -> int:
        new = build_layer(replace(choice, module=_proxy(choice.module, rows)), None)
        smooth = 2 * new.in_features if choice.smooth_alpha is not None else 0  # built without stats
        return module_bytes(new, float_bits=16) + smooth

    def __call__(self, choice) -> int:
        mod = choice.module
        _, n = in_out(mod)
        k = mod.weight[0].numel()
        r = effective_rank(choice.rank, n, k)
        lo, hi = PROXY_ROWS
        if n <= hi or any(effective_rank(choice.rank, rows, k) != r for rows in PROXY_ROWS):
            return self._built(choice, n)
        key = (type(mod).__name__, tuple(mod.weight.shape[1:]), mod.bias is not None, choice.weight, choice.act, r,
               choice.smooth_alpha is not None)
        if key not in self.cache:
            self.cache[key] = (self._built(choice, lo), self._built(choice, hi))
        b_lo, b_hi = self.cache[key]
        per_row, rest = divmod(b_hi - b_lo, hi - lo)
        assert rest == 0, "bytes must be linear in the output width"
        return b_lo + per_row * (n - lo)


def family_row(name: str, cls, config: dict, adapter, preset: str, sizer: LayerBytes, **overrides) -> dict:
    model = meta_model(cls, config)
    # bytes depend on the formats, not on how codes are chosen: no clip search, GPTQ or alpha search
    recipe = get_preset(preset).with_overrides(
        {"weight_clip": "minmax", "rounding": "rtn", "smooth_search": False, **overrides})
    layers = quantizable_layers(model)
    choices = choose_layers(model, recipe, role_of=adapter.role_of)
    bf16 = module_bytes(model, float_bits=16)
    total = bf16
    n_q = n_wo = 0
    for ch in choices:
        if ch.skip is not None:
            continue
        n_q += 1
        n_wo += ch.act is None and recipe.act is not None
        total += sizer(ch) - module_bytes(ch.module, float_bits=16)
    shares = role_shares(layers, adapter.role_of)
    return {
        "family": name, "class": cls.__name__, "preset": preset, "overrides": overrides,
        "params": sum(p.numel() for p in model.parameters()), "bf16_bytes": bf16, "quantized_bytes": total,
        "ratio": bf16 / total, "layers": len(choices), "quantized_layers": n_q, "weight_only_layers": n_wo,
        "adanorm_share": shares.get("adanorm", 0.0), "embed_share": shares.get("embed", 0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="w4a4-svd")
    ap.add_argument("--json", default="benchmarks/results/family_sizes.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizer = LayerBytes()
    rows = []
    for name, (cls, config, adapter) in families().items():
        for preset in args.presets.split(","):
            for tag, overrides in VARIANTS:
                t0 = time.perf_counter()
                row = family_row(name, cls, config, adapter, preset, sizer, **overrides)
                row["seconds"] = time.perf_counter() - t0
                row["variant"] = tag
                rows.append(row)
                print(f"{name:13s} {preset:9s} {tag:36s} {row['params'] / 1e9:6.2f}B params "
                      f"bf16 {row['bf16_bytes'] / 2**30:6.2f} GiB -> {row['quantized_bytes'] / 2**30:6.2f} GiB "
                      f"{row['ratio']:.2f}x (adaLN {row['adanorm_share']:.1%} of weights, "
                      f"{row['weight_only_layers']} weight-only layers) {row['seconds']:.0f} s", flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python -m benchmarks.family_sizes", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
