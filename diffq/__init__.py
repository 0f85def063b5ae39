"""diffq: quantize diffusers pipelines to 8/4 bits and measure what it costs and buys.

Public API: ``load_model``, ``calibrate``, ``quantize``, ``save``, ``load``, ``Recipe``,
``get_preset``, ``PRESETS``, ``QuantSpec``, ``generate``, ``sensitivity``, ``allocate``, ``BitPlan``.
Heavy submodules are imported lazily so ``import diffq`` is fast. The package layers (lower never
imports higher; ``tests/test_layers.py`` enforces it) are listed in README.md ("Layout").
"""

from __future__ import annotations

import importlib

from diffq.errors import DiffqError

__version__ = "0.1.0"

_LAZY = {
    "calibrate": ("diffq.calibration", "calibrate"),
    "CalibrationStats": ("diffq.calibration", "CalibrationStats"),
    "quantize": ("diffq.quantization.apply", "quantize"),
    "QuantSummary": ("diffq.quantization.summary", "QuantSummary"),
    "save": ("diffq.checkpoint", "save"),
    "load": ("diffq.checkpoint", "load"),
    "Recipe": ("diffq.quantization.recipe", "Recipe"),
    "load_recipe_files": ("diffq.quantization.presets", "load_recipe_files"),
    "get_preset": ("diffq.quantization.presets", "get_preset"),
    "PRESETS": ("diffq.quantization.presets", "PRESETS"),
    "QuantSpec": ("diffq.formats", "QuantSpec"),
    "generate": ("diffq.generation", "generate"),
    "sensitivity": ("diffq.mixed.measure", "sensitivity"),
    "allocate": ("diffq.mixed.allocate", "allocate"),
    "BitPlan": ("diffq.mixed.plan", "BitPlan"),
    "QuantState": ("diffq.quantization.state", "QuantState"),
    "load_model": ("diffq.apps.models", "load_model"),
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
