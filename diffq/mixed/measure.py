"""Per-layer quantization sensitivity, measured with two decoupled metrics.

Why two metrics: quantizing some layers of a text-to-image denoiser degrades the image (noise,
blur, broken strokes) while others mostly change *what* is drawn -- the picture stays clean but no
longer matches the prompt (MixDQ's observation). One averaged number hides the second kind, so
the table keeps them apart:

* ``quality``: distance of the images to the full-precision images of the same prompts and seeds,
  computed by the ``quality`` function the caller passes (e.g. ``diffq.eval.image_distance("ssim")``,
  1 - SSIM per image);
* ``alignment``: drop of a text-image score between the full-precision and the quantized images,
  computed by the ``scorer`` the caller passes (a CLIP score; digits-clip for the demo models).

Measuring one (unit, candidate) costs one generation of ``len(prompts)`` images: the unit's layers
are swapped for their quantized modules, images generated, originals swapped back. Results go to
``cache_dir`` one small JSON per (unit, candidate), written atomically, so an interrupted analysis
resumes where it stopped. Cost is ``units x candidates`` generations; ``groups="block_role"`` or
``"block"`` cuts the unit count by 2-10x on large models. How the metrics are combined is the
table's business (:mod:`diffq.mixed.table`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats
from diffq.errors import CalibrationError, RecipeError
from diffq.fingerprint import weights_fingerprint
from diffq.generation import generate
from diffq.io import write_json_atomic
from diffq.mixed.plan import DENSE
from diffq.mixed.table import DEFAULT_JUDGES, METRICS, SensitivityTable, check_judges
from diffq.mixed.units import group_layers
from diffq.modules import (
    TimestepTracker,
    quantizable_layers,
    register_timestep_hook,
    set_submodule,
    structure_fingerprint,
)
from diffq.pipelines.adapters import adapter_for
from diffq.progress import progress_enabled
from diffq.quantization.build import install_layers
from diffq.quantization.presets import PRESETS
from diffq.quantization.selection import LayerChoice, choose_layers
from diffq.quantization.state import quant_state
from diffq.sizes import module_bytes
from diffq.tensor_file import read_safetensors, write_safetensors

DEFAULT_CANDIDATES = ("w8a8", "w4a8", "w4a16")
#: quality(images [N,3,H,W], reference [N,3,H,W]) -> per-image distance [N] (or a float), higher = worse
Quality = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | float"]
#: scorer(images [N,3,H,W] in [0, 1], prompts) -> per-image text-image score [N], higher = better aligned
Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def _name_of(fn) -> str:
    """Identity of a metric function for the cache key: its ``name`` attribute (or, for a bound method,
    its object's, e.g. a ClipScorer's model id), else its qualified name."""
    name = getattr(fn, "name", None) or getattr(getattr(fn, "__self__", None), "name", None)
    return str(name or getattr(fn, "__qualname__", None) or type(fn).__name__)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unit_file(unit: str, members: list[str], cand: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", unit)[-60:]
    return f"{safe}.{_hash([unit, members])[:8]}.{cand}.json"


class _MacCounter:
    """Forward hooks summing multiply-accumulates per layer (Linear: out elements x in; Conv: out
    elements x in x kh x kw)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.macs = {n: 0.0 for n in layers}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(mod, args, out):
            if isinstance(mod, nn.Conv2d):
                k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
            else:
                k = mod.in_features
            self.macs[name] += float(out.numel()) * k
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class _Run:
    """What every measurement of one analysis shares."""

    pipe: object
    denoiser: nn.Module
    calibration: CalibrationStats | None
    splits: dict[str, tuple[int, int]]
    tracker: TimestepTracker
    prompts: list[str]
    seeds: list[int]
    gen_kw: dict
    ref: torch.Tensor
    ref_scores: torch.Tensor | None
    quality: Quality
    scorer: Scorer | None
    metrics: list[str]


