"""Timestep-aware calibration on the shipped demo models: cost, range drift, and what
per-timestep-group activation scales buy over one static scale.

    python -m benchmarks.calibration [--models digits-sd,digits-dit] [--prompts 32] [--steps 20] [--json out.json]

Prints, per model: wall time and peak extra memory of calibration; the ten layers whose
activation range varies most across steps (max/min of the per-step abs-max); and the mean
expected activation quantization MSE at 8 and 4 bits with automatic timestep groups versus one
static range (from the per-step histograms).
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil
import torch

from diffq.apps.models import load_model
from diffq.calibration import calibrate, grouping_mse, step_groups
from diffq.eval.prompts import prompt_list
from diffq.io import write_json_atomic


def run(model: str, n_prompts: int, steps: int, threshold: float) -> dict:
    pipe = load_model(model)
    prompts = prompt_list("digits", n_prompts)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    stats = calibrate(pipe, prompts, num_inference_steps=steps, batch_size=8, progress=False)
    wall = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    stats_bytes = sum(t.numel() * t.element_size() for st in stats.layers.values()
                      for t in st.to_tensors("x").values())
    drift = []
    for name, st in stats.layers.items():
        r = st.amax()[st.observed]
        if len(r) > 1 and float(r.min()) > 0:
            drift.append((float(r.max() / r.min()), name))
    drift.sort(reverse=True)
    mse = {}
    for bits in (8, 4):
        gl = [grouping_mse(stats, n, bits, groups=None, threshold=threshold) for n in stats.layers]
        sl = [grouping_mse(stats, n, bits, groups=1) for n in stats.layers]
        # the mean is dominated by the widest-range layers; the per-layer ratio shows the typical layer
        ratios = [g / s for g, s in zip(gl, sl) if s > 0]
        geo = float(torch.tensor(ratios).log().mean().exp()) if ratios else 1.0
        mse[bits] = {"grouped": sum(gl) / len(gl), "static": sum(sl) / len(sl), "per_layer_geomean_ratio": geo,
                     "layers_improved": sum(r < 1 for r in ratios), "layers": len(ratios)}
    n_groups = [max(step_groups(stats, n, None, threshold)[1]) + 1 for n in stats.layers]
    return {
        "model": model, "prompts": n_prompts, "steps": steps, "layers": len(stats.layers),
        "calibration_s": wall, "stats_MiB": stats_bytes / 2**20,
        "peak_extra_MiB": max(peak_rss - rss0, 0) / 2**20,
        "top_drift": [{"layer": n, "max_over_min": r} for r, n in drift[:10]],
        "mse": mse, "mean_groups": sum(n_groups) / len(n_groups), "threshold": threshold,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = []
    for model in args.models.split(","):
        r = run(model, args.prompts, args.steps, args.threshold)
        results.append(r)
        print(f"\n## {model}: {r['prompts']} prompts x {r['steps']} steps, {r['layers']} layers")
        print(f"calibration {r['calibration_s']:.1f} s, statistics {r['stats_MiB']:.1f} MiB, "
              f"peak extra memory {r['peak_extra_MiB']:.0f} MiB, mean timestep groups {r['mean_groups']:.1f}")
        print("| layer | max/min range across steps |\n|---|---|")
        for d in r["top_drift"]:
            print(f"| {d['layer']} | {d['max_over_min']:.2f} |")
        print("| bits | static MSE | per-timestep-group MSE | ratio of means | per-layer ratio (geo-mean) "
              "| layers improved |\n|---|---|---|---|---|---|")
        for bits, m in r["mse"].items():
            print(f"| {bits} | {m['static']:.3e} | {m['grouped']:.3e} | {m['grouped'] / m['static']:.3f} "
                  f"| {m['per_layer_geomean_ratio']:.3f} | {m['layers_improved']}/{m['layers']} |")
    if args.json:
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
