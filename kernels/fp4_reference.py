"""Torch reference of the FP4 (NVFP4 / MXFP4) W4A4 layer: what :mod:`diffq.kernels.fp4_gemm` computes.

Formats (``diffq.formats``): E2M1 codes are 4-bit sign-magnitude (bit 3 sign, bits 0-2 the index
of the magnitude in 0, 0.5, 1, 1.5, 2, 3, 4, 6), packed two per byte along K, element ``2j`` in
the low nibble of byte ``j`` (exactly the operand ``tl.dot_scaled(..., "e2m1", ...)`` reads).

* **NVFP4**: blocks of 16 along K with FP8 E4M3 block scales ``[rows, K/16]`` (float8_e4m3fn,
  positive) under one fp32 per-tensor scale ``g`` (``amax / (6 * 448)``, at least ``2^-32``).
* **MXFP4**: blocks of 32 with E8M0 scales ``[rows, K/32]`` (uint8 biased exponents, ``2^(s-127)``).

Activation quantization is the core's rule (``diffq.formats.quantize``), step for step in fp32:
``a = amax|x_block|``, ``raw = a / 6``; NVFP4: ``g = max(amax|x| / 2688, 2^-32)`` over the whole
input, block scale ``e4m3(clamp(raw / g, 2^-9, 448))``, effective scale ``s = e4m3 * g``; MXFP4:
``s = 2^ceil(log2 max(raw, 2^-127))``; codes ``e2m1(x / s)`` (ties to the even magnitude,
saturating at 6). The input is the module's ``x / smooth.to(x.dtype)`` in x's dtype (the
smoothing of ``QuantLinear.forward``), so codes and scales equal the module's fake quantization
bit for bit.

GEMM contract (the order the kernels sum in, so that the interpreter check can be bit-exact):
``acc = sum over K-blocks b, in order, of P_b`` where ``P_b[m, n] = sum_k code_x * sx_b * code_w *
sw_b`` is exact in fp32 (every product has at most 12 significant bits and a block's sum at most
13); then ``y = acc * (g_x * g_w) + (x_s @ L1) @ L2 + bias`` (``g = 1`` for MXFP4), cast to the
output dtype.
"""

from __future__ import annotations

import torch

from diffq.formats import SCALE_MIN
from diffq.formats.floating import E2M1_VALUES, E4M3_MIN_SUBNORMAL, e2m1_encode, e8m0_decode, e8m0_scale

#: block size and scale storage per FP4 flavour
BLOCK = {"nvfp4": 16, "mxfp4": 32}
E2M1_MAX, E4M3_MAX = 6.0, 448.0
#: the NVFP4 tensor scale divisor: E2M1 max x E4M3 max
NV_GLOBAL_DIV = E2M1_MAX * E4M3_MAX


def smooth_like_module(x2: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> ``x / smooth.to(x.dtype)`` in x's dtype (QuantLinear's smoothing), as fp32."""
    if smooth is None:
        return x2.float()
    return (x2 / smooth.to(x2.dtype)).float()


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 per-tensor scale from the tensor's abs-max: ``max(amax / 2688, 2^-32)`` fp32 [1]."""
    return (amax.float().reshape(1) / NV_GLOBAL_DIV).clamp_min(SCALE_MIN)


def quantize_act(
    xs: torch.Tensor, fmt: str, g: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 xs [M, K] (already smoothed) -> (packed codes uint8 [M, K/2], stored block scales
    [M, K/B] (float8_e4m3fn for NVFP4, uint8 for MXFP4), NVFP4 tensor scale fp32 [1] or None).

    ``g``: the NVFP4 tensor scale to use (default: from ``xs``'s own abs-max)."""
    m, k = xs.shape
    b = BLOCK[fmt]
    xg = xs.reshape(m, k // b, b)
    a = xg.abs().amax(-1) if xg.numel() else xg.new_zeros(m, k // b)
    raw = a / E2M1_MAX
    if fmt == "nvfp4":
        if g is None:
            g = global_scale(a.amax() if a.numel() else a.new_zeros(()))
        stored = (raw / g).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)
        scale = stored.float() * g
    else:
        stored, scale = e8m0_scale(raw)
        g = None
    codes = e2m1_encode(xg / scale.unsqueeze(-1)).reshape(m, k)
    return pack_e2m1(codes), stored, g


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (0..15) -> [..., K/2], element 2j in the low nibble (diffq.formats layout)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> fp32 E2M1 values [..., K] (unscaled)."""
    p = packed.to(torch.int64)
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    mag = E2M1_VALUES.to(packed.device)[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


def decode_block_scales(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """Stored block scales -> their fp32 values (without the NVFP4 tensor scale)."""
    return stored.float() if fmt == "nvfp4" else e8m0_decode(stored)


def blockwise_gemm(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, fmt: str
) -> torch.Tensor:
    """sum over K-blocks, in order, of the exact fp32 block dots -> acc fp32 [M, N].

    xq [M, K/2], xs [M, K/B]; wq [N, K/2], ws [N, K/B] (stored forms)."""
    b = BLOCK[fmt]
    xv = unpack_e2m1(xq)
    wv = unpack_e2m1(wq)
    sx, sw = decode_block_scales(xs, fmt), decode_block_scales(ws, fmt)
    m, k = xv.shape
    acc = torch.zeros(m, wv.shape[0], dtype=torch.float32, device=xq.device)
    for blk in range(k // b):
        sl = slice(blk * b, (blk + 1) * b)
        xb = xv[:, sl] * sx[:, blk : blk + 1]  # exact: 2 x 4 significant bits
        wb = wv[:, sl] * sw[:, blk : blk + 1]
        acc = acc + (xb.double() @ wb.double().t()).float()  # exact block sum, then one fp32 add
    return acc


def fp4_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    fmt: str,
    *,
    out_dtype: torch.dtype,
    alpha: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """``acc * alpha + down @ lr_up + bias`` in ``out_dtype`` (alpha: fp32 [1], ``g_x * g_w``)."""
    acc = blockwise_gemm(xq, xs, wq, ws, fmt)
    if alpha is not None:
        acc = acc * alpha
    if down is not None:
        acc = acc + down.to(lr_up.dtype).float() @ lr_up.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def fp4_linear(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    bias: torch.Tensor | None = None,
    *,
    wscale_global: torch.Tensor | None = None,
    lr_down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act_global: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FP4 W4A4 layer on rows x2 [M, K] -> [M, N] in x2.dtype (see the module docstring).

    ``act_global``: NVFP4 activation tensor scale to use instead of the rows' own (a conv computes
    it on its whole input, as the module does, before im2col)."""
    xs = smooth_like_module(x2, smooth)
    xq, xsc, gx = quantize_act(xs, fmt, act_global)
    alpha = None
    if fmt == "nvfp4":
        alpha = gx * wscale_global.float().reshape(1)
    down = None
    if lr_down is not None:
        down = xs @ lr_down.float()
    return fp4_gemm(xq, xsc, qweight, wscale, fmt, out_dtype=x2.dtype, alpha=alpha, bias=bias, down=down, lr_up=lr_up)
