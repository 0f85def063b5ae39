"""Exact bit allocation: one candidate format per unit, least total sensitivity under a budget.

Why an integer program: the choice is a multiple-choice knapsack (each unit picks exactly one of a
few formats, each with a cost and a sensitivity). Greedy rounding can miss the optimum and can
overshoot the budget; HiGHS (``scipy.optimize.milp``) solves the exact problem in milliseconds for
hundreds of units:

    minimise   sum_{u,c} s[u,c] x[u,c]
    subject to sum_c x[u,c] = 1                       for every unit u
               sum_{u,c} cost[u,c] x[u,c] <= budget
               x binary

``s`` is :meth:`diffq.mixed.table.SensitivityTable.combined`; ``cost`` depends on ``budget_kind``:

* ``avg_bits``: stored bits per weight over the table's layers, ``8 * bytes / weights`` (scales,
  zero points and biases included, so the number is what the checkpoint really holds);
* ``bytes``: total bytes of the table's layers;
* ``bitops``: multiply-accumulates per image x weight bits x activation bits.

The plan is checked in exact arithmetic afterwards: it never exceeds the budget.
"""

from __future__ import annotations

import numpy as np

from diffq.errors import RecipeError
from diffq.mixed.plan import BUDGET_KINDS, DENSE, BitPlan
from diffq.mixed.table import SensitivityTable
from diffq.quantization.presets import get_preset
from diffq.quantization.selection import choose_layers


class AllocationError(RecipeError):
    """A budget no plan can meet (the message states the smallest feasible one)."""


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
    for attempt in range(8):
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
        # the solver's feasibility tolerance (~1e-7 of the scaled row) let it overshoot: tighten by the
        # overshoot plus a margin that grows tenfold per attempt, and re-solve
        rhs -= max(got - total, 0.0) / scale + 1e-9 * 10**attempt
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
