"""Torch reference for every kernel: the same integer math, written plainly.

These run on any device (CPU included) and define what the Triton kernels must compute. Inputs
are already validated and flattened by :mod:`diffq.kernels.dispatch`: activations ``x2 [M, K]``,
weights ``[N, K]`` (int8 / float8_e4m3fn) or ``[N, K // 2]`` (uint8, packed int4), scales fp16 or
fp32 (upcast here). Outputs are ``[M, N]`` in the activation dtype.

Quantization arithmetic is part of the contract too: ``x / smooth`` is ``x * (1 / smooth)``
and codes are ``round(x * (1 / scale))`` with ``scale = amax / qmax`` and both reciprocals IEEE
fp32 (the kernels multiply instead of dividing per element). A code can differ from the core's
``round(x / scale)`` by one step only where ``x / scale`` is within one fp32 ulp of a rounding
boundary.

Accumulation order is part of the contract, so that the kernels can be checked tightly:
* integer GEMMs sum exactly (``torch._int_mm`` or an fp64 matmul, both exact for int8 products);
* grouped kernels add ``int_dot_g * xscale * wscale`` to an fp32 accumulator group by group;
* scales multiply in the order ``acc * x_scale * w_scale``, then the low-rank term, then bias.
"""

from __future__ import annotations

import torch

from diffq.formats import SCALE_MIN, pack_int4, unpack_int4
from diffq.formats.floating import FP_MAX

FP8_MAX = FP_MAX["fp8_e4m3"]


def int_qmax(bits: int) -> int:
    """Largest symmetric code: 127 for int8, 7 for int4."""
    return 2 ** (bits - 1) - 1


