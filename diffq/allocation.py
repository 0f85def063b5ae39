"""Exact bit allocation: one candidate format per unit, least total sensitivity under a budget.

Why an integer program: the choice is a multiple-choice knapsack (each unit picks exactly one of a
few formats, each with a cost and a sensitivity). Greedy rounding can miss the optimum and can
overshoot the budget; HiGHS (``scipy.optimize.milp``) solves the exact problem in milliseconds for
hundreds of units:

    minimise   sum_{u,c} s[u,c] x[u,c]
    subject to sum_c x[u,c] = 1                       for every unit u
               sum_{u,c} cost[u,c] x[u,c] <= budget
               x binary

``s`` is :meth:`diffq.sensitivity_analysis.SensitivityTable.combined`; ``cost`` depends on ``budget_kind``:

* ``avg_bits``: stored bits per weight over the table's layers, ``8 * bytes / weights`` (scales,
  zero points and biases included, so the number is what the checkpoint really holds);
* ``bytes``: total bytes of the table's layers;
* ``bitops``: multiply-accumulates per image x weight bits x activation bits.

The plan is checked in exact arithmetic afterwards: it never exceeds the budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffq.errors import CheckpointError, RecipeError
from diffq.io import write_json_atomic
from diffq.sensitivity_analysis import DENSE, SensitivityTable

BUDGET_KINDS = ("avg_bits", "bytes", "bitops")


class AllocationError(RecipeError):
    """A budget no plan can meet (the message states the smallest feasible one)."""


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
        from diffq.presets import PRESETS

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


# -------------------------------------------------------------------------------------- costs
def unit_cost(table: SensitivityTable, unit: str, cand: str, kind: str) -> float:
    """Cost of ``unit`` in format ``cand``; ``avg_bits`` costs are stored bits (8 x bytes)."""
    if kind in ("avg_bits", "bytes"):
        b = table.unit_bytes(unit, cand)
        return 8 * b if kind == "avg_bits" else b
    if kind == "bitops":
        return table.unit_macs(unit) * table.weight_bits[cand] * table.act_bits[cand]
    raise RecipeError(f"budget_kind={kind!r}: use one of {list(BUDGET_KINDS)}")


def plan_cost(table: SensitivityTable, assignments: dict[str, str]) -> dict[str, float]:
    """Realised ``avg_bits`` / ``bytes`` / ``bitops`` / ``nominal_bits`` of a layer assignment over the
    table's layers (layers missing from ``assignments`` count as fp16)."""
    total_w = sum(table.params[n] for n in table.layers)
    nbytes = bitops = nominal = 0.0
    for n in table.layers:
        c = assignments.get(n, DENSE)
        if c not in table.layer_bytes[n]:
            raise RecipeError(f"layer {n!r} has no measurement for {c!r}; measured: {sorted(table.layer_bytes[n])}")
        nbytes += table.layer_bytes[n][c]
        bitops += table.macs.get(n, 0.0) * table.weight_bits[c] * table.act_bits[c]
        nominal += table.params[n] * table.weight_bits[c]
    return {"avg_bits": 8 * nbytes / total_w, "bytes": nbytes, "bitops": bitops, "nominal_bits": nominal / total_w}


def _budget_total(table: SensitivityTable, budget: float, kind: str) -> float:
    return budget * sum(table.params[n] for n in table.layers) if kind == "avg_bits" else float(budget)


def _from_total(table: SensitivityTable, total: float, kind: str) -> float:
    return total / sum(table.params[n] for n in table.layers) if kind == "avg_bits" else total


