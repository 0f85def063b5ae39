"""diffq: quantize diffusers pipelines to 8/4 bits and measure what it costs and buys.

Public API: ``calibrate``, ``quantize``, ``save``, ``load``, ``Recipe``, ``get_preset``,
``PRESETS``, ``QuantSpec``. Heavy submodules are imported lazily so ``import diffq`` is fast.
"""

from __future__ import annotations

import importlib

from diffq.errors import DiffqError

__version__ = "0.1.0"

_LAZY = {
    "calibrate": ("diffq.calibration", "calibrate"),
    "CalibrationStats": ("diffq.calibration", "CalibrationStats"),
    "quantize": ("diffq.api", "quantize"),
    "QuantSummary": ("diffq.summary", "QuantSummary"),
    "save": ("diffq.checkpoint", "save"),
    "load": ("diffq.checkpoint", "load"),
    "Recipe": ("diffq.recipe", "Recipe"),
    "load_recipe_files": ("diffq.recipe", "load_recipe_files"),
    "get_preset": ("diffq.presets", "get_preset"),
    "PRESETS": ("diffq.presets", "PRESETS"),
    "QuantSpec": ("diffq.formats", "QuantSpec"),
    "generate": ("diffq.generation", "generate"),
    "sensitivity": ("diffq.sensitivity_analysis", "sensitivity"),
    "allocate": ("diffq.allocation", "allocate"),
    "BitPlan": ("diffq.allocation", "BitPlan"),
}

__all__ = ["DiffqError", "__version__"]
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffq' has no attribute {name!r}")
