"""FP4 rows of the preset table, and FP4 + SVD against ``w4a4-svd`` with paired standard errors.

    python -m benchmarks.fp4_presets --models digits-sd,digits-dit \\
        --recipes "fp4;mxfp4;w4a4-svd;fp4-svd*=fp4:smooth_alpha=0.5,rank=32,weight_clip=mse" \\
        --pairs "fp4-svd*:w4a4-svd" [--num-prompts 200 --calib-prompts 32 --threads 2]

The protocol of ``diffq bench`` (BENCHMARKS.md, presets): the built-in digit prompts, image i on seed
i, 20 DDIM steps, guidance 5, one calibration on ``--calib-prompts`` prompts (seed 10000) shared by
every recipe; PSNR / SSIM against the FP images of the same seeds, digits-clip CLIP score and digit
accuracy, FID on digits-clip features (generated vs as many held-out real digits), denoiser bytes
(16-bit floats, ``diffq.sizes.module_bytes``). Recipes are separated by ``;``; each is a preset name or
``LABEL=PRESET:key=value,key=value`` (recipe overrides, for recipes that are not presets yet).
``--pairs A:B`` reports the paired per-image differences A - B of PSNR, SSIM and CLIP score with
their standard errors (same prompts and seeds). Writes ``benchmarks/results/fp4_presets_<model>.json``.
On a CPU the quantized layers run the torch reference path (the same quantization as the kernels).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_recipe(text: str):
    """"w4a4-svd" -> (label, Recipe); "LABEL=PRESET:k=v,k=v" -> the preset with overrides, named LABEL."""
    from diffq.quantization.presets import get_preset

    if "=" not in text.split(":", 1)[0]:
        return text, get_preset(text)
    label, rest = text.split("=", 1)
    preset, _, over = rest.partition(":")
    items = [o for o in over.split(",") if o] + [f"name={label}"]
    return label, get_preset(preset).with_overrides(items)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std(unbiased=True) / len(v) ** 0.5) if len(v) > 1 else 0.0


def run_model(model: str, recipes: list[str], pairs: list[tuple[str, str]], n: int, calib_n: int) -> dict:
    from diffq.apps.bench import Judge
    from diffq.apps.models import load_model
    from diffq.calibration import calibrate
    from diffq.eval import psnr, ssim
    from diffq.eval.prompts import prompt_list
    from diffq.generation import generate
    from diffq.pipelines.adapters import adapter_for
    from diffq.quantization.apply import quantize
    from diffq.sizes import module_bytes

    pipe = load_model(model)
    prompts = prompt_list("digits", n)
    seeds = list(range(n))
    gen = {"num_inference_steps": 20, "guidance_scale": 5.0, "batch_size": 25, "progress": True}
    judge = Judge(model)
    t0 = time.perf_counter()
    ref = generate(pipe, prompts, seeds, desc=f"{model} fp", **gen)
    stats = calibrate(pipe, prompt_list("digits", calib_n), num_inference_steps=20, guidance_scale=5.0, seed=10_000,
                      progress=False, reservoir=256)  # fmt: skip  (rows: GPTQ and the alpha search)
    dense = module_bytes(adapter_for(pipe).denoiser(pipe), float_bits=16)
    per_image: dict[str, dict[str, torch.Tensor]] = {}
    rows = []
    fp_clip = judge.clip_score(ref, prompts)
    rows.append({"recipe": "fp", "clip_score": float(fp_clip.mean()), "accuracy": judge.accuracy(ref, prompts),
                 "fid": judge.fid(ref), "denoiser_bytes": dense, "size_ratio": 1.0})  # fmt: skip
    per_image["fp"] = {"clip": fp_clip}
    for text in recipes:
        label, recipe = parse_recipe(text)
        p = copy.deepcopy(pipe)
        quantize(p, recipe, calibration=stats, progress=False)
        nbytes = module_bytes(adapter_for(p).denoiser(p), float_bits=16)
        imgs = generate(p, prompts, seeds, desc=f"{model} {label}", **gen)
        ps, ss = psnr(imgs, ref).clamp(max=100).float(), ssim(imgs, ref).float()
        cs = judge.clip_score(imgs, prompts)
        per_image[label] = {"psnr": ps, "ssim": ss, "clip": cs}
        rows.append({
            "recipe": label, "definition": recipe.to_dict(), "psnr": float(ps.mean()), "ssim": float(ss.mean()),
            "clip_score": float(cs.mean()), "clip_vs_fp_pct": 100 * float(cs.mean() / fp_clip.mean() - 1),
            "accuracy": judge.accuracy(imgs, prompts), "fid": judge.fid(imgs), "denoiser_bytes": nbytes,
            "size_ratio": dense / nbytes,
        })  # fmt: skip
        print(f"{model} {label}: PSNR {rows[-1]['psnr']:.2f} SSIM {rows[-1]['ssim']:.4f} CLIP {rows[-1]['clip_score']:.2f} "
              f"bytes {nbytes}", flush=True)  # fmt: skip
        del p
    diffs = []
    for a, b in pairs:
        d = {"a": a, "b": b}
        for key in ("psnr", "ssim", "clip"):
            d[key], d[f"{key}_se"] = _mean_se(per_image[a][key] - per_image[b][key])
        diffs.append(d)
    return {"model": model, "rows": rows, "pairs": diffs, "secs": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    from diffq.io import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--recipes", default="fp4;mxfp4;w4a4-svd", help="';'-separated recipes")
    ap.add_argument("--pairs", default="", help="comma-separated A:B recipe labels")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the output JSON names")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipes = [r for r in a.recipes.split(";") if r]
    pairs = [tuple(p.split(":")) for p in a.pairs.split(",") if p]
    for model in a.models.split(","):
        res = run_model(model, recipes, pairs, a.num_prompts, a.calib_prompts)
        res["meta"] = {"command": "python -m benchmarks.fp4_presets " + " ".join(argv or sys.argv[1:]),
                       "machine": f"{platform.machine()} CPU, {a.threads} threads, shared", "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        write_json_atomic(RESULTS / f"fp4_presets_{model}{a.tag}.json", res)
        for d in res["pairs"]:
            print(f"{model} {d['a']} - {d['b']}: PSNR {d['psnr']:+.2f} ± {d['psnr_se']:.2f}, SSIM {d['ssim']:+.4f} ± "
                  f"{d['ssim_se']:.4f}, CLIP {d['clip']:+.2f} ± {d['clip_se']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
