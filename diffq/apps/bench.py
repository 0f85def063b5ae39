"""``diffq bench``: recipes side by side on one model, in one run.

For each recipe: quantize a copy of the full-precision pipeline (calibrating once, shared by all
recipes), generate the same prompts with the same seeds, and measure
- closeness to full precision: PSNR, SSIM (and LPIPS when its weights are available offline);
- absolute quality: CLIP score and FID against real images, with the model's judge network
  (digits-clip for the shipped digits models);
- cost: denoiser bytes, size ratio, end-to-end and per-step latency (median and spread of
  several timed repeats after a warm-up), peak memory.
Writes ``grid.png`` (rows prompts, columns recipes), ``metrics.json``, a quality-vs-size plot and
``report.md`` / ``report.html`` into the output folder.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffq.apps.models import load_model
from diffq.calibration import calibrate
from diffq.errors import DiffqError, MissingWeightsError
from diffq.eval.prompts import prompt_list
from diffq.generation import generate
from diffq.io import write_json_atomic
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.apply import quantize
from diffq.quantization.presets import get_preset
from diffq.quantization.state import require_state
from diffq.sizes import module_bytes
from diffq.timing import peak_memory_bytes, reset_peak, time_call

REFERENCE = ("fp16", "fp32", "bf16", "fp")


@dataclass
class BenchConfig:
    model: str = "digits-sd"
    recipes: list[str] = field(default_factory=lambda: ["fp16", "w8a8", "w4a4", "w4a4-svd"])
    prompts: str = "digits"
    num_prompts: int = 20
    images_per_prompt: int = 1
    steps: int | None = None
    guidance: float | None = None
    calib_prompts: int = 16
    calib_steps: int | None = None
    reservoir: int = 256  # input rows per layer and step kept when a recipe needs them (GPTQ, α search)
    repeats: int = 3
    fid_images: int = 0
    grid_rows: int = 8
    batch_size: int = 25
    out: str = "runs/bench"
    progress: bool = True
    seed: int = 0


@dataclass
class RecipeResult:
    recipe: str
    psnr: float | None = None
    ssim: float | None = None
    lpips: float | None = None
    clip_score: float | None = None
    accuracy: float | None = None
    fid: float | None = None
    denoiser_bytes: int = 0
    size_ratio: float = 1.0
    latency_s: float | None = None
    latency_spread_s: float | None = None
    step_ms: float | None = None
    peak_memory_bytes: int | None = None
    quantize_s: float | None = None  # calibration included when the recipe needs it (shared: counted in each)
    calibration_s: float | None = None
    layers_quantized: int | None = None
    layers_total: int | None = None


@dataclass
class BenchResult:
    model: str
    config: dict
    rows: list[RecipeResult]
    notes: list[str] = field(default_factory=list)
    out: str = ""

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "rows": [asdict(r) for r in self.rows],
                "notes": self.notes, "out": self.out}

    def table_rows(self) -> list[dict]:
        """One row per recipe; metric columns nothing measured (all "-") are left out (the notes say why)."""
        repeats = self.config.get("repeats", 0)
        out = []
        for r in self.rows:
            out.append({
                "recipe": r.recipe,
                "PSNR vs FP (dB)": _fmt(r.psnr, 2),
                "SSIM vs FP": _fmt(r.ssim, 4),
                "LPIPS vs FP": _fmt(r.lpips, 4),
                "CLIP score": _fmt(r.clip_score, 2),
                "digit accuracy": _fmt(r.accuracy, 3),
                "FID": _fmt(r.fid, 2),
                "denoiser MiB (16-bit floats)": f"{r.denoiser_bytes / 2**20:.3f}",
                "size vs bf16": f"{r.size_ratio:.2f}x",
                "layers quantized": "-" if r.layers_quantized is None else f"{r.layers_quantized}/{r.layers_total}",
                "quantize s (incl. calibration)": _fmt(r.quantize_s, 1),
                _latency_header(repeats): _latency(r, repeats),
                "ms/step": _fmt(r.step_ms, 1),
            })
        # the reference's own PSNR/SSIM/LPIPS (inf/1/0) say nothing: a column stays if a quantized row has a value
        measured = [row for row, r in zip(out, self.rows) if r.recipe not in REFERENCE] or out
        keep = [c for c in (out[0] if out else {}) if c == "recipe" or any(row[c] != "-" for row in measured)]
        return [{c: row[c] for c in keep} for row in out]

    def text(self) -> str:
        rows = self.table_rows()
        if not rows:
            return "(no results)"
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
        return f"{self.model}\n" + "\n".join(lines) + ("\n" + "\n".join(self.notes) if self.notes else "")


def _latency_header(repeats: int) -> str:
    return "latency s (median ± half spread)" if repeats > 1 else "latency s (one run)"


def _latency(r: RecipeResult, repeats: int) -> str:
    if r.latency_s is None:
        return "-"
    if repeats > 1 and r.latency_spread_s is not None:
        return f"{r.latency_s:.3f} ± {r.latency_spread_s / 2:.3f}"
    return f"{r.latency_s:.3f}"


def _fmt(v: float | None, nd: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


class Judge:
    """The networks that score absolute quality for one model: CLIP score, class accuracy, FID."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.clip = None
        self.real = None
        if model.startswith("digits-"):
            from diffq.pipelines.demo_models import digits_clip, heldout_digits

            self.clip = digits_clip()
            self.real = heldout_digits()

    @property
    def available(self) -> bool:
        return self.clip is not None

    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from diffq.eval import clip_score_digits

        return clip_score_digits(self.clip, images, prompts)

    def accuracy(self, images: torch.Tensor, prompts: list[str]) -> float | None:
        from diffq.pipelines.demo_models import digit_class_from_prompt

        try:
            labels = torch.tensor([digit_class_from_prompt(p) for p in prompts])
        except DiffqError:
            return None
        return float((self.clip.classify(images) == labels).float().mean())

    def fid(self, images: torch.Tensor) -> float:
        from diffq.eval import fid_from_features

        n = min(len(images), len(self.real))
        real = self.real.images[:n]
        return fid_from_features(self.clip.image_features(real).double(), self.clip.image_features(images).double())


