"""Denoiser size of every preset on an SD1.5-size UNet (real SD1.5 UNet config, random weights).

Random weights are fine for size: bytes depend on shapes and formats, not values (for the same
reason the MSE weight-clip search is switched off here: it changes codes, not bytes). The pipeline
around the UNet is tiny (small VAE and a one-layer 768-wide text encoder) so calibration, which
smoothing needs, runs on CPU in seconds at 256x256.

    python -m benchmarks.sd15_size [--presets w8a8,w4a4-svd] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import diffq
from benchmarks.model_configs import SD15_UNET
from diffq.pipelines.tiny_tokenizers import CLIP_SPECIAL_IDS, clip_style_tokenizer, vocab_size


def sd15_size_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = clip_style_tokenizer()
    ids = CLIP_SPECIAL_IDS
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size("clip"), hidden_size=768, intermediate_size=256,
                                      num_hidden_layers=1, num_attention_heads=12, bos_token_id=ids["bos"],
                                      eos_token_id=ids["eos"], pad_token_id=ids["pad"]))
    pipe = StableDiffusionPipeline(vae=vae.to(torch.bfloat16), text_encoder=te.to(torch.bfloat16), tokenizer=tokenizer,
                                   unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="w8a8,w4a8,w4a16,w4a4,w4a4-svd,fp8,fp4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = sd15_size_pipeline()
    n_params = sum(p.numel() for p in base.unet.parameters())
    print(f"SD1.5 UNet: {n_params / 1e6:.0f}M parameters, {n_params * 2 / 2**20:.0f} MiB in bf16")
    t0 = time.perf_counter()
    stats = diffq.calibrate(base, ["a photo"], num_inference_steps=2, height=256, width=256, progress=False)
    print(f"calibration (1 prompt x 2 steps at 256x256): {time.perf_counter() - t0:.0f} s")
    rows = []
    for name in args.presets.split(","):
        pipe = copy.deepcopy(base)
        t0 = time.perf_counter()
        # bytes do not depend on clip values: skip the MSE clip search (minutes per preset on CPU)
        recipe = diffq.get_preset(name).with_overrides(["weight_clip=minmax"])
        s = diffq.quantize(pipe, recipe, calibration=stats, progress=False)
        dt = time.perf_counter() - t0
        rows.append({"preset": name, "size_ratio_vs_bf16": round(s.size_ratio, 3),
                     "denoiser_MiB": round(s.denoiser_bytes_after / 2**20, 1), "quantized_layers": len(s.quantized),
                     "layers": len(s.layers), "quantize_s": round(dt, 1)})
        print(rows[-1], flush=True)
        del pipe
    if args.json:
        from diffq.io import write_json_atomic

        write_json_atomic(args.json, {"n_params": n_params, "rows": rows})


if __name__ == "__main__":
    main()
