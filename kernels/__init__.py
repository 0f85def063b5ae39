"""Packed low-bit GEMM kernels (Triton) and their torch reference paths."""