def _check_arguments(prompts, seeds, metrics, candidates, calibration, quality, scorer):
    """Validated (prompts, seeds, metrics, candidates); alignment is dropped (with a warning) without a scorer."""
    prompts = list(prompts)
    if not prompts:
        raise RecipeError("sensitivity needs at least one prompt; pass prompts=[...]")
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise RecipeError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise RecipeError(f"metrics {bad or metrics} unknown; choose from {list(METRICS)}")
    if "quality" in metrics and not callable(quality):
        raise RecipeError(
            "sensitivity needs quality=f(images, reference) -> per-image distance, e.g. "
            "quality=diffq.eval.image_distance('ssim') (1 - SSIM), 'mse' or 'lpips'"
        )
    if scorer is not None and not callable(scorer):
        raise RecipeError(f"scorer must be a function (images, prompts) -> [N] scores, not {scorer!r}")
    cands = [c for c in dict.fromkeys(candidates) if c != DENSE]
    for c in cands:
        if c not in PRESETS or c == "mixed":
            names = [p for p in PRESETS if p != "mixed"]
            raise RecipeError(f"candidate {c!r} is not a preset; candidates are preset names from {names} or 'fp16'")
        if PRESETS[c].needs_calibration and calibration is None:
            rows = ", reservoir=256" if PRESETS[c].needs_reservoir else ""
            raise CalibrationError(
                f"candidate {c!r} needs calibration statistics; pass calibration=diffq.calibrate(pipe, prompts{rows})"
            )
        if PRESETS[c].needs_reservoir and not calibration.reservoirs:
            raise CalibrationError(
                f"candidate {c!r} rounds with GPTQ / searches the smoothing strength, which needs calibration input "
                f"rows; calibrate with diffq.calibrate(pipe, prompts, reservoir=256)"
            )
    if not cands:
        raise RecipeError("no candidates to measure; pass e.g. candidates=('w8a8', 'w4a8')")
    if "alignment" in metrics and scorer is None:
        warnings.warn(
            "alignment metric disabled: no scorer given (pass e.g. scorer=diffq.eval.digits_scorer(digits_clip())"
            ".per_image for the demo models, or a function (images, prompts) -> scores); judging every layer by "
            "quality", stacklevel=3,
        )
        metrics.remove("alignment")
        metrics = metrics or ["quality"]
    return prompts, seeds, metrics, cands


def _select_layers(denoiser, role_of, cands, layers) -> tuple[dict[str, nn.Module], dict, list[str]]:
    """(all quantizable layers, candidate -> layer -> LayerChoice, the analysed layer names)."""
    mixed = PRESETS["mixed"]
    all_layers = quantizable_layers(denoiser)
    choices: dict[str, dict[str, LayerChoice]] = {}
    for c in cands:
        plan = {n: c for n in all_layers}
        choices[c] = {ch.name: ch for ch in choose_layers(denoiser, mixed, plan, role_of=role_of) if ch.skip is None}
    names = [n for n in all_layers if any(n in choices[c] for c in cands)]
    if isinstance(layers, str):
        pat = re.compile(layers)
        names = [n for n in names if pat.search(n)]
    elif layers is not None:
        wanted = set(layers)
        missing = wanted - set(names)
        if missing:
            raise RecipeError(f"layers {sorted(missing)[:5]} are not quantizable by any candidate (or do not exist)")
        names = [n for n in names if n in wanted]
    if not names:
        raise RecipeError("no layer to analyse: the candidates quantize none of the selected layers")
    return all_layers, choices, names