def _paired(images: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float | None]:
    from diffq.eval import lpips, psnr, ssim

    p = float(psnr(images, ref).clamp(max=100).mean())
    s = float(ssim(images, ref).mean())
    try:
        lp = float(lpips(images, ref).mean())
    except MissingWeightsError:
        lp = None
    return p, s, lp


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the comparison and write the report into ``cfg.out``; returns the numbers."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.recipes:
        raise DiffqError("no recipes to compare; pass e.g. --recipes fp16,w8a8,w4a4-svd")
    for r in cfg.recipes:
        if r not in REFERENCE:
            get_preset(r)  # unknown names fail before any work
    pipe = load_model(cfg.model)
    steps = cfg.steps or _default_steps(cfg.model)
    cuda = next(adapter_for(pipe).denoiser(pipe).parameters()).is_cuda
    base = prompt_list(cfg.prompts, cfg.num_prompts)
    prompts = [p for p in base for _ in range(cfg.images_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(prompts))]
    guidance = cfg.guidance if cfg.guidance is not None else _default_guidance(cfg.model)
    gen_kw = {"num_inference_steps": steps, "guidance_scale": guidance, "batch_size": cfg.batch_size}
    judge = Judge(cfg.model)
    notes = []
    ref = generate(pipe, prompts, seeds, progress=cfg.progress, desc="generate fp", **gen_kw)
    fid_n = cfg.fid_images
    stats = None
    calib_s = 0.0
    quantized = [get_preset(r) for r in cfg.recipes if r not in REFERENCE]
    if any(r.needs_calibration for r in quantized):
        calib = prompt_list(cfg.prompts, cfg.calib_prompts)
        rows = cfg.reservoir if any(r.needs_reservoir for r in quantized) else 0
        t0 = time.perf_counter()
        stats = calibrate(pipe, calib, num_inference_steps=cfg.calib_steps or steps,
                          guidance_scale=guidance, seed=10_000, progress=cfg.progress, reservoir=rows)
        calib_s = time.perf_counter() - t0
    rows, images_by_recipe = [], {}
    dense_bytes = module_bytes(adapter_for(pipe).denoiser(pipe), float_bits=16)
    for name in cfg.recipes:
        p = pipe if name in REFERENCE else copy.deepcopy(pipe)
        res = RecipeResult(name)
        if name not in REFERENCE:
            t0 = time.perf_counter()
            summary = quantize(p, name, calibration=stats, progress=False)
            res.calibration_s = calib_s if get_preset(name).needs_calibration else 0.0
            res.quantize_s = time.perf_counter() - t0 + res.calibration_s
            res.layers_quantized, res.layers_total = len(summary.quantized), len(summary.layers)
        den = adapter_for(p).denoiser(p)
        res.denoiser_bytes = module_bytes(den, float_bits=16)
        res.size_ratio = dense_bytes / max(res.denoiser_bytes, 1)
        imgs = ref if name in REFERENCE else generate(p, prompts, seeds, progress=cfg.progress,
                                                      desc=f"generate {name}", **gen_kw)
        images_by_recipe[name] = imgs
        res.psnr, res.ssim, res.lpips = _paired(imgs, ref) if name not in REFERENCE else (float("inf"), 1.0, 0.0)
        if judge.available:
            res.clip_score = float(judge.clip_score(imgs, prompts).mean())
            res.accuracy = judge.accuracy(imgs, prompts)
            if fid_n:
                fid_prompts = prompt_list(cfg.prompts, fid_n)
                fake = imgs if fid_n <= len(imgs) else generate(
                    p, fid_prompts, list(range(50_000, 50_000 + fid_n)), desc=f"fid {name}", **gen_kw)
                res.fid = judge.fid(fake[:fid_n])
        reset_peak(cuda)
        tm = time_call(lambda p=p: generate(p, prompts[:1], seeds[:1], **gen_kw), repeats=cfg.repeats, cuda=cuda)
        res.latency_s, res.latency_spread_s = tm.median_s, tm.spread_s
        res.step_ms = tm.median_s / steps * 1000
        res.peak_memory_bytes = peak_memory_bytes(cuda)
        rows.append(res)
        if p is not pipe:
            del p
    if not cuda:
        notes.append("Ran on CPU: quantized layers use the torch reference path (dequantize + dense op), "
                     "so latency shows no speed-up here; size ratios are what the formats buy.")
    notes += _not_measured(rows, fid_n, judge.available)
    result = BenchResult(cfg.model, asdict(cfg) | {"steps": steps, "guidance": guidance}, rows, notes, str(out))
    write_bench_outputs(result, images_by_recipe, prompts, out, cfg.grid_rows)
    return result