# -------------------------------------------------------------------------------------- allocate
def allocate(
    table: SensitivityTable,
    *,
    budget: float,
    budget_kind: str = "avg_bits",
    judges: dict | None = None,
    weights: dict[str, float] | None = None,
    candidates: list[str] | None = None,
    time_limit: float = 60.0,
) -> BitPlan:
    """The plan with least total combined sensitivity whose cost is ``<= budget``.

    budget_kind: ``avg_bits`` (stored bits per weight), ``bytes`` or ``bitops`` (per image).
    judges / weights: override the table's (e.g. ``judges={"*": ("quality",)}`` for quality alone).
    candidates: restrict to these (``"fp16"`` is always allowed).
    Raises AllocationError (a RecipeError) when even the cheapest plan exceeds the budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if budget_kind not in BUDGET_KINDS:
        raise RecipeError(f"budget_kind={budget_kind!r}: use one of {list(BUDGET_KINDS)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget) or budget <= 0:
        raise RecipeError(f"budget={budget!r} must be a positive number ({budget_kind})")
    if budget_kind == "bitops" and not any(table.macs.values()):
        raise RecipeError("this table has no MAC counts; use budget_kind='avg_bits' or 'bytes'")
    sens = table.combined(judges, weights)
    allowed = None if candidates is None else {DENSE, *candidates}
    var: list[tuple[str, str]] = []
    for u in table.units:
        opts = [c for c in table.available(u) if allowed is None or c in allowed]
        if not opts:
            raise RecipeError(f"unit {u!r} has none of the candidates {sorted(allowed or [])}")
        var += [(u, c) for c in opts]
    cost = np.array([unit_cost(table, u, c, budget_kind) for u, c in var], dtype=np.float64)
    obj = np.array([sens[u][c] for u, c in var], dtype=np.float64)
    total = _budget_total(table, budget, budget_kind)

    cheapest = {}
    for (u, _), k in zip(var, cost):
        cheapest[u] = min(cheapest.get(u, np.inf), k)
    min_total = float(sum(cheapest.values()))
    if _from_total(table, min_total, budget_kind) > budget:  # same arithmetic as plan_cost reports
        least = _from_total(table, min_total, budget_kind)
        raise AllocationError(
            f"budget {budget_kind} <= {budget:.6g} cannot be met: the cheapest plan (every unit in its smallest "
            f"format) needs {budget_kind} = {least:.6g}; raise the budget to at least that or add a smaller candidate"
        )

    unit_index = {u: i for i, u in enumerate(table.units)}
    rows = [unit_index[u] for u, _ in var]
    a_eq = coo_matrix((np.ones(len(var)), (rows, np.arange(len(var)))), shape=(len(table.units), len(var)))
    scale = total if total > 0 else 1.0
    rhs = 1.0
    chosen = None
    for _ in range(6):
        res = milp(
            obj,
            constraints=[LinearConstraint(a_eq, 1, 1), LinearConstraint((cost / scale)[None, :], -np.inf, rhs)],
            integrality=np.ones(len(var)),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True},
        )
        if res.x is None:
            raise AllocationError(f"the solver found no plan for budget {budget_kind} <= {budget:.6g}: {res.message}")
        x = np.round(res.x).astype(bool)
        got = float(cost[x].sum())  # integer-valued costs: exact in float64 up to 2**53
        if _from_total(table, got, budget_kind) <= budget:
            chosen = x
            break
        rhs -= max(got - total, 0.0) / scale + 1e-9  # solver tolerance let it overshoot: tighten and re-solve
    if chosen is None:
        raise AllocationError(f"could not find a plan within budget {budget_kind} <= {budget:.6g} (numerical issue)")

    units = {var[i][0]: var[i][1] for i in np.flatnonzero(chosen)}
    assignments = {n: units[u] for u in table.units for n in table.members[u]}
    return BitPlan(
        assignments=assignments,
        budget=float(budget),
        budget_kind=budget_kind,
        realised=plan_cost(table, assignments),
        objective=float(obj[chosen].sum()),
        units=units,
        roles={n: table.roles[n] for n in assignments},
        bits={n: int(table.weight_bits[c]) for n, c in assignments.items()},
        params={n: table.params[n] for n in assignments},
        meta={
            "judges": {k: list(v) for k, v in (table.judges if judges is None else judges).items()},
            "weights": dict(table.weights if weights is None else weights),
            "min_feasible_budget": _from_total(table, min_total, budget_kind),
            "solver": f"scipy.optimize.milp (HiGHS): {res.message}",
        },
    )


def uniform_plan(table: SensitivityTable, denoiser, preset: str, *, skip_rules: bool = True) -> BitPlan:
    """What the uniform ``preset`` recipe does to the table's layers, as a BitPlan (layers its skip
    rules keep dense are fp16): the baseline a mixed plan of the same cost is compared with.

    skip_rules=False: ``preset`` on every analysed layer that can hold it (embeddings and adaLN
    included), the smallest uniform plan; a preset's skip rules can leave it far above its nominal
    bits (digits-dit's uniform w4a8 is 9.6 bits per weight)."""
    from diffq.presets import get_preset
    from diffq.selection import choose_layers

    if skip_rules:
        quantized = {ch.name for ch in choose_layers(denoiser, get_preset(preset)) if ch.skip is None}
    else:
        quantized = set(table.layers)
    assignments = {n: (preset if n in quantized and preset in table.layer_bytes[n] else DENSE) for n in table.layers}
    return BitPlan(
        assignments=assignments, realised=plan_cost(table, assignments),
        roles={n: table.roles[n] for n in assignments},
        bits={n: int(table.weight_bits[c]) for n, c in assignments.items()},
        params={n: table.params[n] for n in assignments}, meta={"uniform": preset, "skip_rules": skip_rules},
    )
