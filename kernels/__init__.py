"""Packed low-bit GEMM kernels (Triton) and their torch reference paths.

Every public function takes ``backend="auto"`` (Triton on a supported CUDA GPU, else the torch
reference), ``"triton"`` (forced; on the CPU only under ``TRITON_INTERPRET=1``) or
``"reference"``. Shapes: x [..., K] -> y [..., N] in x.dtype; weights [N, K] (int8 / E4M3) or
packed int4 [N, K // 2] (two's-complement nibbles, element 2j in the low nibble of byte j).

Kernels: :func:`w4a16_linear` (weight-only int4), :func:`w8a8_linear` (int8 x int8),
:func:`w4a8_linear` (int4 weights on int8 MMA), :func:`w4a4_linear` (SVDQuant: int4 x int4 +
low-rank branch; pieces :func:`quantize_act_lowrank` and :func:`w4a4_gemm`), :func:`fp8_linear`
(E4M3), :func:`fp4_linear` (NVFP4 / MXFP4 weights and activations on ``tl.dot_scaled``, low-rank
branch fused; quantizer :func:`quantize_act_fp4`). Convolutions: :func:`conv2d_via_gemm` / :func:`im2col_nhwc` (NHWC patch order, matching
the core's [N, kh*kw*Cin] conv weight rows). Torch references live in
:mod:`diffq.kernels.reference`. Modules: :func:`fused_forward` / :func:`kernel_kind` /
:func:`kernel_route` map a QuantLinear / QuantConv2d to its kernel (used by their ``forward`` on
CUDA inputs through ``layer_dispatch.module_kernel``). Launch plans (repacked weights, cached per
layer and device): :func:`plan_for`. Offline compile analysis: :mod:`diffq.kernels.aot`.
"""

from diffq.kernels.conv import conv2d_via_gemm, conv_output_hw, expand_channel_vector, im2col_nhwc
from diffq.kernels.dispatch import (
    KernelUnavailableError,
    LinearPlan,
    fp8_linear,
    plan_for,
    quantize_act_lowrank,
    quantize_act_per_token,
    triton_unavailable_reason,
    w4a4_gemm,
    w4a4_linear,
    w4a4_route,
    w4a8_linear,
    w4a16_linear,
    w8a8_linear,
)
from diffq.kernels.fp4_dispatch import fp4_linear, fp4_unavailable_reason, quantize_act_fp4
from diffq.kernels.layer_dispatch import forget, fused_forward, kernel_kind, kernel_route

__all__ = [
    "KernelUnavailableError",
    "LinearPlan",
    "conv2d_via_gemm",
    "conv_output_hw",
    "expand_channel_vector",
    "forget",
    "fp4_linear",
    "fp4_unavailable_reason",
    "fp8_linear",
    "fused_forward",
    "im2col_nhwc",
    "kernel_kind",
    "kernel_route",
    "plan_for",
    "quantize_act_fp4",
    "quantize_act_lowrank",
    "quantize_act_per_token",
    "triton_unavailable_reason",
    "w4a4_gemm",
    "w4a4_linear",
    "w4a4_route",
    "w4a8_linear",
    "w4a16_linear",
    "w8a8_linear",
]
