"""``SensitivityTable``: what quantizing each unit alone with each candidate costs, per metric, and
how the metrics are judged and combined when the table is read.

Each metric is normalised over the units on its own (divided by the mean over units of the unit's
worst candidate), and a *judge map* says which layers each metric judges (by default every layer
by quality *and* alignment; :data:`CONDITIONING_JUDGES` restricts alignment to cross-attention and
conditioning layers). A unit's score is the weighted sum of its judges' normalised metrics. Judging
happens when the table is read (:meth:`SensitivityTable.combined`), so changing it needs no new
measurements. :mod:`diffq.mixed.measure` fills a table; :mod:`diffq.mixed.allocate` reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffq.errors import CheckpointError, RecipeError
from diffq.io import write_json_atomic
from diffq.mixed.plan import DENSE

METRICS = ("quality", "alignment")
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
        check_judges(j)
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


def check_judges(judges: dict[str, tuple[str, ...]]) -> None:
    for key, ms in judges.items():
        bad = [m for m in ms if m not in METRICS]
        if bad or not ms:
            raise RecipeError(f"judge {key!r} -> {list(ms)}: metrics must be a non-empty subset of {list(METRICS)}")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise RecipeError(f"bad judge pattern {key!r}: {e}") from e
