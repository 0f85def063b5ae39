"""One denoising step of a real-config denoiser (random weights), bf16 vs each diffq preset.

Random weights are fine for speed and memory: both depend on shapes and formats only. Each preset
is applied with ``diffq.quantize(..., calibration=None)``; presets that need calibration are run
without their calibrated part and say so (``w4a4-svd`` without smoothing: low-rank branch + int4),
``w8a8-static`` is skipped (its static ranges only exist after calibration).

Reported per preset: step latency (median), latency ratio bf16 / preset (>1 = faster), weight
bytes of the denoiser and their ratio, and on CUDA the peak allocated memory of the step (weights
+ activations) and its ratio. On the CPU there is no allocator peak, so only weight bytes are
reported, and the quantized layers run the torch reference path (dequantize, then matmul): CPU
latency ratios measure that path, not the Triton kernels.

    python -m benchmarks.e2e_step --model sd15 [--scale 0.125] [--presets w8a8,w4a16] [--json out.json]

Configs (the values that set layer shapes), from the diffusers configs on the Hugging Face hub:
* ``runwayml/stable-diffusion-v1-5/unet/config.json`` (512 px: 64x64 latent, 77 text tokens, CFG batch 2)
* ``stabilityai/stable-diffusion-xl-base-1.0/unet/config.json`` (1024 px: 128x128 latent, CFG batch 2)
* ``black-forest-labs/FLUX.1-dev/transformer/config.json`` (1024 px: 4096 image + 512 text tokens,
  batch 1: FLUX.1-dev is guidance-distilled, no CFG batch)

``--scale F`` (F <= 1) shrinks a model for the CPU: channels / heads / layers / tokens times F
(GroupNorm groups 8 when scaled so that channel counts stay divisible).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

import diffq
from benchmarks.model_configs import FLUX_DIT, SD15_UNET, SDXL_UNET
from diffq.io import write_json_atomic
from diffq.sizes import module_bytes
from diffq.timing import device_name

TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "flux": 512}
DEFAULT_PRESETS = "w8a8,w4a8,w4a16,w4a4,w4a4-svd,fp8,fp4"


class StableDiffusionPipelineDenoiserOnly:
    """Holds only the UNet: diffq's SD adapter finds the denoiser by this name prefix and ``.unet``."""

    def __init__(self, unet):
        self.unet = unet


class StableDiffusionXLPipelineDenoiserOnly(StableDiffusionPipelineDenoiserOnly):
    pass


class FluxPipelineDenoiserOnly:
    def __init__(self, transformer):
        self.transformer = transformer


def _c(c: int, f: float) -> int:
    return max(8, round(c * f / 8) * 8)


