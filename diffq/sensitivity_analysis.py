"""Per-layer quantization sensitivity, measured with two decoupled metrics.

Why two metrics: quantizing some layers of a text-to-image denoiser degrades the image (noise,
blur, broken strokes) while others mostly change *what* is drawn -- the picture stays clean but no
longer matches the prompt (MixDQ's observation). One averaged number hides the second kind, so
the table keeps them apart:

* ``quality``: distance of the images to the full-precision images of the same prompts and seeds
  (``1 - SSIM`` by default, or ``mse`` / ``lpips``);
* ``alignment``: drop of a text-image score (CLIP score; digits-clip for the demo models) between
  the full-precision and the quantized images.

Each metric is normalised over the layers on its own (divided by the mean over units of the unit's
worst candidate), and a *judge map* says which layers each metric judges (by default every layer by
quality *and* alignment; :data:`CONDITIONING_JUDGES` restricts alignment to cross-attention and
conditioning layers). A unit's score is the weighted sum of its judges' normalised metrics. Judging
happens when the table is read (:meth:`SensitivityTable.combined`), so changing it needs no new
measurements.

Measuring one (unit, candidate) costs one generation of ``len(prompts)`` images: the unit's layers
are swapped for their quantized modules, images generated, originals swapped back. Results go to
``cache_dir`` one small JSON per (unit, candidate), written atomically, so an interrupted analysis
resumes where it stopped. Cost is ``units x candidates`` generations; ``groups="block_role"`` or
``"block"`` cuts the unit count by 2-10x on large models.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.build import build_layer
from diffq.calibration import CalibrationStats
from diffq.errors import CalibrationError, CheckpointError, RecipeError
from diffq.fingerprint import weights_fingerprint
from diffq.generation import generate, progress_enabled
from diffq.io import atomic_path, write_json_atomic
from diffq.layers import quantizable_layers, structure_fingerprint
from diffq.modules import attach_tracker
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.roles import role_of
from diffq.presets import PRESETS
from diffq.selection import LayerChoice, choose_layers

DENSE = "fp16"
METRICS = ("quality", "alignment")
DEFAULT_CANDIDATES = ("w8a8", "w4a8", "w4a16")
QUALITY_METRICS = ("ssim", "mse", "lpips")
# Which metrics judge which layers. Keys are roles, ``re:`` regexes on the unit's layer names, or ``*``
# (everything else); the first matching regex wins, then the role. By default every layer is judged by
# both metrics, each normalised on its own (the decoupling), because on the demo models text-alignment
# damage came as much from FFNs, attention output and in/out projections as from cross-attention: with
# alignment judging only the conditioning layers (``CONDITIONING_JUDGES``) the plans came out identical
# to quality-only ones, with every layer judged they kept more CLIP score (BENCHMARKS.md, issue 6).
# Every judge set keeps quality: alignment alone calls a layer "cheap" whenever the (noisier, coarser)
# alignment score misses damage that is plain to see in the images.
DEFAULT_JUDGES: dict[str, tuple[str, ...]] = {"*": ("quality", "alignment")}
# MixDQ-style alternative: alignment judges only the layers that read the text / class condition.
CONDITIONING_JUDGES: dict[str, tuple[str, ...]] = {
    "cross_attn": ("quality", "alignment"),
    "adanorm": ("quality", "alignment"),
    r"re:(^|\.)(class_embedding|caption_projection|context_embedder|text_embedder|encoder_hid_proj"
    r"|add_embedding)(\.|$)": ("quality", "alignment"),
    "*": ("quality",),
}
Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
_BLOCK = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+\.(?:attentions|resnets|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:attentions|resnets)\.\d+"
    r"|(?:single_)?transformer_blocks\.\d+)(\.|$)"
)


# ---------------------------------------------------------------------------------------- table
@dataclass
class SensitivityTable:
    """What quantizing each unit (a layer or a group of layers) alone with each candidate costs.

    units: unit names in module order; ``members[u]`` its layer names, ``roles[layer]`` their roles.
    candidates: preset names plus ``"fp16"`` (kept dense: zero sensitivity, 16 bits).
    raw[metric][unit][candidate]: measured damage, higher = worse (``quality``: 1 - SSIM etc.;
        ``alignment``: score points lost). fp16 entries are 0.
    params[layer]: weight elements; layer_bytes[layer][candidate]: bytes the layer would hold
        (quantized module storage incl. scales and bias; fp16 = weight + bias at 2 bytes).
    macs[layer]: multiply-accumulates per generated image over the whole sampling run.
    weight_bits / act_bits [candidate]: nominal code bits (16 when dense / weight-only).
    judges / weights: which metrics judge which layers, and how metrics are weighted when a unit
        is judged by several; both are applied by :meth:`combined` and can be replaced freely.
    """

    units: list[str]
    members: dict[str, list[str]]
    roles: dict[str, str]
    candidates: list[str]
    raw: dict[str, dict[str, dict[str, float]]]
    params: dict[str, int]
    layer_bytes: dict[str, dict[str, int]]
    macs: dict[str, float] = field(default_factory=dict)
    weight_bits: dict[str, int] = field(default_factory=dict)
    act_bits: dict[str, int] = field(default_factory=dict)
    judges: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_JUDGES))
    weights: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in METRICS})
    meta: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- reading
    @property
    def metrics(self) -> list[str]:
        return [m for m in METRICS if m in self.raw]

    @property
    def layers(self) -> list[str]:
        return [n for u in self.units for n in self.members[u]]

    def unit_params(self, unit: str) -> int:
        return sum(self.params[n] for n in self.members[unit])

    def unit_bytes(self, unit: str, cand: str) -> int:
        return sum(self.layer_bytes[n][cand] for n in self.members[unit])

    def unit_macs(self, unit: str) -> float:
        return sum(self.macs.get(n, 0.0) for n in self.members[unit])

    def available(self, unit: str) -> list[str]:
        """Candidates measured for ``unit`` (a format that cannot hold one of its layers is absent)."""
        first = self.metrics[0]
        return [c for c in self.candidates if c in self.raw[first][unit]]

    def judged_by(self, unit: str, judges: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
        """Metrics that judge ``unit``: the union over its layers, restricted to measured metrics."""
        judges = self.judges if judges is None else judges
        out: list[str] = []
        for name in self.members[unit]:
            for m in _judge_layer(name, self.roles[name], judges):
                if m not in out:
                    out.append(m)
        have = [m for m in out if m in self.raw]
        return tuple(have) if have else (self.metrics[0],)

    def normalised(self, metric: str) -> dict[str, dict[str, float]]:
        """``max(raw, 0) / scale`` with scale = mean over units of the unit's worst candidate, so
        that 1.0 is a typical layer's worst case for this metric (negative = noise, clipped)."""
        raw = self.raw[metric]
        worst = [max([max(v, 0.0) for v in raw[u].values()] or [0.0]) for u in self.units]
        scale = sum(worst) / max(len(worst), 1)
        scale = scale if scale > 0 else 1.0
        return {u: {c: max(v, 0.0) / scale for c, v in raw[u].items()} for u in self.units}

    def combined(
        self, judges: dict[str, tuple[str, ...]] | None = None, weights: dict[str, float] | None = None
    ) -> dict[str, dict[str, float]]:
        """unit -> candidate -> weighted *sum* of the normalised metrics that judge the unit.

        A sum, not a mean: a conditioning layer judged by quality and alignment carries both kinds
        of damage, rather than having its image damage diluted by a second metric."""
        weights = self.weights if weights is None else weights
        norm = {m: self.normalised(m) for m in self.metrics}
        out = {}
        for u in self.units:
            ms = self.judged_by(u, judges)
            out[u] = {c: sum(weights.get(m, 1.0) * norm[m][u][c] for m in ms) for c in self.available(u)}
        return out

    def with_judges(
        self, judges: dict[str, Iterable[str]] | None = None, weights: dict[str, float] | None = None
    ) -> SensitivityTable:
        """A copy judged differently, e.g. ``with_judges({"*": ("quality",)})`` for quality alone."""
        j = self.judges if judges is None else {k: tuple(v) for k, v in judges.items()}
        _check_judges(j)
        return replace(self, judges=j, weights=dict(self.weights if weights is None else weights))

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["judges"] = {k: list(v) for k, v in self.judges.items()}
        d["format"] = "diffq.SensitivityTable/1"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SensitivityTable:
        d = dict(d)
        if d.pop("format", None) != "diffq.SensitivityTable/1":
            raise CheckpointError("not a diffq sensitivity table (missing format 'diffq.SensitivityTable/1')")
        d["judges"] = {k: tuple(v) for k, v in d["judges"].items()}
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"no sensitivity table at {path}; run diffq.sensitivity(...) first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"sensitivity table {path} is corrupted ({e}); delete it and re-run") from e

    def table(self, max_rows: int = 60) -> str:
        """Plain-text view: normalised metrics and combined sensitivity per unit and candidate."""
        comb = self.combined()
        norm = {m: self.normalised(m) for m in self.metrics}
        cands = [c for c in self.candidates if c != DENSE]
        head = f"{'unit':56} {'judged by':18} " + " ".join(f"{c + ' q/a/comb':>22}" for c in cands)
        lines = [head]
        for u in self.units[:max_rows]:
            cells = []
            for c in cands:
                if c not in comb[u]:
                    cells.append(f"{'-':>22}")
                    continue
                q = norm["quality"][u][c] if "quality" in norm else float("nan")
                a = norm["alignment"][u][c] if "alignment" in norm else float("nan")
                cells.append(f"{q:6.2f}/{a:6.2f}/{comb[u][c]:6.2f}".rjust(22))
            lines.append(f"{u[:56]:56} {','.join(self.judged_by(u))[:18]:18} " + " ".join(cells))
        if len(self.units) > max_rows:
            lines.append(f"... {len(self.units) - max_rows} more units")
        return "\n".join(lines)


