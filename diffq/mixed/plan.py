"""``BitPlan``: the per-layer formats of the ``mixed`` recipe, as written by :func:`diffq.allocate`
and read by ``diffq.quantize(pipe, "mixed", plan=...)``.

A plain JSON-able record that knows nothing of the sensitivity table it may have come from, so
quantization can read a plan without the analysis layer; ``DENSE`` (``"fp16"``) keeps a layer dense.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffq.errors import CheckpointError, RecipeError
from diffq.io import write_json_atomic
from diffq.quantization.presets import PRESETS
from diffq.quantization.selection import KEEP_DENSE as DENSE

__all__ = ["BUDGET_KINDS", "DENSE", "BitPlan"]

#: what a budget counts: stored bits per weight, bytes, or multiply-accumulates x bits x bits
BUDGET_KINDS = ("avg_bits", "bytes", "bitops")


@dataclass
class BitPlan:
    """Per-layer formats for the ``mixed`` recipe: ``assignments[layer]`` is a preset name or "fp16".

    Consumed by ``diffq.quantize(pipe, "mixed", plan=plan)`` (or ``bit_plan=PATH`` in a recipe).
    The other fields document how the plan came about and are optional when writing one by hand.
    """

    assignments: dict[str, str]
    budget: float | None = None
    budget_kind: str = "avg_bits"
    realised: dict[str, float] = field(default_factory=dict)
    objective: float | None = None
    units: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.assignments, dict) or not self.assignments:
            raise RecipeError("a bit plan needs assignments: a non-empty mapping layer name -> preset or 'fp16'")
        bad = {k: v for k, v in self.assignments.items() if v != DENSE and (v not in PRESETS or v == "mixed")}
        if bad:
            k, v = next(iter(bad.items()))
            raise RecipeError(
                f"bit plan assigns {v!r} to {k!r}; use 'fp16' or a preset from {[p for p in PRESETS if p != 'mixed']}"
            )
        if not isinstance(self.budget_kind, str) or self.budget_kind not in BUDGET_KINDS:
            raise RecipeError(f"budget_kind={self.budget_kind!r}: use one of {list(BUDGET_KINDS)}")
        self._check_optional_fields()

    def _check_optional_fields(self) -> None:
        """Hand-written or damaged plans fail here, with the field named, not later in summary()."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("budget", "objective"):
            v = getattr(self, name)
            if v is not None and not number(v):
                raise RecipeError(f"bit plan field {name}={v!r} must be a number or null")
        kinds = {"realised": number, "units": lambda v: isinstance(v, str), "roles": lambda v: isinstance(v, str),
                 "bits": number, "params": number}
        for name, ok in kinds.items():
            v = getattr(self, name)
            if not isinstance(v, dict) or not all(ok(x) for x in v.values()):
                raise RecipeError(f"bit plan field {name!r} must map names to "
                                  f"{'strings' if name in ('units', 'roles') else 'numbers'}; drop it or fix it")
        if not isinstance(self.meta, dict):
            raise RecipeError("bit plan field 'meta' must be an object")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "diffq.BitPlan/1"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BitPlan:
        if not isinstance(d, dict) or "assignments" not in d:
            raise RecipeError("a bit plan JSON is an object with an 'assignments' mapping layer -> preset")
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            return cls(**d)
        except TypeError as e:
            raise RecipeError(f"bad bit plan: {e}") from e

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"no bit plan at {p}; make one with diffq.allocate(table, budget=...).save(path)")
        try:
            return cls.from_dict(json.loads(p.read_bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"bit plan {p} is not valid JSON ({e}); re-create it with diffq.allocate") from e

    # ---------------------------------------------------------------- reading
    def role_bits(self) -> dict[str, float]:
        """role -> parameter-weighted mean nominal weight bits."""
        acc: dict[str, list[float]] = {}
        for n, c in self.assignments.items():
            w = self.params.get(n, 1)
            a = acc.setdefault(self.roles.get(n, "other"), [0.0, 0.0])
            a[0] += w * self.bits.get(n, 16 if c == DENSE else 0)
            a[1] += w
        return {r: s / max(w, 1) for r, (s, w) in acc.items()}

    def summary(self) -> str:
        """Which block types got more bits: per role counts of each format and mean bits."""
        counts: dict[str, dict[str, int]] = {}
        for n, c in self.assignments.items():
            r = self.roles.get(n, "other")
            counts.setdefault(r, {})
            counts[r][c] = counts[r].get(c, 0) + 1
        rb = self.role_bits()
        tot_w = sum(self.params.get(n, 1) for n in self.assignments)
        mean = sum(self.params.get(n, 1) * self.bits.get(n, 0) for n in self.assignments) / max(tot_w, 1)
        lines = []
        if self.budget is not None:
            got = self.realised.get(self.budget_kind)
            lines.append(f"bit plan: budget {self.budget_kind} <= {self.budget:.6g}, realised "
                         f"{'unknown' if got is None else format(got, '.6g')}")
        lines.append(f"{len(self.assignments)} layers, mean nominal weight bits {mean:.2f}")
        lines.append(f"{'role':14} {'layers':>6} {'mean bits':>9}  formats")
        for r in sorted(counts, key=lambda r: -rb[r]):
            fm = ", ".join(f"{c} x{k}" for c, k in sorted(counts[r].items()))
            lines.append(f"{r:14} {sum(counts[r].values()):6d} {rb[r]:9.2f}  {fm}")
        more = [r for r in rb if rb[r] > mean + 1e-9]
        less = [r for r in rb if rb[r] < mean - 1e-9]
        lines.append(f"more bits than the mean: {', '.join(sorted(more, key=lambda r: -rb[r])) or '-'}; "
                     f"fewer: {', '.join(sorted(less, key=lambda r: rb[r])) or '-'}")
        return "\n".join(lines)