def sensitivity(
    pipe,
    calibration: CalibrationStats | None = None,
    *,
    prompts: Sequence[str],
    quality: Quality | None = None,
    scorer: Scorer | None = None,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    metrics: Sequence[str] = METRICS,
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    groups: str | Callable[[str], str] | None = None,
    layers: Sequence[str] | str | None = None,
    judges: dict[str, Iterable[str]] | None = None,
    weights: dict[str, float] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """Measure, for every unit and candidate, what quantizing that unit alone does to the images.

    prompts / seeds: image i uses prompts[i] and seeds[i] (default 0..N-1) for the full-precision
        reference and for every quantized run, so differences are paired.
    quality: ``f(images, reference) -> per-image distance [N]`` (higher = worse), e.g.
        ``diffq.eval.image_distance("ssim")``; needed unless ``metrics=("alignment",)``.
    scorer: ``f(images [N,3,H,W] in [0,1], prompts) -> Tensor[N]`` (higher = better aligned), e.g.
        ``diffq.eval.digits_scorer(digits_clip()).per_image``. Without one, alignment is skipped with
        a warning and every unit is judged by quality.
    candidates: preset names (see ``diffq.PRESETS``); ``"fp16"`` (keep dense) is always added.
    metrics: ``quality`` and/or ``alignment``.
    groups: None / ``"block"`` / ``"block_role"`` / function, see :func:`diffq.mixed.units.group_layers`.
    layers: which layers to analyse: None = every layer some candidate can quantize (embeddings
        included, since a plan may quantize them), a regex on names, or a list of names.
    judges / weights: stored on the table (see :data:`diffq.mixed.table.DEFAULT_JUDGES`); change later
        with :meth:`SensitivityTable.with_judges`.
    cache_dir: folder for resumable results (reference images + one JSON per unit and candidate).

    Returns a :class:`SensitivityTable`; ``table.meta["computed"]`` counts the generations run now.
    """
    t_start = time.perf_counter()
    prompts, seeds, metrics, cands = _check_arguments(prompts, seeds, metrics, candidates, calibration, quality, scorer)
    judges_t = dict(DEFAULT_JUDGES) if judges is None else {k: tuple(v) for k, v in judges.items()}
    check_judges(judges_t)
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    if quant_state(denoiser) is not None:
        raise RecipeError("sensitivity needs the full-precision pipeline; this one is already quantized")
    if calibration is not None:
        calibration.check_matches(structure_fingerprint(denoiser), adapter.name)
    all_layers, choices, names = _select_layers(denoiser, adapter.role_of, cands, layers)
    members = group_layers(names, groups, adapter.role_of)
    units = list(members)
    gen_kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height,
              "width": width, "batch_size": batch_size or len(prompts)}
    key = _hash({
        "structure": structure_fingerprint(denoiser), "weights": weights_fingerprint(denoiser),
        "prompts": prompts, "seeds": seeds, "gen": {k: v for k, v in gen_kw.items() if k != "batch_size"},
        "quality": _name_of(quality) if "quality" in metrics else None,
        "scorer": None if scorer is None else _name_of(scorer),
        "calibration": None if calibration is None else calibration.meta.get("run_id", "given"),
    })
    folder = Path(cache_dir) / key if cache_dir is not None else None
    # full-precision reference (images, scores, MACs) -- cached too
    ref, ref_scores, macs = _reference(pipe, prompts, seeds, gen_kw, scorer, all_layers, names, folder)
    tracker = TimestepTracker()
    hook = register_timestep_hook(denoiser, adapter.timestep_of, lambda _m: tracker)
    run = _Run(pipe, denoiser, calibration, calibration.splits if calibration is not None else
               adapter.skip_splits(denoiser), tracker, prompts, seeds, gen_kw, ref, ref_scores, quality, scorer, metrics)
    jobs = [(u, c) for u in units for c in cands if all(n in choices[c] for n in members[u])]
    raw: dict[str, dict[str, dict[str, float]]] = {m: {u: {DENSE: 0.0} for u in units} for m in metrics}
    layer_bytes = {n: {DENSE: module_bytes(all_layers[n], float_bits=16)} for n in names}
    computed = 0
    try:
        for u, c in tqdm(jobs, desc="sensitivity", disable=not progress_enabled(progress), leave=False):
            path = folder / "entries" / _unit_file(u, members[u], c) if folder is not None else None
            entry = _cached_entry(path, members[u], metrics)
            if entry is None:
                entry = _measure(run, [choices[c][n] for n in members[u]])
                computed += 1
                if path is not None:
                    write_json_atomic(path, {"unit": u, "candidate": c, "members": members[u], **entry})
            for m in metrics:
                raw[m][u][c] = float(entry["raw"][m])
            for n in members[u]:
                layer_bytes[n][c] = int(entry["bytes"][n])
    finally:
        hook.remove()
    # a candidate that cannot hold some layer of a unit leaves that unit without the candidate;
    # layer_bytes then lacks it too, which is fine: allocation only offers measured candidates.
    meta = {
        "prompts": len(prompts), "seeds": seeds, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "groups": groups if isinstance(groups, str) or groups is None else "custom",
        "quality": _name_of(quality) if "quality" in metrics else None,
        "scorer": "none" if scorer is None else _name_of(scorer), "family": adapter.name, "cache_key": key,
        "computed": computed, "evaluations": len(jobs), "seconds": time.perf_counter() - t_start,
        "reference_alignment": None if ref_scores is None else float(ref_scores.mean()),
    }
    return SensitivityTable(
        units=units, members=members, roles={n: adapter.role_of(n) for n in names}, candidates=[DENSE, *cands],
        raw=raw, params={n: int(all_layers[n].weight.numel()) for n in names}, layer_bytes=layer_bytes, macs=macs,
        weight_bits={DENSE: 16, **{c: PRESETS[c].weight.bits for c in cands}},
        act_bits={DENSE: 16, **{c: (PRESETS[c].act.bits if PRESETS[c].act is not None else 16) for c in cands}},
        judges=judges_t, weights={m: 1.0 for m in METRICS} if weights is None else dict(weights), meta=meta,
    )