def _judge_layer(name: str, role: str, judges: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    for key, ms in judges.items():
        if key.startswith("re:") and re.search(key[3:], name):
            return tuple(ms)
    if role in judges:
        return tuple(judges[role])
    return tuple(judges.get("*", ("quality",)))


def _check_judges(judges: dict[str, tuple[str, ...]]) -> None:
    for key, ms in judges.items():
        bad = [m for m in ms if m not in METRICS]
        if bad or not ms:
            raise RecipeError(f"judge {key!r} -> {list(ms)}: metrics must be a non-empty subset of {list(METRICS)}")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise RecipeError(f"bad judge pattern {key!r}: {e}") from e


# ---------------------------------------------------------------------------------------- grouping
def block_of(name: str) -> str:
    """The transformer / ResNet / resampling block a layer sits in (the layer itself at top level)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def group_layers(
    names: Sequence[str], groups: str | Callable[[str], str] | None
) -> dict[str, list[str]]:
    """unit name -> member layers, in first-appearance order.

    groups: None (one unit per layer), ``"block"`` (per transformer / ResNet block), ``"block_role"``
    (per block and role -- keeps cross-attention apart from the rest of its block), or a function
    layer name -> unit name.
    """
    if groups is None:
        key = str
    elif groups == "block":
        key = block_of
    elif groups == "block_role":
        def key(n: str) -> str:
            b = block_of(n)
            return n if b == n else f"{b}:{role_of(n)}"
    elif callable(groups):
        key = groups
    else:
        raise RecipeError(f"groups={groups!r} must be None, 'block', 'block_role' or a function name -> unit")
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(str(key(n)), []).append(n)
    return out


# ---------------------------------------------------------------------------------------- helpers
def _dense_bytes(mod: nn.Module) -> int:
    n = mod.weight.numel() + (mod.bias.numel() if getattr(mod, "bias", None) is not None else 0)
    return 2 * n


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _resolve_scorer(scorer) -> tuple[Scorer | None, str]:
    if scorer is None:
        return None, "none"
    if isinstance(scorer, str):
        if scorer != "digits":
            raise RecipeError(f"scorer={scorer!r}: use 'digits' (digits-clip) or a function (images, prompts) -> [N]")
        from diffq.eval import digits_scorer
        from diffq.pipelines.demo import digits_clip

        return digits_scorer(digits_clip()).per_image, "digits-clip"
    if hasattr(scorer, "per_image"):
        return scorer.per_image, type(scorer).__name__
    if callable(scorer):
        return scorer, getattr(scorer, "__qualname__", type(scorer).__name__)
    raise RecipeError(f"scorer must be 'digits', a ClipScorer or a function (images, prompts) -> [N], not {scorer!r}")


def _quality(kind: str, images: torch.Tensor, ref: torch.Tensor) -> float:
    if kind == "ssim":
        from diffq.eval import ssim

        return float(1.0 - ssim(images, ref).mean())
    if kind == "mse":
        return float(((images - ref) ** 2).mean())
    from diffq.eval import lpips

    return float(lpips(images, ref).mean())


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


# ---------------------------------------------------------------------------------------- main
def sensitivity(
    pipe,
    calibration: CalibrationStats | None = None,
    *,
    prompts: Sequence[str],
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    metrics: Sequence[str] = METRICS,
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    groups: str | Callable[[str], str] | None = None,
    layers: Sequence[str] | str | None = None,
    scorer: str | Scorer | None = None,
    quality: str = "ssim",
    judges: dict[str, Iterable[str]] | None = None,
    weights: dict[str, float] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """Measure, for every unit and candidate, what quantizing that unit alone does to the images.

    prompts / seeds: image i uses prompts[i] and seeds[i] (default 0..N-1) for the full-precision
        reference and for every quantized run, so differences are paired.
    candidates: preset names (see ``diffq.PRESETS``); ``"fp16"`` (keep dense) is always added.
    metrics: ``quality`` and/or ``alignment``. Alignment needs ``scorer``: ``"digits"`` (digits-clip,
        for the demo models), a :class:`diffq.eval.ClipScorer`, or ``f(images [N,3,H,W] in [0,1],
        prompts) -> Tensor[N]`` (higher = better aligned). Without one, alignment is skipped with a
        warning and every unit is judged by quality.
    groups: None / ``"block"`` / ``"block_role"`` / function, see :func:`group_layers`.
    layers: which layers to analyse: None = every layer some candidate can quantize (embeddings
        included, since a plan may quantize them), a regex on names, or a list of names.
    quality: ``ssim`` (1 - SSIM), ``mse`` or ``lpips`` (needs the LPIPS weights offline).
    judges / weights: stored on the table (see :data:`DEFAULT_JUDGES`); change later with
        :meth:`SensitivityTable.with_judges`.
    cache_dir: folder for resumable results (reference images + one JSON per unit and candidate).

    Returns a :class:`SensitivityTable`; ``table.meta["computed"]`` counts the generations run now.
    """
    t_start = time.perf_counter()
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
    if quality not in QUALITY_METRICS:
        raise RecipeError(f"quality={quality!r}: use one of {list(QUALITY_METRICS)}")
    if quality == "lpips" and "quality" in metrics:
        from diffq.eval import check_lpips_weights

        check_lpips_weights()
    cands = [c for c in dict.fromkeys(candidates) if c != DENSE]
    for c in cands:
        if c not in PRESETS or c == "mixed":
            names = [p for p in PRESETS if p != "mixed"]
            raise RecipeError(f"candidate {c!r} is not a preset; candidates are preset names from {names} or 'fp16'")
        if PRESETS[c].needs_calibration and calibration is None:
            raise CalibrationError(
                f"candidate {c!r} needs calibration statistics; pass calibration=diffq.calibrate(pipe, prompts)"
            )
    if not cands:
        raise RecipeError("no candidates to measure; pass e.g. candidates=('w8a8', 'w4a8')")
    score_fn, scorer_id = _resolve_scorer(scorer)
    if "alignment" in metrics and score_fn is None:
        warnings.warn(
            "alignment metric disabled: no scorer given (pass scorer='digits' for the demo models, a "
            "diffq.eval.ClipScorer, or a function (images, prompts) -> scores); judging every layer by quality",
            stacklevel=2,
        )
        metrics.remove("alignment")
        if not metrics:
            metrics = ["quality"]
    judges_t = dict(DEFAULT_JUDGES) if judges is None else {k: tuple(v) for k, v in judges.items()}
    _check_judges(judges_t)

    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    if getattr(denoiser, "_diffq_recipe", None) is not None:
        raise RecipeError("sensitivity needs the full-precision pipeline; this one is already quantized")
    if calibration is not None:
        calibration.check_matches(structure_fingerprint(denoiser), adapter.name)
    mixed = PRESETS["mixed"]
    all_layers = quantizable_layers(denoiser)
    choices: dict[str, dict[str, LayerChoice]] = {}
    for c in cands:
        plan = {n: c for n in all_layers}
        choices[c] = {ch.name: ch for ch in choose_layers(denoiser, mixed, plan) if ch.skip is None}
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
    members = group_layers(names, groups)
    units = list(members)

    params = {n: int(all_layers[n].weight.numel()) for n in names}
    roles = {n: role_of(n) for n in names}
    weight_bits = {DENSE: 16, **{c: PRESETS[c].weight.bits for c in cands}}
    act_bits = {DENSE: 16, **{c: (PRESETS[c].act.bits if PRESETS[c].act is not None else 16) for c in cands}}
    splits = calibration.splits if calibration is not None else adapter.skip_splits(denoiser)
    tracker = attach_tracker(denoiser, adapter.timestep_of)
    gen_kw = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height,
                  "width": width, "batch_size": batch_size or len(prompts)}

    key = _hash({
        "structure": structure_fingerprint(denoiser), "weights": weights_fingerprint(denoiser),
        "prompts": prompts, "seeds": seeds, "gen": {k: v for k, v in gen_kw.items() if k != "batch_size"},
        "quality": quality, "scorer": scorer_id,
        "calibration": None if calibration is None else calibration.meta.get("run_id", "given"),
    })
    folder = Path(cache_dir) / key if cache_dir is not None else None

    # full-precision reference (images, scores, MACs) -- cached too
    ref, ref_scores, macs = _reference(pipe, prompts, seeds, gen_kw, score_fn, all_layers, names, folder)
    computed = 0
    raw: dict[str, dict[str, dict[str, float]]] = {m: {u: {DENSE: 0.0} for u in units} for m in metrics}
    layer_bytes = {n: {DENSE: _dense_bytes(all_layers[n])} for n in names}
    jobs = [(u, c) for u in units for c in cands if all(n in choices[c] for n in members[u])]
    bar = tqdm(jobs, desc="sensitivity", disable=not progress_enabled(progress), leave=False)
    for u, c in bar:
        entry = None
        path = folder / "entries" / _unit_file(u, members[u], c) if folder is not None else None
        if path is not None and path.is_file():
            try:
                entry = json.loads(path.read_text())
            except json.JSONDecodeError:
                entry = None
            if entry is not None and (entry.get("members") != members[u] or set(metrics) - set(entry["raw"])):
                entry = None
        if entry is None:
            entry = _measure(pipe, denoiser, members[u], choices[c], calibration, splits, tracker, prompts, seeds,
                             gen_kw, ref, ref_scores, score_fn, metrics, quality)
            computed += 1
            if path is not None:
                write_json_atomic(path, {"unit": u, "candidate": c, "members": members[u], **entry})
        for m in metrics:
            raw[m][u][c] = float(entry["raw"][m])
        for n in members[u]:
            layer_bytes[n][c] = int(entry["bytes"][n])
    bar.close()
    # a candidate that cannot hold some layer of a unit leaves that unit without the candidate;
    # layers_bytes then lacks it too, which is fine: allocation only offers measured candidates.
    meta = {
        "prompts": len(prompts), "seeds": seeds, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "groups": groups if isinstance(groups, str) or groups is None else "custom",
        "quality": quality, "scorer": scorer_id, "family": adapter.name, "cache_key": key,
        "computed": computed, "evaluations": len(jobs), "seconds": time.perf_counter() - t_start,
        "reference_alignment": None if ref_scores is None else float(ref_scores.mean()),
    }
    return SensitivityTable(
        units=units, members=members, roles=roles, candidates=[DENSE, *cands], raw=raw, params=params,
        layer_bytes=layer_bytes, macs=macs, weight_bits=weight_bits, act_bits=act_bits, judges=judges_t,
        weights={m: 1.0 for m in METRICS} if weights is None else dict(weights), meta=meta,
    )


def _reference(pipe, prompts, seeds, gen_kw, score_fn, all_layers, names, folder):
    """FP images [N,3,H,W], alignment scores [N] (or None) and MACs per image per layer."""
    if folder is not None and (folder / "reference.safetensors").is_file() and (folder / "reference.json").is_file():
        from safetensors.torch import load_file

        t = load_file(str(folder / "reference.safetensors"))
        info = json.loads((folder / "reference.json").read_text())
        if set(names) <= set(info["macs"]) and ("scores" in t) == (score_fn is not None):
            return t["images"], t.get("scores"), {n: info["macs"][n] for n in names}
    counter = _MacCounter({n: all_layers[n] for n in names})
    try:
        images = generate(pipe, prompts, seeds, desc="fp reference", **gen_kw)
    finally:
        counter.close()
    macs = {n: v / len(prompts) for n, v in counter.macs.items()}
    scores = None if score_fn is None else score_fn(images, prompts).detach().float().cpu()
    if folder is not None:
        from safetensors.torch import save_file

        tensors = {"images": images.contiguous()}
        if scores is not None:
            tensors["scores"] = scores.contiguous()
        with atomic_path(folder / "reference.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(folder / "reference.json", {"macs": macs})
    return images, scores, macs


def _measure(pipe, denoiser, layer_names, choices, calibration, splits, tracker, prompts, seeds, gen_kw, ref,
             ref_scores, score_fn, metrics, quality) -> dict:
    """Swap the unit's layers for quantized modules, generate, swap back; raw metrics and bytes."""
    originals = {n: denoiser.get_submodule(n) for n in layer_names}
    out_bytes = {}
    try:
        for n in layer_names:
            new = build_layer(choices[n], calibration, splits.get(n))
            if new.act is not None:
                new.act.tracker = tracker
            out_bytes[n] = int(new.storage_bytes())
            _set(denoiser, n, new)
        images = generate(pipe, prompts, seeds, **gen_kw)
    finally:
        for n, mod in originals.items():
            _set(denoiser, n, mod)
    raw = {}
    if "quality" in metrics:
        raw["quality"] = _quality(quality, images, ref)
    if "alignment" in metrics:
        scores = score_fn(images, prompts).detach().float().cpu()
        raw["alignment"] = float((ref_scores - scores).mean())
    return {"raw": raw, "bytes": out_bytes}

