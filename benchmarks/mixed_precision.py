"""Metric-decoupled sensitivity + integer-programming bit allocation on the demo models.

    python -m benchmarks.mixed_precision [--models digits-sd,digits-dit] [--candidates w8a8,w4a8,w3a8]
        [--sens-prompts 50] [--eval-images 500] [--groups block_role|block|none] [--extra-budgets 4.5]
        [--judges all|conditioning]

Per model (digits-dit is skipped with a note when its assets are missing):
1. ``diffq.sensitivity`` with candidates fp16 + ``--candidates`` on ``--sens-prompts`` prompts (timed);
2. budgets: the stored bits per weight of the uniform ``--baseline`` recipe over the analysed
   layers, with its skip rules (embeddings / adaLN kept dense) and without them, plus
   ``--extra-budgets``;
3. ``diffq.allocate`` at each budget with the decoupled judges (quality and alignment, each
   normalised on its own, judging every layer; ``--judges conditioning`` restricts alignment to
   cross-attention / conditioning layers) and with quality alone;
4. fp, both uniform recipes and all plans generate ``--eval-images`` images on *held-out* seeds
   (1000+i); each is scored against the fp images: SSIM, PSNR, CLIP score (digits-clip), digit
   accuracy (digits-clip zero-shot vs the prompt's digit) and
   ``combined error = (1 - SSIM) + (CLIP_fp - CLIP) / CLIP_fp`` (lower is better); the decoupled
   plan's CLIP score is compared with the quality-only plan's of the same budget image by image
   (paired difference and its standard error).
Prints a table and writes ``benchmarks/results/mixed_precision<tag>.json`` plus PNG plots.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = ("w8a8", "w4a8", "w3a8")


def _pipe(model: str):
    from diffq.pipelines.demo_models import demo_pipeline

    return demo_pipeline(model)


def contrastive_digit_scorer(clip):
    """Alignment as "how surely does the judge read the prompted digit": 100 x the zero-shot
    probability of the prompt's digit among the ten "the digit k" captions, per image [N].

    Why: the plain CLIP score of digits-clip barely moves under quantization (uniform w4a8 even
    raises it), so as a sensitivity signal it is mostly noise; a contrastive score reacts as soon as
    an image drifts towards another digit, which is the text-alignment failure on this model."""
    from diffq.pipelines.demo_models import digit_class_from_prompt

    texts = clip.text_embeds([f"the digit {k}" for k in range(10)])
    scale = float(clip.model.logit_scale.exp())

    def score(images, prompts):
        labels = torch.tensor([digit_class_from_prompt(p) for p in prompts])
        probs = (scale * clip.image_embeds(images) @ texts.T).softmax(-1).cpu()
        return 100 * probs[torch.arange(len(labels)), labels]

    score.name = "digits_contrastive"
    return score


def evaluate(images: torch.Tensor, ref: torch.Tensor, prompts: list[str], clip, ref_scores: torch.Tensor) -> dict:
    """Scores vs the fp images; ``clip_delta_se`` is the standard error of the paired per-image CLIP
    change, the yardstick for whether two configs' CLIP scores really differ."""
    from diffq.eval import clip_score_digits, psnr, ssim
    from diffq.pipelines.demo_models import digit_class_from_prompt

    per = clip_score_digits(clip, images, prompts)
    cs, ref_clip = float(per.mean()), float(ref_scores.mean())
    delta = per - ref_scores
    target = torch.tensor([digit_class_from_prompt(p) for p in prompts])
    acc = float((clip.classify(images) == target).float().mean())
    s = float(ssim(images, ref).mean())
    return {
        "per_image_clip": per,
        "ssim": s, "psnr": float(psnr(images, ref).mean()), "clip_score": cs, "accuracy": acc,
        "combined_error": (1 - s) + (ref_clip - cs) / ref_clip,
        "clip_delta_se": float(delta.std() / len(delta) ** 0.5) if len(delta) > 1 else 0.0,
    }