def _cached_entry(path: Path | None, members: list[str], metrics: list[str]) -> dict | None:
    """A finished measurement from the cache, or None when absent, unreadable or for other members/metrics."""
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if entry.get("members") != members or set(metrics) - set(entry["raw"]):
        return None
    return entry


def _reference(pipe, prompts, seeds, gen_kw, scorer, all_layers, names, folder):
    """FP images [N,3,H,W], alignment scores [N] (or None) and MACs per image per layer."""
    if folder is not None and (folder / "reference.safetensors").is_file() and (folder / "reference.json").is_file():
        t = read_safetensors(folder / "reference.safetensors")
        info = json.loads((folder / "reference.json").read_text())
        if set(names) <= set(info["macs"]) and ("scores" in t) == (scorer is not None):
            return t["images"], t.get("scores"), {n: info["macs"][n] for n in names}
    counter = _MacCounter({n: all_layers[n] for n in names})
    try:
        images = generate(pipe, prompts, seeds, desc="fp reference", **gen_kw)
    finally:
        counter.close()
    macs = {n: v / len(prompts) for n, v in counter.macs.items()}
    scores = None if scorer is None else scorer(images, prompts).detach().float().cpu()
    if folder is not None:
        tensors = {"images": images.contiguous()}
        if scores is not None:
            tensors["scores"] = scores.contiguous()
        write_safetensors(folder / "reference.safetensors", tensors)
        write_json_atomic(folder / "reference.json", {"macs": macs})
    return images, scores, macs


def _measure(run: _Run, unit_choices: list[LayerChoice]) -> dict:
    """Swap the unit's layers for quantized modules, generate, swap back; raw metrics and bytes."""
    originals = {ch.name: run.denoiser.get_submodule(ch.name) for ch in unit_choices}
    try:
        built = install_layers(run.denoiser, unit_choices, run.calibration, run.splits, run.tracker)
        images = generate(run.pipe, run.prompts, run.seeds, **run.gen_kw)
    finally:
        for name, dense in originals.items():
            set_submodule(run.denoiser, name, dense)
    raw = {}
    if "quality" in run.metrics:
        raw["quality"] = float(torch.as_tensor(run.quality(images, run.ref)).float().mean())
    if "alignment" in run.metrics:
        scores = run.scorer(images, run.prompts).detach().float().cpu()
        raw["alignment"] = float((run.ref_scores - scores).mean())
    return {"raw": raw, "bytes": {n: int(m.storage_bytes()) for n, m in built.items()}}
