"""Quantization methods, each a small pure step: clipping search, smoothing, low-rank split."""
