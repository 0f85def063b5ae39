"""Quantized attention on the demo models: image quality of ``w8a8`` vs ``w8a8`` + int8-fp8
attention (the preset protocol), and each attention module's output error per timestep, with and
without K smoothing.

    python -m benchmarks.attention_quality [--models digits-sd,digits-dit] [--num-prompts 200]
        [--calib-prompts 32] [--recipes fp,w8a8,w8a8-attn] [--threads 2]

Protocol of BENCHMARKS.md "Presets on the demo models": prompts 0..N-1 of the built-in digits set,
seeds 0..N-1, 20 DDIM steps, guidance 5; calibration on ``--calib-prompts`` prompts, seeds 10000+.
Per recipe: PSNR / SSIM against the FP images of the same prompts and seeds, digits-clip CLIP score
and digit accuracy; and for every recipe ending in ``-attn`` the paired per-image differences to the
same recipe without it (PSNR and CLIP, mean ± standard error). The calibration runs with
``attention_operands=True``, which records the relative L2 error of every attention module's
output per step for each attention format (:func:`diffq.attention.probe_attention`).
Writes ``benchmarks/results/attention_quality.json`` and ``attention_error_<model>.png``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, GUIDANCE = 20, 5.0


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double())
    return {"mean": float(d.mean()), "se": float(d.std() / len(d) ** 0.5)}


def error_table(stats, labels: tuple[str, ...]) -> dict:
    """module -> label -> per-step relative L2 (None where unrecorded) and its mean."""
    out = {}
    for name in stats.attention_error:
        row = {}
        for label in labels:
            err = stats.attention_relative_error(name, label)
            row[label] = {"per_step": [None if torch.isnan(e) else float(e) for e in err],
                          "mean": stats.mean_attention_error(name, label)}
        out[name] = row
    return out


def run_model(model: str, recipes: list[str], n: int, n_calib: int) -> dict:
    from diffq import quantize
    from diffq.apps.bench import Judge
    from diffq.calibration import calibrate
    from diffq.eval import psnr, ssim
    from diffq.eval.prompts import prompt_list
    from diffq.generation import generate
    from diffq.pipelines.demo_models import demo_pipeline

    pipe = demo_pipeline(model)
    prompts = prompt_list("digits", n)
    seeds = list(range(n))
    gen = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "batch_size": 25}
    judge = Judge(model)
    t0 = time.perf_counter()
    stats = calibrate(pipe, prompt_list("digits", n_calib), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      seed=10_000, attention_operands=True, progress=False)
    calib_s = time.perf_counter() - t0
    ref = generate(pipe, prompts, seeds, desc="generate fp", **gen)
    per_image, rows = {}, []
    for name in recipes:
        p = pipe if name == "fp" else copy.deepcopy(pipe)
        summary = None
        if name != "fp":
            summary = quantize(p, name, calibration=stats, progress=False)
        t0 = time.perf_counter()
        imgs = ref if name == "fp" else generate(p, prompts, seeds, desc=f"generate {name}", **gen)
        gen_s = time.perf_counter() - t0
        ps = psnr(imgs, ref).clamp(max=100.0)
        clip = judge.clip_score(imgs, prompts)
        per_image[name] = {"psnr": ps, "clip": clip}
        row = {"recipe": name, "psnr": float(ps.mean()) if name != "fp" else None,
               "ssim": float(ssim(imgs, ref).mean()), "clip": float(clip.mean()),
               "accuracy": judge.accuracy(imgs, prompts), "generate_s": round(gen_s, 1),
               "attention_modules": 0 if summary is None else sum(a.skipped is None for a in summary.attention)}
        rows.append(row)
        print(f"{model} {name:16} PSNR {row['psnr'] or float('inf'):.2f}  SSIM {row['ssim']:.4f}  "
              f"CLIP {row['clip']:.2f}  acc {row['accuracy']}  ({gen_s:.0f} s)", flush=True)
    fp_clip = per_image["fp"]["clip"].mean() if "fp" in per_image else None
    paired = []
    for name in recipes:
        base = name[: -len("-attn")] if name.endswith("-attn") else None
        if base in per_image:
            a, b = per_image[name], per_image[base]
            pair = {"recipe": name, "vs": base, "psnr": _paired(a["psnr"], b["psnr"]),
                    "clip": _paired(a["clip"], b["clip"])}
            if fp_clip is not None:
                pair["clip_rel_pct"] = {k: 100 * v / float(fp_clip) for k, v in pair["clip"].items()}
            paired.append(pair)
            print(f"{model} {name} - {base}: PSNR {pair['psnr']['mean']:+.3f} ± {pair['psnr']['se']:.3f} dB, "
                  f"CLIP {pair['clip']['mean']:+.3f} ± {pair['clip']['se']:.3f}", flush=True)
    labels = tuple(stats.attention_formats)
    return {"model": model, "prompts": n, "calib_prompts": n_calib, "steps": STEPS, "guidance": GUIDANCE,
            "calibration_s": round(calib_s, 1), "step_buckets": stats.step_buckets, "rows": rows,
            "paired": paired, "attention_error": error_table(stats, labels)}


def plot_errors(result: dict, out_png: Path) -> None:
    """Per-step relative L2 of every attention module (int8-fp8, and int8-fp16 where only Q·Kᵀ is
    quantized), and the ratio smoothed / not smoothed of the latter (below 1: smoothing helps)."""
    from diffq.plotting import new_figure, save_figure

    fig = new_figure((16, 4.2))
    axes = fig.subplots(1, 3, squeeze=False)[0]
    t = result["step_buckets"]
    for name, row in result["attention_error"].items():
        short = name.replace("transformer_blocks", "tb").replace("attentions", "at").replace("_blocks", "")
        for ax, label in zip(axes[:2], ("int8-fp8", "int8-fp16")):
            ax.plot(t, row[label]["per_step"], lw=1, label=short)
        ratio = [a / b if a and b else None for a, b in zip(row["int8-fp16"]["per_step"],
                                                            row["int8-fp16/no-smooth"]["per_step"])]
        axes[2].plot(t, ratio, lw=1, label=short)
    for ax, title in zip(axes, ("int8-fp8 (K smoothed)", "int8-fp16: Q·Kᵀ error alone (K smoothed)",
                                "int8-fp16 error, smoothed / not smoothed")):
        ax.set_title(f"{result['model']}: {title}", fontsize=9)
        ax.set_xlabel("timestep (denoising runs right to left)")
        ax.invert_xaxis()
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("relative L2 of attention output vs FP")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].legend(fontsize=5, loc="best")
    fig.tight_layout()
    save_figure(fig, out_png)


LABELS = ("int8-fp16", "int8", "int8-fp8", "int4-fp8")


def markdown(results: list[dict]) -> str:
    """BENCHMARKS.md tables from the JSON: quality per recipe, paired differences, per-layer errors."""
    out = []
    for r in results:
        out.append(f"**{r['model']}** ({r['prompts']} prompts, calibration {r['calib_prompts']} prompts)\n")
        out.append("| recipe | PSNR vs FP (dB) | SSIM vs FP | CLIP score | digit accuracy | attention modules quantized |")
        out.append("|---|---|---|---|---|---|")
        for row in r["rows"]:
            ps = "—" if row["psnr"] is None else f"{row['psnr']:.2f}"
            out.append(f"| {row['recipe']} | {ps} | {row['ssim']:.4f} | {row['clip']:.2f} | {row['accuracy']:.3f} | "
                       f"{row['attention_modules']} |")
        out.append("")
        for p in r["paired"]:
            out.append(f"- `{p['recipe']}` - `{p['vs']}` (paired per image): PSNR {p['psnr']['mean']:+.3f} ± "
                       f"{p['psnr']['se']:.3f} dB, CLIP {p['clip']['mean']:+.3f} ± {p['clip']['se']:.3f} "
                       f"({p['clip_rel_pct']['mean']:+.2f}% ± {p['clip_rel_pct']['se']:.2f}% of FP's CLIP score)")
        out.append("")
        head = " | ".join(f"{lab} smoothed / not" for lab in LABELS)
        out.append(f"| attention module (mean over steps) | {head} |")
        out.append("|---|" + "---|" * len(LABELS))
        lower = dict.fromkeys(LABELS, 0)
        for name, row in r["attention_error"].items():
            cells = []
            for lab in LABELS:
                a, b = row[lab]["mean"], row[f"{lab}/no-smooth"]["mean"]
                lower[lab] += a < b
                cells.append(f"{a:.4f} / {b:.4f}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        n = len(r["attention_error"])
        out.append("| smoothing lowers the error in | " + " | ".join(f"{lower[lab]}/{n}" for lab in LABELS) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from diffq.io import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--recipes", default="fp,w8a8,w8a8-attn")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--calib-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(RESULTS / "attention_quality.json"))
    ap.add_argument("--render", action="store_true", help="only print the tables (and plots) of an existing --json")
    a = ap.parse_args(argv)
    if a.render:
        import json

        results = json.loads(Path(a.json).read_text())["results"]
        for res in results:
            plot_errors(res, Path(a.json).with_name(f"attention_error_{res['model']}.png"))
        print(markdown(results))
        return
    torch.set_num_threads(a.threads)
    results = []
    for model in a.models.split(","):
        res = run_model(model, a.recipes.split(","), a.num_prompts, a.calib_prompts)
        plot_errors(res, Path(a.json).with_name(f"attention_error_{model}.png"))
        results.append(res)
    write_json_atomic(a.json, {"machine": f"{platform.machine()} CPU, {a.threads} torch threads (shared machine)",
                               "torch": torch.__version__, "args": vars(a) | {"json": Path(a.json).name}, "results": results})
    print(markdown(results))


if __name__ == "__main__":
    main()
