"""Whether to draw progress bars: on unless the caller says no or ``DIFFQ_NO_PROGRESS=1`` is set."""

from __future__ import annotations

import os


def progress_enabled(progress: bool) -> bool:
    return progress and os.environ.get("DIFFQ_NO_PROGRESS", "") in ("", "0")
