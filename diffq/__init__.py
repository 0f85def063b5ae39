"""diffq: quantize diffusers pipelines to 8/4 bits and measure what it costs and buys.

Public API: ``load_model``, ``calibrate``, ``calibrate_streamed``, ``quantize``, ``save``, ``load``, ``load_pipeline``, ``Recipe``,
``get_preset``, ``PRESETS``, ``QuantSpec``, ``generate``, ``sensitivity``, ``allocate``, ``BitPlan``.
Heavy submodules are imported lazily so ``import diffq`` is fast. The package layers (lower never
imports higher; ``tests/test_layers.py`` enforces it) are listed in README.md ("Layout").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from diffq.errors import DiffqError
from diffq.host_memory import enable_huge_pages

enable_huge_pages()  # before torch's first large CPU tensor: see diffq.host_memory

__version__ = "0.1.0"

_LAZY = {
    "calibrate": ("diffq.calibration", "calibrate"),
    "calibrate_streamed": ("diffq.quantization.streamed_calibration", "calibrate_streamed"),
    "CalibrationStats": ("diffq.calibration", "CalibrationStats"),
    "quantize": ("diffq.quantization.apply", "quantize"),
    "QuantSummary": ("diffq.quantization.summary", "QuantSummary"),
    "save": ("diffq.checkpoint", "save"),
    "load": ("diffq.checkpoint", "load"),
    "load_pipeline": ("diffq.quantization.standalone_load", "load_pipeline"),
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


class _DiffusersBackendHook(importlib.abc.MetaPathFinder):
    """Registers diffq's diffusers quantization backend right after ``diffusers.quantizers.auto`` is
    imported, so ``DiffusionPipeline.from_pretrained`` of a diffq-quantized save works after a plain
    ``import diffq`` without making ``import diffq`` import diffusers (seconds)."""

    TARGET = "diffusers.quantizers.auto"

    def find_spec(self, name, path=None, target=None):
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                from diffq.quantization.diffusers_backend import register
            except ImportError:  # the backend itself is importing diffusers: it registers when it is done
                return
            register()

        spec.loader.exec_module = exec_module
        return spec


def _install_backend_hook() -> None:
    if _DiffusersBackendHook.TARGET in sys.modules:
        try:
            from diffq.quantization.diffusers_backend import register
        except ImportError:
            return
        register()
    elif not any(isinstance(f, _DiffusersBackendHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _DiffusersBackendHook())


_install_backend_hook()


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffq' has no attribute {name!r}")
