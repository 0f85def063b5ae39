"""Every error diffq raises on purpose is a ``DiffqError``; each subclass names a kind of bad input.

Messages say what is wrong *and* what to do about it, because a user who hits one is usually
hours into a run and needs the fix, not a stack trace.
"""

from __future__ import annotations


class DiffqError(Exception):
    """Base class of every error diffq raises deliberately."""


class FormatError(DiffqError, ValueError):
    """A number format or granularity that does not exist or does not fit the tensor."""


class QuantizationError(DiffqError, ValueError):
    """Input a quantizer cannot represent: NaN/Inf values, empty tensors where data is needed."""


class RecipeError(DiffqError, ValueError):
    """A recipe, preset name or bit plan that is unknown or out of range."""


class UnsupportedModelError(DiffqError, TypeError):
    """A pipeline or denoiser class that no adapter supports."""


class CalibrationError(DiffqError, ValueError):
    """Calibration that cannot run (no prompts) or produced unusable statistics (NaN/Inf)."""


class CheckpointError(DiffqError, ValueError):
    """A saved file that is missing, truncated, corrupted, or made for another base model."""


class MissingWeightsError(DiffqError, FileNotFoundError):
    """Weights a metric or model needs are not available offline."""


class ShapeError(DiffqError, ValueError):
    """Tensors whose shapes disagree with what a module or kernel expects."""
