"""The ``diffq`` command line.

Exit codes: 0 success; 1 a diffq error (bad input, missing weights, corrupted file: one line on
stderr, the traceback only with ``--debug``); 2 command-line misuse (argparse: unknown or missing
options, counts that are not positive integers, option combinations that cannot work such as
``--preset mixed`` without ``--plan``); 130 interrupted. Arguments that name files or models are
checked before any model is loaded.
``--json`` prints one machine-readable JSON object on stdout instead of the human summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffq import __version__
from diffq.errors import DiffqError


class _Parser(argparse.ArgumentParser):
    """Misuse prints one line that names the fix (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"diffq: error: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(message: str) -> str:
    """Errors print on one line even when they quote user input or a parser message with line breaks."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (misuse otherwise, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = "positive integer" if minimum == 1 else f"integer >= {minimum}"
    return parse


POSITIVE, NON_NEGATIVE = _count(1), _count(0)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="digits-sd",
        help="digits-sd | digits-dit (shipped), tiny-<family> (random test pipelines), "
             "or a local diffusers folder / cached hub id (default: digits-sd)",
    )
    p.add_argument("--steps", type=POSITIVE, default=None,
                   help="denoising steps, >= 1 (default: the model's demo setting)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="w8a8", help="preset name (see `diffq presets`), default w8a8")
    p.add_argument("--recipe", action="append", default=[], metavar="YAML",
                   help="recipe file(s) stacked on top of the preset; later files win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override recipe fields, e.g. --set rank=16 --set weight.group_size=128")
    p.add_argument("--plan", default=None, help="BitPlan JSON for the mixed recipe")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffq",
        description="Quantize diffusers pipelines to 8/4 bits and measure quality, size and speed.",
        epilog="Start with `diffq demo`: it quantizes the shipped digits models with several presets "
               "and writes an HTML/Markdown report with image grids and metrics.",
    )
    parser.add_argument("--version", action="version", version=f"diffq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("presets", help="list the recipe presets")
    _add_common(p)

    p = sub.add_parser("demo", help="the main job: calibrate, quantize and compare presets on the shipped models")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--models", default="digits-sd,digits-dit", help="comma-separated models")
    p.add_argument("--recipes", default=None, help="comma-separated presets (default: a representative set)")
    p.add_argument("--quick", action="store_true", help="fewer prompts and steps (about a minute)")
    _add_common(p)

    p = sub.add_parser("calibrate", help="collect per-timestep activation statistics")
    _add_model(p)
    p.add_argument("--prompts", default="digits", help="prompt file (.txt/.csv/.jsonl) or a built-in set name")
    p.add_argument("--num-prompts", type=POSITIVE, default=32)
    p.add_argument("--images-per-prompt", type=POSITIVE, default=1)
    p.add_argument("--record-steps", type=POSITIVE, default=None, help="record only N uniformly spread steps")
    p.add_argument("--reservoir", type=NON_NEGATIVE, default=0,
                   help="also keep N real input rows per layer and step (uniform sample; default 0: statistics only)")
    p.add_argument("--attention-operands", action="store_true",
                   help="also record Q, K, V of every attention (operands of Q·K and P·V) per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="output .safetensors file, saved after every batch: re-run the same command to resume")
    _add_common(p)

    p = sub.add_parser("quantize", help="quantize a pipeline and save the checkpoint")
    _add_model(p)
    _add_recipe(p)
    p.add_argument("--calibration", default=None, help="stats file from `diffq calibrate`")
    p.add_argument("--prompts", default="digits", help="calibration prompts when no --calibration is given")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="layers quantized at once on CPU threads, one torch thread each (same result as 1 "
                        "worker with one torch thread; more memory); ignored on a GPU")
    p.add_argument("--show-recipe", action="store_true", help="print the resolved recipe and exit")
    _add_common(p)

    p = sub.add_parser("inspect", help="per-layer formats and sizes of a saved checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder written by `diffq quantize`")
    _add_common(p)

    p = sub.add_parser("eval", help="score a quantized checkpoint against full precision")
    _add_model(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--prompts", default="digits")
    p.add_argument("--num-prompts", type=POSITIVE, default=20)
    p.add_argument("--out", default="runs/eval")
    _add_common(p)

    p = sub.add_parser(
        "generate",
        help="generate a prompt set into a resumable image cache (data-parallel under `accelerate launch`)",
        epilog="Scale out: accelerate launch --multi_gpu --num_processes 4 -m diffq.cli generate --model M ...",
    )
    from diffq.apps.generate import add_arguments as _add_generate_args

    _add_generate_args(p)
    _add_common(p)

    p = sub.add_parser("bench", help="compare recipes side by side: images, metrics, latency, memory, report")
    _add_model(p)
    p.add_argument("--recipes", default="fp,w8a8,w4a8,w4a4,w4a4-svd",
                   help="comma-separated presets; fp = the model unquantized (reference)")
    p.add_argument("--prompts", default="digits")
    p.add_argument("--num-prompts", type=POSITIVE, default=20)
    p.add_argument("--images-per-prompt", type=POSITIVE, default=1)
    p.add_argument("--calib-prompts", type=POSITIVE, default=16)
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed repeats for latency")
    p.add_argument("--fid-images", type=NON_NEGATIVE, default=0, help="images for FID vs held-out real data (0: skip)")
    p.add_argument("--out", default="runs/bench")
    _add_common(p)
    return parser


def _emit(args, human: str, payload: dict) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(human)


def _recipe_from_args(args):
    from diffq.quantization.presets import get_preset, load_recipe_files

    recipe = get_preset(args.preset)
    if args.recipe:
        recipe = load_recipe_files(args.recipe, base=recipe)
    if args.set:
        recipe = recipe.with_overrides(list(args.set))
    return recipe


def cmd_presets(args) -> int:
    from diffq.quantization.presets import DESCRIPTIONS, PRESETS

    rows = {k: {"description": DESCRIPTIONS[k], "recipe": v.to_dict()} for k, v in PRESETS.items()}
    _emit(args, "\n".join(f"{k:12} {DESCRIPTIONS[k]}" for k in PRESETS), rows)
    return 0


def cmd_calibrate(args) -> int:
    from diffq.apps.models import check_model_name, load_model
    from diffq.calibration import calibrate
    from diffq.eval.prompts import prompt_list

    prompts = prompt_list(args.prompts, args.num_prompts)  # bad prompt arguments fail before the model loads
    check_model_name(args.model)
    pipe = load_model(args.model)
    stats = calibrate(
        pipe, prompts, num_inference_steps=args.steps if args.steps is not None else 20, guidance_scale=args.guidance, seed=args.seed,
        images_per_prompt=args.images_per_prompt, record_steps=args.record_steps, progress=not args.quiet,
        checkpoint=args.out, reservoir=args.reservoir, attention_operands=args.attention_operands,
        # --out doubles as the resume checkpoint
    )
    stats.save(args.out)
    _emit(args, f"calibration statistics of {len(stats.layers)} layers x {stats.num_steps} steps -> {args.out}",
          {"layers": len(stats.layers), "steps": stats.num_steps, "out": args.out})
    return 0


def cmd_quantize(args) -> int:
    from diffq.apps.models import check_model_name, load_model
    from diffq.calibration import CalibrationStats
    from diffq.checkpoint import save
    from diffq.eval.prompts import prompt_list
    from diffq.quantization.apply import quantize

    recipe = _recipe_from_args(args)
    if args.show_recipe:
        print(recipe.to_json())
        return 0
    if recipe.weight is None and args.plan is None and not Path(recipe.bit_plan or "").is_file():
        args.parser.error(f"--preset {args.preset} takes its per-layer formats from a bit plan: pass --plan PLAN.json "
                          f"(a BitPlan from diffq.allocate; notebooks/03_mixed_precision makes one)")
    check_model_name(args.model)
    stats = CalibrationStats.load(args.calibration) if args.calibration else None
    pipe = load_model(args.model)
    plan = None
    if args.plan:
        from diffq.mixed.plan import BitPlan

        plan = BitPlan.load(args.plan)
    prompts = prompt_list(args.prompts, 16) if recipe.needs_calibration and stats is None else None
    summary = quantize(pipe, recipe, calibration=stats, prompts=prompts, plan=plan, progress=not args.quiet,
                       workers=args.workers, calibrate_kwargs={"num_inference_steps": args.steps if args.steps is not None else 20})
    save(pipe, args.out)
    _emit(args, summary.table() + f"\nsaved -> {args.out}", summary.to_dict() | {"out": args.out})
    return 0


def cmd_inspect(args) -> int:
    from diffq.checkpoint import read_manifest

    m = read_manifest(args.checkpoint)
    lines = [f"{'layer':60} {'kind':6} {'weight':22} {'act':18} {'rank':>4} {'KiB':>9}"]
    total = 0
    rows = []
    for key, info in m["layers"].items():
        nbytes = sum(_nbytes(t) for t in info["tensors"].values())
        total += nbytes
        from diffq.formats import QuantSpec

        w = QuantSpec.from_dict(info["weight"]).describe()
        a = QuantSpec.from_dict(info["act"]["spec"]).describe() if info.get("act") else "-"
        rank = info["tensors"].get("lr_down", {}).get("shape", [0, 0])[1]
        rows.append({"layer": key, "kind": info["kind"], "weight": w, "act": a, "rank": rank, "bytes": nbytes})
        lines.append(f"{key[:60]:60} {info['kind']:6} {w:22} {a:18} {rank:4d} {nbytes / 1024:9.1f}")
    lines.append(f"{len(rows)} quantized layers, {total / 2**20:.2f} MiB, recipe {m['recipe']['name']}, "
                 f"family {m['family']}")
    attention = m.get("attention") if isinstance(m.get("attention"), dict) else {}
    lines += [f"attention {name[:50]:50} {fmt}" for name, fmt in attention.items()]
    _emit(args, "\n".join(lines), {"recipe": m["recipe"], "family": m["family"], "layers": rows, "bytes": total,
                                   "attention": attention})
    return 0


def _nbytes(meta: dict) -> int:
    import torch

    n = 1
    for s in meta["shape"]:
        n *= s
    return n * torch.empty(0, dtype=getattr(torch, meta["dtype"])).element_size()


def cmd_bench(args) -> int:
    from diffq.apps.bench import BenchConfig, run_bench
    from diffq.apps.models import check_model_name

    check_model_name(args.model)
    cfg = BenchConfig(
        model=args.model, recipes=[r.strip() for r in args.recipes.split(",") if r.strip()], prompts=args.prompts,
        num_prompts=args.num_prompts, images_per_prompt=args.images_per_prompt, steps=args.steps,
        guidance=args.guidance, calib_prompts=args.calib_prompts, repeats=args.repeats,
        fid_images=args.fid_images, out=args.out, progress=not args.quiet,
    )
    result = run_bench(cfg)
    _emit(args, result.text() + f"\nreport: {Path(args.out) / 'report.html'}", result.to_dict())
    return 0


def cmd_eval(args) -> int:
    from diffq.apps.bench import evaluate_checkpoint
    from diffq.apps.models import check_model_name
    from diffq.checkpoint import read_manifest

    read_manifest(args.checkpoint)  # a missing or damaged checkpoint fails before any model loads
    check_model_name(args.model)
    result = evaluate_checkpoint(
        args.model, args.checkpoint, prompts=args.prompts, num_prompts=args.num_prompts, steps=args.steps,
        guidance=args.guidance, out=args.out, progress=not args.quiet,
    )
    _emit(args, result.text(), result.to_dict())
    return 0


def cmd_demo(args) -> int:
    from diffq.apps.demo import run_demo

    out = run_demo(
        out=args.out, models=[m.strip() for m in args.models.split(",") if m.strip()],
        recipes=None if args.recipes is None else [r.strip() for r in args.recipes.split(",")],
        quick=args.quick, progress=not args.quiet,
    )
    _emit(args, f"demo report: {out / 'report.html'} (and report.md)", {"report": str(out / "report.html")})
    return 0


def cmd_generate(args) -> int:
    from diffq.apps.generate import config_from_args, run

    report = run(config_from_args(args))
    if args.json:  # one JSON line per process (several under `accelerate launch`)
        print(json.dumps(report.to_dict(), default=str))
    elif report.rank == 0:
        print(f"process {report.rank}/{report.world_size}: {report.generated} images generated, "
              f"{report.cached} already cached, {report.seconds:.1f} s; cache: {args.cache}")
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "presets": cmd_presets,
    "calibrate": cmd_calibrate,
    "quantize": cmd_quantize,
    "inspect": cmd_inspect,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        import os

        os.environ["DIFFQ_NO_PROGRESS"] = "1"
    try:
        return COMMANDS[args.command](args)
    except DiffqError as e:
        if args.debug:
            raise
        print(f"diffq: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffq: interrupted; finished work is kept (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
