"""Block-streamed quantization split over processes by real launchers (``accelerate launch``, ``torchrun``).

    python -m benchmarks.launcher_split [--out DIR]

The tiny FLUX test pipeline (:func:`diffq.pipelines.testing.tiny_pipeline`), calibrated once (1 prompt
x 2 steps, 16 input rows per layer and step), ``w4a4-svd``. Reference: one process quantizes the
in-memory pipeline and generates images. Then each launcher command starts the worker
(``python -m benchmarks.launcher_split _worker RUN_DIR``): the transformer built on ``meta``, its weights
streamed from its safetensors file, all processes on one ``work_dir``; the process with ``RANK`` 0
(or the only one) saves the standalone checkpoint. Recorded per launcher: the ``RANK`` /
``WORLD_SIZE`` each started process saw, which process quantized each block (the block files'
``rank``), and whether the checkpoint, loaded with ``diffq.load_pipeline``, gives bit-identical
images. Writes ``DIR/launcher_split.json`` and ``benchmarks/results/launcher_split.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FAMILY, PRESET, STEPS = "flux", "w4a4-svd", 2
BIN = Path(sys.executable).parent
LAUNCHERS = {
    "accelerate --cpu": [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"],
    "accelerate --multi_gpu": [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"],
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
}


def _images(pipe) -> torch.Tensor:
    from diffq.pipelines.testing import tiny_call_kwargs

    kw = {**tiny_call_kwargs(FAMILY), "num_inference_steps": STEPS}
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


def prepare(work: Path) -> None:
    from safetensors.torch import save_file

    import diffq
    from diffq.pipelines.testing import tiny_pipeline

    pipe = tiny_pipeline(FAMILY)
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=STEPS, progress=False, reservoir=16)
    stats.save(work / "stats.safetensors")
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(work / "transformer.safetensors"))
    ref = copy.deepcopy(pipe)
    diffq.quantize(ref, PRESET, calibration=stats, progress=False)
    save_file({"images": _images(ref).contiguous()}, str(work / "images_in_memory.safetensors"))


def worker(work: Path, run: Path) -> None:
    """One launched process: streamed quantization on the shared work_dir; rank 0 saves the checkpoint."""
    from diffusers import FluxTransformer2DModel

    import diffq
    from diffq.calibration import CalibrationStats
    from diffq.pipelines.testing import tiny_pipeline

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    pipe = tiny_pipeline(FAMILY)
    with torch.device("meta"):
        pipe.transformer = FluxTransformer2DModel.from_config(pipe.transformer.config).eval()
    stats = CalibrationStats.load(work / "stats.safetensors")
    diffq.quantize(pipe, PRESET, calibration=stats, progress=False, work_dir=run / "blocks",
                   dense_source=work / "transformer.safetensors")
    if env["RANK"] in (None, "0"):
        diffq.save(pipe, run / "ckpt")
    (run / f"env-{os.getpid()}.json").write_text(json.dumps(env))


def check(work: Path, run: Path) -> dict:
    from safetensors.torch import load_file

    import diffq
    from diffq.pipelines.testing import tiny_pipeline
    from diffq.quantization.streaming import block_seconds

    base = tiny_pipeline(FAMILY)
    loaded = diffq.load_pipeline(run / "ckpt", base)
    loaded.default_sample_size = base.default_sample_size
    same = torch.equal(_images(loaded), load_file(str(work / "images_in_memory.safetensors"))["images"])
    return {"processes": [json.loads(p.read_text()) for p in sorted(run.glob("env-*.json"))],
            "block_ranks": [s["rank"] for s in block_seconds(run / "blocks").values()],
            "images_identical_to_in_memory": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="run", choices=["run", "_worker"])
    ap.add_argument("--out", default="/tmp/diffq_launcher_split")
    ap.add_argument("run", nargs="?", default=None, help="(_worker) its run folder; positional: torchrun takes "
                    "--run... for its own --run-path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out)
    if args.what == "_worker":
        worker(work, Path(args.run))
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prepare(work)
    result = {"family": FAMILY, "preset": PRESET, "machine": "shared 2-core CPU, no GPU, 1 torch thread per process",
              "launchers": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in LAUNCHERS.items():
        run = work / name.replace(" ", "_").replace("-", "")
        run.mkdir()
        cmd = [*launcher, "-m", "benchmarks.launcher_split", "_worker", str(run), "--out", str(work)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=1800)
        entry = {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
                 "returncode": proc.returncode}
        if proc.returncode == 0:
            entry.update(check(work, run))
        else:
            entry["stderr"] = proc.stderr[-2000:]
        result["launchers"][name] = entry
        print(json.dumps({name: entry}), flush=True)
    for path in (work / "launcher_split.json", RESULTS / "launcher_split.json"):
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
