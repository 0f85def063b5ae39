"""PNG plots of a sensitivity table and of a bit plan (matplotlib figures outside pyplot, atomic writes).

Why: a table of 100+ units x candidates is unreadable; a bar per unit shows at a glance which blocks
are fragile, and whether the fragile-for-alignment ones differ from the fragile-for-quality ones.
"""

from __future__ import annotations

from pathlib import Path

from diffq.mixed.plan import DENSE
from diffq.mixed.table import SensitivityTable
from diffq.plotting import new_figure, save_figure


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_sensitivity(table: SensitivityTable, path: str | Path, *, title: str | None = None) -> Path:
    """One panel per metric: normalised sensitivity of every unit for every candidate (log scale),
    units judged by that metric drawn solid, the others hatched. Returns ``path``."""
    import numpy as np

    cands = [c for c in table.candidates if c != DENSE]
    metrics = table.metrics
    n = len(table.units)
    fig = new_figure((max(8, 0.18 * n + 2), 3.2 * len(metrics) + 1.5))
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)
    x = np.arange(n)
    width = 0.8 / max(len(cands), 1)
    for ax, m in zip(axes[:, 0], metrics):
        norm = table.normalised(m)
        for i, c in enumerate(cands):
            vals = [norm[u].get(c, np.nan) for u in table.units]
            judged = [m in table.judged_by(u) for u in table.units]
            bars = ax.bar(x + (i - (len(cands) - 1) / 2) * width, [max(v, 1e-4) for v in vals], width, label=c)
            for b, j in zip(bars, judged):
                if not j:
                    b.set_alpha(0.35)
                    b.set_hatch("//")
        ax.set_yscale("log")
        ax.set_ylabel(f"{m} (normalised)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, title="faded = not judged by this metric", title_fontsize=7)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels([_short(u) for u in table.units], rotation=90, fontsize=6)
    fig.suptitle(title or f"per-unit sensitivity ({table.meta.get('family', '')}, {n} units)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_plan(plan, table: SensitivityTable | None, path: str | Path, *, title: str | None = None) -> Path:
    """Nominal weight bits chosen per layer, coloured by role; with ``table``, the unit's combined
    sensitivity at its most aggressive candidate is overlaid (right axis)."""
    import matplotlib

    names = list(plan.assignments)
    roles = [plan.roles.get(n, "other") for n in names]
    palette = matplotlib.colormaps["tab20"]
    role_list = sorted(set(roles))
    colour = {r: palette(i % 20) for i, r in enumerate(role_list)}
    bits = [plan.bits.get(n, 16 if plan.assignments[n] == DENSE else 0) for n in names]
    fig = new_figure((max(8, 0.12 * len(names) + 2), 4.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), bits, color=[colour[r] for r in roles])
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted(set(bits)))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n, 30) for n in names], rotation=90, fontsize=5)
    for r in role_list:
        ax.bar([0], [0], color=colour[r], label=r)
    ax.legend(ncol=4, fontsize=7, loc="upper left", bbox_to_anchor=(0, 1.25))
    if table is not None:
        comb = table.combined(plan.meta.get("judges") and {k: tuple(v) for k, v in plan.meta["judges"].items()})
        unit_of = {n: u for u in table.units for n in table.members[u]}
        worst = [max(comb[unit_of[n]].values()) if n in unit_of else 0.0 for n in names]
        ax2 = ax.twinx()
        ax2.plot(range(len(names)), worst, "k.", ms=3, label="combined sensitivity (worst candidate)")
        ax2.set_yscale("symlog", linthresh=1e-2)
        ax2.set_ylabel("combined sensitivity")
    budget = f"{plan.budget_kind} <= {plan.budget:.4g}" if plan.budget is not None else "uniform"
    ax.set_title(title or f"bits per layer ({budget})", pad=40)
    fig.tight_layout()
    return save_figure(fig, path)
