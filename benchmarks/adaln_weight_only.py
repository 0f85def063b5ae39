"""adaLN modulation layers quantized weight-only (the default since issue 17) vs kept in 16 bits, on
digits-dit: image quality and denoiser size, per preset, paired per image.

    python -m benchmarks.adaln_weight_only [--model digits-dit] [--num-prompts 200] [--calib-prompts 32]
        [--presets w4a4-svd,w8a8] [--threads 1]

Protocol of BENCHMARKS.md "Presets on the demo models": prompts 0..N-1 of the built-in digits set,
seeds 0..N-1, 20 DDIM steps, guidance 5; calibration on ``--calib-prompts`` prompts, seeds 10000+.
For each preset: the default recipe (adaLN weight-only, ``weight_only_roles=("adanorm",)``: int8 per
channel where that is no larger than the recipe's weight format with its branch, else that format),
the same with ``weight_only=int4:g64`` and with ``weight_only=int8`` (int8 per-channel adaLN), and
with ``weight_only_roles=[]`` (adaLN in 16 bits, diffq before issue 17); PSNR / SSIM
against the FP images of the same prompts and seeds, digits-clip CLIP score and digit accuracy, and
the paired per-image differences of each variant - 16-bit adaLN (mean ± standard error).
Writes ``benchmarks/results/adaln_weight_only.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.attention_quality import GUIDANCE, STEPS, _paired

RESULTS = Path(__file__).resolve().parent / "results"
#: (label, recipe overrides); the last one is the reference of the paired differences
VARIANTS = (
    ("adaLN weight-only (default: int8 where no larger than int4 + branch)", {}),
    ("adaLN int4 weight-only + branch", {"weight_only": "int4:g64"}),
    ("adaLN int8 weight-only", {"weight_only": "int8"}),
    ("adaLN 16-bit", {"weight_only_roles": []}),
)


def run(model: str, presets: list[str], n: int, n_calib: int) -> dict:
    from diffq import quantize
    from diffq.apps.bench import Judge
    from diffq.calibration import calibrate
    from diffq.eval import psnr, ssim
    from diffq.eval.prompts import prompt_list
    from diffq.generation import generate
    from diffq.pipelines.demo_models import demo_pipeline
    from diffq.quantization.presets import get_preset

    pipe = demo_pipeline(model)
    prompts, seeds = prompt_list("digits", n), list(range(n))
    gen = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "batch_size": 25}
    judge = Judge(model)
    stats = calibrate(pipe, prompt_list("digits", n_calib), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      seed=10_000, progress=False, reservoir=256)  # GPTQ and the alpha search need rows
    ref = generate(pipe, prompts, seeds, desc="generate fp", **gen)
    fp_clip = judge.clip_score(ref, prompts)
    rows, paired = [], []
    for preset in presets:
        per = {}
        for tag, overrides in VARIANTS:
            p = copy.deepcopy(pipe)
            recipe = get_preset(preset).with_overrides(overrides)
            summary = quantize(p, recipe, calibration=stats, progress=False)
            t0 = time.perf_counter()
            imgs = generate(p, prompts, seeds, desc=f"generate {preset} {tag}", **gen)
            ps, clip = psnr(imgs, ref).clamp(max=100.0), judge.clip_score(imgs, prompts)
            per[tag] = {"psnr": ps, "clip": clip}
            wo = sum(1 for r in summary.layers if r.role == "adanorm" and r.skipped is None)
            row = {"preset": preset, "adaln": tag, "psnr": float(ps.mean()), "ssim": float(ssim(imgs, ref).mean()),
                   "clip": float(clip.mean()), "accuracy": judge.accuracy(imgs, prompts),
                   "size_ratio": summary.size_ratio, "adaln_layers_quantized": wo,
                   "generate_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{model} {preset:9} {tag:18} PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} CLIP {row['clip']:.2f} "
                  f"acc {row['accuracy']:.3f} size {row['size_ratio']:.2f}x ({wo} adaLN layers quantized)", flush=True)
        b = per["adaLN 16-bit"]
        for tag, _ in VARIANTS[:-1]:
            a = per[tag]
            pair = {"preset": preset, "adaln": tag, "psnr": _paired(a["psnr"], b["psnr"]),
                    "clip": _paired(a["clip"], b["clip"])}
            pair["clip_rel_pct"] = {k: 100 * v / float(fp_clip.mean()) for k, v in pair["clip"].items()}
            paired.append(pair)
            print(f"{model} {preset} {tag} - 16-bit adaLN: PSNR {pair['psnr']['mean']:+.3f} ± "
                  f"{pair['psnr']['se']:.3f} dB, CLIP {pair['clip']['mean']:+.3f} ± {pair['clip']['se']:.3f}", flush=True)
    return {"model": model, "prompts": n, "calib_prompts": n_calib, "steps": STEPS, "guidance": GUIDANCE,
            "fp_clip": float(fp_clip.mean()), "rows": rows, "paired": paired}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--presets", default="w4a4-svd,w8a8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(RESULTS / "adaln_weight_only.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args.model, args.presets.split(","), args.num_prompts, args.calib_prompts)
    result.update(wall_s=round(time.perf_counter() - t0, 1), threads=args.threads,
                  machine=f"{platform.machine()} CPU, {args.threads} torch thread(s), shared 2-core machine")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