def build(model: str, scale: float, device: str, dtype: torch.dtype):
    """-> (holder pipeline, denoiser, inputs dict) with seeded random weights."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if model in ("sd15", "sdxl"):
        cfg = dict(SD15_UNET if model == "sd15" else SDXL_UNET)
        if scale < 1:
            cfg["block_out_channels"] = tuple(_c(c, scale) for c in cfg["block_out_channels"])
            cfg["cross_attention_dim"] = _c(cfg["cross_attention_dim"], scale)
            cfg["sample_size"] = max(8, int(cfg["sample_size"] * scale) // 8 * 8)
            cfg["norm_num_groups"] = 8
            if model == "sdxl":
                cfg["transformer_layers_per_block"] = tuple(max(1, math.ceil(n * scale)) for n in cfg["transformer_layers_per_block"])
                cfg["addition_time_embed_dim"] = _c(256, scale)
                cfg["projection_class_embeddings_input_dim"] = cfg["cross_attention_dim"] + 6 * cfg["addition_time_embed_dim"]
        den = UNet2DConditionModel(**cfg).to(device, dtype).eval()
        b, s = 2, cfg["sample_size"]
        inputs = {
            "sample": torch.randn(b, 4, s, s, device=device, dtype=dtype),
            "timestep": torch.tensor([500] * b, device=device),
            "encoder_hidden_states": torch.randn(b, TEXT_TOKENS[model], cfg["cross_attention_dim"], device=device,
                                                 dtype=dtype),
        }  # fmt: skip
        if model == "sdxl":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
                "time_ids": torch.tensor([[s * 8, s * 8, 0, 0, s * 8, s * 8]] * b, device=device, dtype=dtype),
            }
            holder = StableDiffusionXLPipelineDenoiserOnly(den)
        else:
            holder = StableDiffusionPipelineDenoiserOnly(den)
        return holder, den, inputs
    cfg = dict(FLUX_DIT)
    side, txt = 64, TEXT_TOKENS["flux"]
    if scale < 1:
        cfg["num_attention_heads"] = max(1, round(24 * scale))
        cfg["num_layers"] = max(1, math.ceil(19 * scale))
        cfg["num_single_layers"] = max(1, math.ceil(38 * scale))
        cfg["joint_attention_dim"] = _c(4096, scale)
        cfg["pooled_projection_dim"] = _c(768, scale)
        side, txt = max(4, int(side * scale)), max(8, int(txt * scale))
    den = FluxTransformer2DModel(**cfg).to(device, dtype).eval()
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(side * side, 1), ids.float()], 1).to(device)
    inputs = {
        "hidden_states": torch.randn(1, side * side, cfg["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, txt, cfg["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3, device=device),
    }
    return FluxPipelineDenoiserOnly(den), den, inputs


def recipe_for(preset: str) -> tuple[object | None, str]:
    """(recipe usable without calibration, note) or (None, why skipped)."""
    from diffq.quantization.presets import get_preset

    r = get_preset(preset)
    if r.act_static:
        return None, "needs calibrated static activation ranges"
    if r.smooth_alpha is not None:
        return {"preset": preset, "smooth_alpha": None}, "run without smoothing (no calibration)"
    return preset, ""


def weight_bytes(m: torch.nn.Module) -> int:
    return module_bytes(m)  # what the denoiser holds (diffq's one byte counter)


def time_step(den, inputs, reps: int, cuda: bool) -> tuple[float, int | None]:
    """Median ms of one forward, and (CUDA) peak bytes allocated during it."""
    with torch.inference_mode():
        den(**inputs)  # warm-up (and Triton autotuning on CUDA)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            den(**inputs)
            if cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return statistics.median(ts) * 1e3, peak


@dataclass
class Result:
    preset: str
    ms: float
    latency_ratio: float  # bf16 ms / preset ms (> 1 = faster)
    weight_bytes: int
    weight_ratio: float  # bf16 bytes / preset bytes (> 1 = smaller)
    peak_bytes: int | None
    peak_ratio: float | None
    quantized_layers: int
    note: str = ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sd15", "sdxl", "flux"), default="sd15")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink factor (<= 1) for CPU runs")
    ap.add_argument("--presets", default=DEFAULT_PRESETS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default 1 on the CPU: on a shared machine OpenMP barriers of >1 thread turn "
        "every op into a scheduler wait and timings become noise)",
    )  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not 0 < args.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda" if cuda else "cpu"), torch.bfloat16

    _, den, inputs = build(args.model, args.scale, device, dtype)
    base_ms, base_peak = time_step(den, inputs, args.reps, cuda)
    base_bytes = weight_bytes(den)
    print(f"{args.model} scale={args.scale} on {device_name()}: bf16 step {base_ms:.1f} ms, "
          f"weights {base_bytes / 1e6:.1f} MB" + (f", peak {base_peak / 1e9:.2f} GB" if cuda else ""), flush=True)
    del den
    gc.collect()
    results = []
    for preset in args.presets.split(","):
        recipe, note = recipe_for(preset)
        if recipe is None:
            print(f"{preset}: skipped ({note})")
            continue
        holder, den, inputs = build(args.model, args.scale, device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        summary = diffq.quantize(holder, recipe, calibration=None, progress=False)
        nq = sum(1 for r in summary.layers if r.skipped is None)
        ms, peak = time_step(den, inputs, args.reps, cuda)
        wb = weight_bytes(den)
        res = Result(
            preset, round(ms, 2), round(base_ms / ms, 3), wb, round(base_bytes / wb, 3), peak,
            round(base_peak / peak, 3) if (cuda and peak) else None, nq, note,
        )  # fmt: skip
        results.append(res)
        print(f"{preset:9s} {ms:9.1f} ms  latency x{res.latency_ratio:.2f}  weights {wb / 1e6:8.1f} MB "
              f"(x{res.weight_ratio:.2f} smaller)" + (f"  peak x{res.peak_ratio:.2f}" if cuda else "")
              + (f"  [{note}]" if note else ""), flush=True)  # fmt: skip
        del den, holder
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        payload = {
            "meta": {
                "model": args.model, "scale": args.scale, "device": device_name(), "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": "bfloat16",
                "command": " ".join(["python", "benchmarks/e2e_step.py", *(argv if argv is not None else sys.argv[1:])]),
                "path": "Triton kernels" if cuda else "torch reference (CPU)",
            },
            "bf16": {"ms": round(base_ms, 2), "weight_bytes": base_bytes, "peak_bytes": base_peak},
            "presets": [asdict(r) for r in results],
        }  # fmt: skip
        write_json_atomic(args.json, payload)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