def run_model(model: str, args, clip) -> dict:
    from diffq import quantize
    from diffq.eval import digits_scorer, image_distance
    from diffq.eval.prompts import prompt_list
    from diffq.generation import generate
    from diffq.mixed.allocate import allocate, uniform_plan
    from diffq.mixed.measure import sensitivity
    from diffq.mixed.plots import plot_plan, plot_sensitivity
    from diffq.mixed.table import CONDITIONING_JUDGES
    from diffq.pipelines.adapters import adapter_for

    gen = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "batch_size": 50}
    sens_prompts = prompt_list("digits", args.sens_prompts)
    eval_prompts = prompt_list("digits", args.eval_images)
    eval_seeds = [1000 + i for i in range(len(eval_prompts))]
    groups = None if args.groups == "none" else args.groups

    pipe = _pipe(model)
    t0, c0 = time.perf_counter(), time.process_time()
    table = sensitivity(
        pipe, prompts=sens_prompts, candidates=tuple(args.candidates.split(",")), num_inference_steps=args.steps,
        guidance_scale=args.guidance, groups=groups, quality=image_distance("ssim"),
        scorer=digits_scorer(clip).per_image if args.alignment == "clip" else contrastive_digit_scorer(clip),
        cache_dir=RESULTS / "cache" / "sensitivity" / model, progress=not args.quiet,
    )
    sens_s, sens_cpu = time.perf_counter() - t0, time.process_time() - c0
    table.save(RESULTS / f"mixed_precision{args.tag}_{model}_table.json")
    plot_sensitivity(table, RESULTS / f"mixed_precision{args.tag}_{model}_sensitivity.png")

    kind = args.budget_kind
    uni = uniform_plan(table, adapter_for(pipe).denoiser(pipe), args.baseline)
    uni_all = uniform_plan(table, adapter_for(pipe).denoiser(pipe), args.baseline, skip_rules=False)
    budgets = [uni.realised[kind], uni_all.realised[kind], *(args.extra_budgets if kind == "avg_bits" else [])]
    plans = {f"uniform {args.baseline}": uni, f"uniform {args.baseline}, no skips": uni_all}
    t1 = time.perf_counter()
    decoupled = CONDITIONING_JUDGES if args.judges == "conditioning" else {"*": ("quality", "alignment")}
    for b in budgets:
        tag = f"@{b:.3f}" if kind == "avg_bits" else f"@{b:.3g} bitops"
        plans[f"mixed decoupled {tag}"] = allocate(table, budget=b, budget_kind=kind, judges=decoupled)
        plans[f"mixed quality-only {tag}"] = allocate(table, budget=b, budget_kind=kind, judges={"*": ("quality",)})
    alloc_s = (time.perf_counter() - t1) / (2 * len(budgets))
    main = next(k for k in plans if k.startswith("mixed decoupled"))
    plans[main].save(RESULTS / f"mixed_precision{args.tag}_{model}_plan.json")
    plot_plan(plans[main], table, RESULTS / f"mixed_precision{args.tag}_{model}_plan.png")

    ref = generate(pipe, eval_prompts, eval_seeds, **gen)
    from diffq.eval import clip_score_digits

    ref_scores = clip_score_digits(clip, ref, eval_prompts)
    rows = {"fp32": {**evaluate(ref, ref, eval_prompts, clip, ref_scores), "avg_bits": 32.0, "nominal_bits": 32.0}}
    for name, plan in plans.items():
        q = _pipe(model)
        quantize(q, "mixed", plan=plan, progress=False)
        imgs = generate(q, eval_prompts, eval_seeds, **gen)
        rows[name] = {**evaluate(imgs, ref, eval_prompts, clip, ref_scores), "avg_bits": plan.realised["avg_bits"],
                      "nominal_bits": plan.realised["nominal_bits"]}
    # The question "does the decoupled plan keep more text alignment than the quality-only plan" is
    # answered by the paired per-image CLIP difference of the two plans (same seeds), with its SE.
    for name, row in rows.items():
        other = rows.get(name.replace("decoupled", "quality-only"))
        if name.startswith("mixed decoupled") and other is not None:
            d = row["per_image_clip"] - other["per_image_clip"]
            row["clip_vs_quality_only"] = float(d.mean())
            row["clip_vs_quality_only_se"] = float(d.std() / len(d) ** 0.5)
    for r in rows.values():
        r.pop("per_image_clip")
    return {
        "model": model, "sensitivity_seconds": sens_s, "sensitivity_cpu_seconds": sens_cpu, "sensitivity_evaluations": table.meta["evaluations"],
        "sensitivity_computed": table.meta["computed"], "units": len(table.units), "layers": len(table.layers),
        "allocation_seconds": alloc_s, "budget_avg_bits": budgets[0], "budgets": budgets, "rows": rows,
        "plan_summary": plans[main].summary(),
        "plans": {k: {"units": v.units or v.assignments, "objective": v.objective} for k, v in plans.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--sens-prompts", type=int, default=50)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated presets to choose from")
    ap.add_argument("--baseline", default="w4a8", help="uniform preset whose cost is the budget")
    ap.add_argument("--alignment", default="clip", choices=["clip", "contrastive"],
                    help="alignment metric of the sensitivity analysis (evaluation always reports CLIP score)")
    ap.add_argument("--judges", default="all", choices=["all", "conditioning"],
                    help="decoupled plan: alignment judges every layer (the default judges) or only "
                         "cross-attention / conditioning layers; quality judges every layer either way")
    ap.add_argument("--budget-kind", default="avg_bits", choices=["avg_bits", "bitops"])
    ap.add_argument("--groups", default="block_role", choices=["none", "block", "block_role"])
    ap.add_argument("--extra-budgets", type=float, nargs="*", default=[4.5])
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. _bitops")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/mixed_precision<tag>.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny models on a shared CPU)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.json = args.json or str(RESULTS / f"mixed_precision{args.tag}.json")

    from diffq.errors import MissingWeightsError
    from diffq.io import write_json_atomic
    from diffq.pipelines.demo_models import digits_clip

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    clip = digits_clip()
    out = {"command": "python -m benchmarks.mixed_precision " + " ".join(
        f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
        for k, v in vars(args).items() if k not in ("json", "quiet")),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "models": [], "skipped": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            t = time.perf_counter()
            res = run_model(model, args, clip)
            res["total_seconds"] = time.perf_counter() - t
        except MissingWeightsError as e:
            print(f"[skip] {model}: {e}")
            out["skipped"][model] = str(e)
            continue
        out["models"].append(res)
        print(f"\n== {model}: {res['layers']} layers in {res['units']} units, {res['sensitivity_evaluations']} "
              f"generations, sensitivity {res['sensitivity_seconds']:.0f}s wall / "
              f"{res['sensitivity_cpu_seconds']:.0f}s CPU ({res['sensitivity_computed']} computed), "
              f"allocation {res['allocation_seconds'] * 1000:.0f} ms/plan, total {res['total_seconds']:.0f}s")
        print(f"{'config':34} {'avg bits':>8} {'nominal':>7} {'SSIM':>6} {'PSNR':>6} {'CLIP':>6} {'acc':>6} {'comb.err':>8} {'CLIP-SE':>7}")
        for name, r in res["rows"].items():
            print(f"{name:34} {r['avg_bits']:8.3f} {r['nominal_bits']:7.2f} {r['ssim']:6.3f} {r['psnr']:6.2f} "
                  f"{r['clip_score']:6.2f} {r['accuracy']:6.3f} {r['combined_error']:8.4f} "
                  f"{r['clip_delta_se']:7.3f}")
        for name, r in res["rows"].items():
            if "clip_vs_quality_only" in r:
                print(f"{name}: CLIP vs the quality-only plan {r['clip_vs_quality_only']:+.3f} "
                      f"(paired SE {r['clip_vs_quality_only_se']:.3f})")
        print(res["plan_summary"])
    write_json_atomic(args.json, out)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
