"""4-bit method ablations on a demo model: each addition alone and together, and a rank sweep.

Same protocol as the preset table of BENCHMARKS.md (``diffq bench``): prompts from the built-in
digits set, seeds 0.., 20 steps, guidance 5, calibration on 32 prompts (seeds 10000+), here with a
reservoir of input rows per layer and step for the methods that need real inputs. Per config:
denoiser bytes (16-bit floats, bf16 = 1.00x), layers quantized, PSNR / SSIM against the FP image
of the same prompt and seed and the CLIP score change against FP, each as mean ± the standard
error of the per-image (paired) values, and the quantize time (calibration excluded; it is shared).

    python -m benchmarks.ablation --model digits-dit --table methods --json benchmarks/results/ablation_methods_digits-dit.json
    python -m benchmarks.ablation --model digits-sd --table ranks ...
    python -m benchmarks.ablation --model digits-sd --table w4a8 ...
    python -m benchmarks.ablation --model digits-sd --configs "w4a4-svd;w4a4-svd:rounding=rtn,rank=8"

The FP images and the calibration are cached in ``--cache`` (safetensors), so tables share them.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffq
from diffq.apps.bench import Judge
from diffq.calibration import CalibrationStats
from diffq.eval import psnr, ssim
from diffq.eval.prompts import prompt_list
from diffq.generation import generate
from diffq.io import atomic_path, write_json_atomic
from diffq.pipelines.adapters import adapter_for
from diffq.sizes import module_bytes

# "label": "preset" or "preset:key=value,key=value"
OLD_SKIPS = "skip_roles=('embed','adanorm','io')"
#: w4a4-svd as it was before issue 15 (RTN, fixed α = 0.5, symmetric int4 activations, old 16-bit set)
OLD_SVD = f"w4a4-svd:rounding=rtn,smooth_search=false,act=int4:g64,act_center=false,weight_only=int4:g64,{OLD_SKIPS}"
#: w4a8 / w4a16 as they were before centring, int8 embeddings and the α search
_OLD_8_16 = "smooth_alpha=null,smooth_search=false,int8_weight_roles=('shortcut','resample','proj')"
OLD_W4A8 = f"w4a8:act_center=false,{_OLD_8_16}"
OLD_W4A16 = f"w4a16:{_OLD_8_16}"
EMBED_INT8 = "('embed','shortcut','resample','proj')"
TABLES: dict[str, dict[str, str]] = {
    "methods": {
        "w4a4-svd before issue 15": OLD_SVD,
        "+ reference 16-bit set": OLD_SVD + ",skip_roles=('embed','adanorm','io','shortcut','resample','proj')",
        "+ GPTQ": OLD_SVD + ",rounding=gptq",
        "+ alpha search": OLD_SVD + ",smooth_search=true",
        "+ unsigned act after GELU/SiLU": OLD_SVD + ",act_unsigned=true",
        "+ asymmetric act": OLD_SVD + ",act=uint4:g64",
        "+ centred act (per-sample channel means)": OLD_SVD + ",act_center=true",
        "+ asymmetric weights": OLD_SVD + ",weight=uint4:g64",
        "+ low-rank refit x3": OLD_SVD + ",lowrank_refit=3",
        "+ timestep balance": OLD_SVD + ",timestep_balance=true",
        "w4a4-svd before act centring": "w4a4-svd:act_center=false,weight_only=int4:g64",
        "w4a4-svd (all of set, GPTQ, search, asym act, centring)": "w4a4-svd",
        "w4a4-svd + Hessian-weighted group clipping": "w4a4-svd:gptq_weighted_clip=true",
        "w4a4 RTN (old 16-bit set)": f"w4a4:{OLD_SKIPS}",
        "w4a4 RTN + reference 16-bit set": "w4a4",
    },
    "weights": {
        "w4a16 RTN (before issue 15)": "w4a16:rounding=rtn",
        "w4a16 GPTQ (preset)": "w4a16",
        "w4a16 GPTQ act-order": "w4a16:gptq_act_order=true",
        "w4a16 GPTQ asymmetric": "w4a16:weight=uint4:g64",
        "w4a8 RTN (before issue 15)": "w4a8:rounding=rtn",
        "w4a8 GPTQ (preset)": "w4a8",
        "w8a16": "w8a16",
    },
    "w4a8": {
        "w4a8 before (GPTQ, MSE clip)": OLD_W4A8,
        "+ centred act (per-sample channel means)": OLD_W4A8 + ",act_center=true",
        "+ int8 embeddings": OLD_W4A8 + f",int8_weight_roles={EMBED_INT8}",
        "+ alpha search (one vector per q/k/v group)": OLD_W4A8 + ",smooth_alpha=0.5,smooth_search=true",
        "w4a8 (preset: all three)": "w4a8",
        "w4a8, each projection smoothed on its own": "w4a8:shared_smoothing=false",
        "w4a16 before (GPTQ, MSE clip)": OLD_W4A16,
        "w4a16 + int8 embeddings": OLD_W4A16 + f",int8_weight_roles={EMBED_INT8}",
        "w4a16 + alpha search (activation-aware scaling, shared)": OLD_W4A16 + ",smooth_alpha=0.5,smooth_search=true",
        "w4a16 (preset: both)": "w4a16",
        "w4a16, each projection smoothed on its own": "w4a16:shared_smoothing=false",
    },
    "fp4": {
        "fp4 before issue 15": f"fp4:{OLD_SKIPS}",
        "fp4 (preset: reference 16-bit set)": "fp4",
        "fp4 + smoothing 0.5 + rank-32 branch": "fp4-svd:rounding=rtn,smooth_search=false",
        "fp4-svd (+ GPTQ, alpha search)": "fp4-svd",
    },
    #: rank 13 is the largest rank at which digits-sd's w4a4-svd (reference 16-bit set) has no more bytes
    #: than the pre-issue w4a4-svd (1,394k vs 1,413k; rank 14: 1,425k)
    "ranks": {
        **{f"w4a4-svd rank {r}": f"w4a4-svd:rank={r}" for r in (0, 2, 4, 8, 13, 32)},
        "w4a4-svd rank_ratio 0.01 (FLUX-like)": "w4a4-svd:rank_ratio=0.01",
        "w4a4-svd rank 0 + FFN in 16 bits": "w4a4-svd:rank=0,skip_roles=('embed','adanorm','io','shortcut','resample',"
                                            "'proj','ffn_up','ffn_down')",
        "w4a4-svd rank 0 + attention in 16 bits": "w4a4-svd:rank=0,skip_roles=('embed','adanorm','io','shortcut',"
                                                  "'resample','proj','attn_qkv','cross_attn','attn_out')",
    },
}


def parse_config(text: str) -> tuple[str, list[str]]:
    """``"preset:k=v,k=v"`` -> (preset, ["k=v", ...]); commas inside (...) or [...] stay in a value."""
    name, _, rest = text.partition(":")
    out, depth, cur = [], 0, ""
    for ch in rest:
        depth += ch in "([" and 1 or 0
        depth -= ch in ")]" and 1 or 0
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return name.strip(), [o.strip() for o in out if o.strip()]


def recipe_of(text: str):
    name, overrides = parse_config(text)
    recipe = diffq.get_preset(name)
    return recipe.with_overrides(overrides) if overrides else recipe


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(max(len(v), 1)))


def _cached_images(path: Path, make) -> torch.Tensor:
    if path.is_file():
        return load_file(str(path))["images"]
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp))
    return images


def run(model: str, configs: dict[str, str], *, num_prompts: int, calib_prompts: int, reservoir: int,
        steps: int, guidance: float, cache: Path, batch_size: int = 50, seed_offset: int = 0,
        post: dict[str, Callable[[object], None]] | None = None) -> dict:
    """One row per config (label -> ``preset[:k=v,...]``); ``post[label](pipe)``, where given, changes
    that row's quantized pipeline before it generates (a study of a format the core does not build)."""
    pipe = diffq.load_model(model)
    prompts = prompt_list("digits", num_prompts)
    seeds = list(range(seed_offset, seed_offset + num_prompts))
    kw = {"num_inference_steps": steps, "guidance_scale": guidance, "batch_size": batch_size}
    ref = _cached_images(cache / f"{model}-fp-{num_prompts}x{steps}{f'-s{seed_offset}' if seed_offset else ''}.safetensors",
                         lambda: generate(pipe, prompts, seeds, **kw))
    stats_path = cache / f"{model}-calib-{calib_prompts}x{steps}-r{reservoir}-patches.safetensors"
    if stats_path.is_file():
        stats = CalibrationStats.load(stats_path)
    else:
        stats = diffq.calibrate(pipe, prompt_list("digits", calib_prompts), num_inference_steps=steps,
                                guidance_scale=guidance, seed=10_000, reservoir=reservoir, progress=False)
        stats.save(stats_path)
    judge = Judge(model)
    clip_fp = judge.clip_score(ref, prompts)
    dense = module_bytes(adapter_for(pipe).denoiser(pipe), float_bits=16)
    rows = []
    first_psnr = None
    for label, text in configs.items():
        p = copy.deepcopy(pipe)
        t0 = time.perf_counter()
        summary = diffq.quantize(p, recipe_of(text), calibration=stats, progress=False)
        qtime = time.perf_counter() - t0
        if post and label in post:
            post[label](p)
        imgs = generate(p, prompts, seeds, **kw)
        ps, ss = psnr(imgs, ref).clamp(max=100), ssim(imgs, ref)
        clip = judge.clip_score(imgs, prompts)
        dclip = (clip - clip_fp) / clip_fp.mean() * 100
        nbytes = module_bytes(adapter_for(p).denoiser(p), float_bits=16)
        row = {
            "label": label, "config": text, "bytes": nbytes, "size_vs_bf16": round(dense / nbytes, 3),
            "layers_quantized": len(summary.quantized), "layers": len(summary.layers),
            "psnr": _mean_se(ps), "ssim": _mean_se(ss), "clip": _mean_se(clip), "clip_vs_fp_pct": _mean_se(dclip),
            "accuracy": judge.accuracy(imgs, prompts), "quantize_s": round(qtime, 2),
            # paired per-image PSNR difference against the table's first row (same prompts and seeds)
            "psnr_vs_first_row": None if first_psnr is None else _mean_se(ps - first_psnr),
            # per image (seed order), for paired comparisons between runs of different code
            "per_image": {"psnr": [round(float(v), 4) for v in ps], "ssim": [round(float(v), 5) for v in ss],
                          "clip_vs_fp_pct": [round(float(v), 4) for v in dclip]},
        }
        first_psnr = ps if first_psnr is None else first_psnr
        rows.append(row)
        print(f"{label:34s} {row['psnr'][0]:6.2f} ±{row['psnr'][1]:.2f} dB  SSIM {row['ssim'][0]:.4f}  "
              f"CLIP {row['clip_vs_fp_pct'][0]:+.2f}% ±{row['clip_vs_fp_pct'][1]:.2f}  "
              f"{row['size_vs_bf16']:.2f}x  {row['layers_quantized']}/{row['layers']} layers  {qtime:.1f} s"
              + ("" if first_psnr is ps else f"  vs first row {row['psnr_vs_first_row'][0]:+.2f} ±{row['psnr_vs_first_row'][1]:.2f} dB"),
              flush=True)
        del p
    return {"model": model, "num_prompts": num_prompts, "seeds": [seeds[0], seeds[-1]], "steps": steps, "guidance": guidance,
            "calib_prompts": calib_prompts, "reservoir": reservoir, "dense_bytes": dense,
            "clip_fp": _mean_se(clip_fp), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--table", default=None, choices=sorted(TABLES))
    ap.add_argument("--configs", default=None, help="';'-separated configs 'preset[:k=v,k=v]' (labels = the text)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--reservoir", type=int, default=256)
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="first seed; e.g. 1000 for a validation split that choosing a configuration may look at "
                         "(the reported tables use seeds 0..)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="runs/ablation-cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.configs:
        configs = {c: c for c in args.configs.split(";") if c}
    elif args.table:
        configs = TABLES[args.table]
    else:
        raise SystemExit("pass --table or --configs")
    result = run(args.model, configs, num_prompts=args.num_prompts, calib_prompts=args.calib_prompts,
                 reservoir=args.reservoir, steps=args.steps, guidance=args.guidance, cache=Path(args.cache),
                 seed_offset=args.seed_offset)
    result["table"] = args.table or "custom"
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
