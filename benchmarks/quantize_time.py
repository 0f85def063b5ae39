"""Quantization time per layer kind, on an SD1.5-size UNet and on a FLUX-width slice.

Both models have random weights (time depends on shapes and formats, not on values):

* ``sd15``: the SD1.5 UNet of :mod:`benchmarks.sd15_size` (real config, 859.5M parameters),
  calibrated on 1 prompt x 2 steps at 256x256;
* ``flux-slice``: ``FluxTransformer2DModel`` from ``model_configs.FLUX_DIT`` (width 3072, 24 heads of
  128, MLP 12288) cut to 1 double-stream + 2 single-stream blocks, inside the tiny test FLUX pipeline
  (its small text encoders only change the input widths of the 16-bit embedders), calibrated on
  1 prompt x 2 steps at 128x128 (256 image + 512 text tokens per step).

Calibration keeps a reservoir of input rows (``--reservoir`` per layer and step) for the recipes that
need samples (GPTQ, the smoothing-strength search). Every ``build_layer`` call is timed (wall and
process CPU time) and grouped by layer kind: role and weight shape.

    python -m benchmarks.quantize_time --model flux-slice --recipes w4a4-svd --json out.json
"""

from __future__ import annotations

import argparse
import copy
import re
import threading
import time
from collections import defaultdict

import torch

import diffq
import diffq.quantization.build as build_mod
from benchmarks.model_configs import FLUX_DIT
from diffq.pipelines.adapters import adapter_for


def flux_slice_pipeline(dtype: torch.dtype = torch.bfloat16):
    """The tiny FLUX test pipeline with a FLUX-width transformer of 1 double + 2 single blocks."""
    from diffusers import FluxTransformer2DModel

    from diffq.pipelines.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    cfg = dict(FLUX_DIT, num_layers=1, num_single_layers=2, in_channels=32, joint_attention_dim=32,
               pooled_projection_dim=32)
    torch.manual_seed(0)
    pipe.register_modules(transformer=FluxTransformer2DModel(**cfg).eval())
    return pipe.to(dtype)


def build_model(name: str):
    """(pipeline, calibrate kwargs) of a benchmark model."""
    if name == "sd15":
        from benchmarks.sd15_size import sd15_size_pipeline

        return sd15_size_pipeline(), {"num_inference_steps": 2, "height": 256, "width": 256}
    if name == "flux-slice":
        return flux_slice_pipeline(), {"num_inference_steps": 2, "height": 128, "width": 128}
    raise SystemExit(f"unknown model {name!r}; use sd15 or flux-slice")


def _kind(choice) -> str:
    w = choice.module.weight
    shape = "x".join(str(s) for s in w.shape[:2]) + ("" if w.dim() == 2 else f"/k{w.shape[-1]}")
    return f"{choice.role} {shape}"


def timed_quantize(pipe, recipe, stats, workers: int = 1) -> tuple[float, float, dict[str, dict]]:
    """Quantize ``pipe`` with ``recipe`` on ``workers`` threads; (wall s, process CPU s, per layer kind:
    count, wall, cpu). A layer's CPU time is the process's during its build, or with several workers
    its own thread's (each worker runs its ops on itself); with several workers the per-kind wall times
    overlap (their sum exceeds the wall time)."""
    per_kind: dict[str, dict] = defaultdict(lambda: {"layers": 0, "wall_s": 0.0, "cpu_s": 0.0})
    original = build_mod.build_layer
    clock = time.thread_time if workers > 1 else time.process_time
    lock = threading.Lock()

    def timed(choice, *a, **kw):
        t0, c0 = time.perf_counter(), clock()
        out = original(choice, *a, **kw)
        wall, cpu = time.perf_counter() - t0, clock() - c0
        with lock:
            row = per_kind[_kind(choice)]
            row["layers"] += 1
            row["wall_s"] += wall
            row["cpu_s"] += cpu
        return out

    build_mod.build_layer = timed
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        diffq.quantize(pipe, recipe, calibration=stats, progress=False, workers=workers)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        build_mod.build_layer = original
    rounded = {k: {"layers": v["layers"], "wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2)}
               for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1]["wall_s"])}
    return wall, cpu, rounded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-slice", choices=("flux-slice", "sd15"))
    ap.add_argument("--recipes", default="w4a4-svd",
                    help="comma-separated presets; 'name:key=v;key=v' adds overrides")
    ap.add_argument("--reservoir", type=int, default=256, help="input rows kept per layer and step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="layers quantized at once (diffq.quantize(workers=))")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, calib_kw = build_model(args.model)
    den = adapter_for(base).denoiser(base)
    n_params = sum(p.numel() for p in den.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M denoiser parameters", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = diffq.calibrate(base, ["a photo"], progress=False, reservoir=args.reservoir, **calib_kw)
    calib = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    print(f"calibration (1 prompt, reservoir {args.reservoir}): {calib}", flush=True)
    rows = []
    for spec in re.split(r",(?![^(\[]*[)\]])", args.recipes):  # commas inside (...) / [...] belong to a value
        name, _, over = spec.partition(":")
        recipe = diffq.get_preset(name)
        if over:
            recipe = recipe.with_overrides(over.split(";"))
        pipe = copy.deepcopy(base)
        wall, cpu, kinds = timed_quantize(pipe, recipe, stats, args.workers)
        rows.append({"recipe": spec, "quantize_wall_s": round(wall, 1), "quantize_cpu_s": round(cpu, 1),
                     "layers_quantized": sum(k["layers"] for k in kinds.values()), "per_kind": kinds})
        print({k: v for k, v in rows[-1].items() if k != "per_kind"}, flush=True)
        for k, v in kinds.items():
            print(f"   {k:40s} {v}", flush=True)
        del pipe
    if args.json:
        from diffq.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "n_params": n_params, "threads": args.threads,
                                      "workers": args.workers,
                                      "reservoir": args.reservoir, "calibration": calib, "rows": rows})


if __name__ == "__main__":
    main()