def _not_measured(rows: list[RecipeResult], fid_images: int, judged: bool) -> list[str]:
    """Notes for the metric columns the table leaves out because nothing was measured."""
    quantized = [r for r in rows if r.recipe not in REFERENCE]
    notes = []
    if quantized and all(r.lpips is None for r in quantized):
        notes.append("LPIPS not measured: its weights are not available offline.")
    if not fid_images:
        notes.append("FID not measured (`--fid-images 0`); at a few hundred images it separates nothing anyway.")
    elif not judged:
        notes.append("FID and CLIP score not measured: this model has no judge network (digits models only).")
    return notes


def _default_guidance(model: str) -> float | None:
    """The demo models were trained and measured at guidance 5 (scripts/eval_demo_models.py);
    other models keep their pipeline's default."""
    return 5.0 if model.startswith("digits-") else None


def _default_steps(model: str) -> int:
    return 20 if model.startswith("digits-") else 4 if model.startswith("tiny-") else 30


def write_bench_outputs(result: BenchResult, images: dict[str, torch.Tensor], prompts: list[str], out: Path,
                        grid_rows: int) -> None:
    from diffq.eval import image_grid, plot_quality_vs_size, write_report

    n = min(grid_rows, len(prompts))
    recipes = list(images)
    grid = image_grid([[images[r][i] for r in recipes] for i in range(n)], row_labels=prompts[:n],
                      col_labels=recipes)
    from diffq.io import atomic_path

    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    write_json_atomic(out / "metrics.json", result.to_dict())
    # the reference has PSNR = inf against itself: the plot draws it as a reference line, not a point
    plot_rows = [{"recipe": r.recipe, "size_ratio": r.size_ratio,
                  "psnr": math.inf if r.recipe in REFERENCE else r.psnr}
                 for r in result.rows if r.psnr is not None or r.recipe in REFERENCE]
    plot_quality_vs_size(plot_rows, x="size_ratio", y="psnr", out_png=out / "quality_vs_size.png",
                         title=f"{result.model}: quality vs size (up and right is better)")
    write_report(out, title=f"diffq bench: {result.model}", grid_png="grid.png",
                 metrics_table=result.table_rows(), plots=["quality_vs_size.png"], notes=result.notes)


def evaluate_checkpoint(model: str, checkpoint: str, *, prompts: str = "digits", num_prompts: int = 20,
                        steps: int | None = None, guidance: float | None = None, out: str = "runs/eval",
                        progress: bool = True) -> BenchResult:
    """Score a saved checkpoint against the full-precision model it was made from."""
    from diffq.checkpoint import load

    base = load_model(model)
    q = load(checkpoint, copy.deepcopy(base))  # one load: the quantized copy starts from the same weights
    steps = steps or _default_steps(model)
    ps = prompt_list(prompts, num_prompts)
    seeds = list(range(len(ps)))
    kw = {"num_inference_steps": steps, "guidance_scale": guidance}
    ref = generate(base, ps, seeds, progress=progress, desc="generate fp", **kw)
    imgs = generate(q, ps, seeds, progress=progress, desc="generate quantized", **kw)
    judge = Judge(model)
    name = require_state(adapter_for(q).denoiser(q), 'diffq eval').recipe.name
    rows = []
    for label, im, pipe in (("fp", ref, base), (name, imgs, q)):
        r = RecipeResult(label)
        if label != "fp":
            r.psnr, r.ssim, r.lpips = _paired(im, ref)
        if judge.available:
            r.clip_score = float(judge.clip_score(im, ps).mean())
            r.accuracy = judge.accuracy(im, ps)
        r.denoiser_bytes = module_bytes(adapter_for(pipe).denoiser(pipe), float_bits=16)
        rows.append(r)
    rows[1].size_ratio = rows[0].denoiser_bytes / max(rows[1].denoiser_bytes, 1)
    result = BenchResult(model, {"checkpoint": checkpoint, "steps": steps}, rows, out=out)
    write_bench_outputs(result, {"fp": ref, name: imgs}, ps, Path(out), 8)
    return result


__all__ = ["BenchConfig", "BenchResult", "RecipeResult", "evaluate_checkpoint", "run_bench"]
