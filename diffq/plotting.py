"""Matplotlib figures outside pyplot, saved atomically: the one figure helper for every plot diffq draws.

No pyplot and no global backend change, so plotting from diffq never disturbs a notebook's inline
figures; PNGs are written to a temporary name and renamed (:mod:`diffq.io`).
"""

from __future__ import annotations

import os
from pathlib import Path

from diffq.io import atomic_path


def new_figure(figsize: tuple[float, float], dpi: int = 110):
    """A matplotlib ``Figure`` on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **({"dpi": dpi} if dpi else {}))
    return Path(path)