def reciprocal(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``1 / t`` (IEEE division): the per-layer / per-row factor the kernels multiply by."""
    return 1.0 / t.float()


def smooth_input(x2: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (any float dtype) -> fp32 ``x * (1 / smooth)`` (SmoothQuant migration; smooth [K])."""
    xf = x2.float()
    return xf if smooth is None else xf * reciprocal(smooth)


def _static_scale(act_scale: torch.Tensor, m: int, groups: int) -> torch.Tensor:
    s = act_scale.float().reshape(1, -1)
    return s.expand(m, groups)


def quantize_act_int(
    x2: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (group_size None) or per-group activation quantization.

    x2 [M, K] -> (codes int8 [M, K] in [-qmax, qmax], scale fp32 [M, K // group_size or 1]).
    ``act_scale`` (numel 1, or K // group_size) replaces the dynamic ``amax / qmax``.
    """
    xf = smooth_input(x2, smooth)
    m, k = xf.shape
    g = k if group_size is None else group_size
    groups = k // g if g else 0
    q = int_qmax(bits)
    xg = xf.reshape(m, groups, g)
    if act_scale is None:
        scale = xg.abs().amax(-1) / q if xg.numel() else xg.new_zeros(m, groups)
    else:
        scale = _static_scale(act_scale, m, groups)
    scale = scale.clamp_min(SCALE_MIN).contiguous()
    codes = torch.round(xg * reciprocal(scale).unsqueeze(-1)).clamp(-q, q).to(torch.int8).reshape(m, k)
    return codes, scale


def quantize_act_fp8(
    x2: torch.Tensor, *, act_scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (E4M3 codes [M, K], per-token scale fp32 [M, 1]); scale = amax / 448."""
    xf = smooth_input(x2, smooth)
    m = xf.shape[0]
    if act_scale is None:
        scale = xf.abs().amax(-1, keepdim=True) / FP8_MAX if xf.numel() else xf.new_zeros(m, 1)
    else:
        scale = _static_scale(act_scale, m, 1)
    scale = scale.clamp_min(SCALE_MIN).contiguous()
    codes = (xf * reciprocal(scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def quantize_act_lowrank(
    x2: torch.Tensor,
    group_size: int,
    *,
    lr_down: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SVDQuant input stage: x2 [M, K] -> (packed int4 [M, K//2] uint8, scale [M, K//G] fp32,
    down = (x / smooth) @ lr_down, fp32 [M, r] or None)."""
    xs = smooth_input(x2, smooth)
    codes, scale = quantize_act_int(xs, 4, group_size, act_scale=act_scale)
    down = None if lr_down is None else xs @ lr_down.float()
    return pack_int4(codes), scale, down


def _int_mm_allowed(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type != "cuda":
        return True
    m, k = a.shape
    return m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: a [M, K] int8, b [N, K] int8 -> int32 [M, N] (= a @ b.T).

    Uses ``torch._int_mm`` where the backend accepts the shape (CUDA needs M > 16 and K, N
    multiples of 8), else an fp64 matmul, exact because |sum| <= 127^2 * K << 2^53.
    """
    if a.shape[0] and _int_mm_allowed(a, b):
        try:
            return torch._int_mm(a.contiguous(), b.contiguous().t())
        except RuntimeError:
            pass
    return (a.double() @ b.double().t()).to(torch.int32)


def _finish(acc: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def dequantize_int4_weight(qweight: torch.Tensor, wscale: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed [N, K//2] + group scales [N, K//G] -> fp32 [N, K]."""
    codes = unpack_int4(qweight).float()
    n, k = codes.shape
    return (codes.reshape(n, k // group_size, group_size) * wscale.float().unsqueeze(-1)).reshape(n, k)


def w4a16(
    x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only int4: dequantize to fp32, matmul in fp32, cast to x2.dtype."""
    w = dequantize_int4_weight(qweight, wscale, group_size)
    return _finish(x2.float() @ w.t(), bias, x2.dtype)


def w8a8(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 per-token x int8 per-channel: int32 GEMM, then ``acc * xs[m] * ws[n]`` (+ bias)."""
    xq, xs = quantize_act_int(x2, 8, None, act_scale=act_scale, smooth=smooth)
    acc = int_matmul(xq, qweight).float()
    return _finish(acc * xs * wscale.float().reshape(1, -1), bias, x2.dtype)


def _grouped_int_gemm(
    xq: torch.Tensor, wq: torch.Tensor, group_size: int, wscale: torch.Tensor, xscale: torch.Tensor | None
) -> torch.Tensor:
    """sum_g int_dot_g * [xscale[m, g]] * wscale[n, g] accumulated in fp32, group by group."""
    m, k = xq.shape
    acc = torch.zeros(m, wq.shape[0], dtype=torch.float32, device=xq.device)
    ws = wscale.float()
    for g in range(k // group_size):
        sl = slice(g * group_size, (g + 1) * group_size)
        d = int_matmul(xq[:, sl].contiguous(), wq[:, sl].contiguous()).float()
        if xscale is not None:
            d = d * xscale[:, g : g + 1]
        acc = acc + d * ws[:, g].unsqueeze(0)
    return acc


def w4a8(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """int4 group weights x int8 per-token activations; per-group int32 dots times w-scale, x-scale last."""
    xq, xs = quantize_act_int(x2, 8, None, act_scale=act_scale, smooth=smooth)
    acc = _grouped_int_gemm(xq, unpack_int4(qweight), group_size, wscale, None)
    return _finish(acc * xs, bias, x2.dtype)


def w4a4_gemm(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main W4A4 GEMM on already quantized input: packed xq [M, K//2], xscale [M, K//G] ->
    ``sum_g dot_g * xs[m,g] * ws[n,g] + down @ lr_up + bias`` in ``out_dtype``."""
    acc = _grouped_int_gemm(unpack_int4(xq), unpack_int4(qweight), group_size, wscale, xscale)
    if down is not None:
        acc = acc + down.float() @ lr_up.float()
    return _finish(acc, bias, out_dtype)


def w4a4(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    *,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """SVDQuant layer: int4 x int4 per group + 16-bit low-rank branch on the smoothed input."""
    xq, xs, down = quantize_act_lowrank(x2, group_size, lr_down=lr_down, smooth=smooth, act_scale=act_scale)
    return w4a4_gemm(xq, xs, qweight, wscale, group_size, out_dtype=x2.dtype, bias=bias, down=down, lr_up=lr_up)


def fp8(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    act_scale: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """E4M3 x E4M3 with fp32 accumulation (products of E4M3 values are exact in fp32)."""
    xq, xs = quantize_act_fp8(x2, act_scale=act_scale, smooth=smooth)
    acc = xq.float() @ qweight.float().t()
    return _finish(acc * xs * wscale.float().reshape(1, -1), bias, x2.dtype)
