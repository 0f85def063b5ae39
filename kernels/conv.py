"""Convolutions on the GEMM kernels: NHWC im2col in the core's weight order.

The core stores a conv weight [N, Cin, kh, kw] as rows [N, kh*kw*Cin] (channel fastest, i.e.
``weight.permute(0, 2, 3, 1)``), so quantization groups run along input channels. A patch row
must use the same order: element ``(i*kw + j)*Cin + c`` is input channel c at kernel tap (i, j).

Paths used by :func:`conv2d_via_gemm`:
* 1x1 kernel, no padding (any stride): a channels-last reshape (after a strided slice when
  stride > 1); no copy of patches. A "token" is one pixel, exactly like QuantConv2d's reference.
* anything else: :func:`im2col_nhwc` materializes [B*Ho*Wo, kh*kw*Cin]. A "token" is then a
  whole patch: per-token activation scales cover kh*kw*Cin values (the reference quantizes per
  pixel over Cin), while per-group scales with a group size dividing Cin cover the same values
  as per-pixel groups. Zero padding commutes with smoothing (0 / s = 0).

Per-channel vectors that act on the input (``smooth``) must be expanded to K = kh*kw*Cin with
:func:`expand_channel_vector`; ``lr_down`` is stored by the core as [kh*kw*Cin, r] already.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffq.errors import ShapeError

IntPair = int | tuple[int, int]


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ShapeError(f"{name} must be an int or a pair (h, w), got {v!r}")
    return (int(v[0]), int(v[1]))


def _paddings(
    padding: IntPair | str, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """-> (top, bottom, left, right) as nn.Conv2d pads ('same' puts the odd pixel at the end)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ShapeError(f"padding='same' needs stride 1 (as nn.Conv2d), got stride {stride}")
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, str):
        raise ShapeError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    return (ph, ph, pw, pw)


def conv_output_hw(
    h: int, w: int, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1
) -> tuple[int, int]:
    """Output (Ho, Wo) of a conv with these settings on an h x w input."""
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    t, b, left, right = _paddings(padding, k, s, d)
    ho = (h + t + b - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + left + right - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return ho, wo


def im2col_nhwc(
    x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1
) -> torch.Tensor:
    """x [B, Cin, H, W] -> patches [B*Ho*Wo, kh*kw*Cin] with channel-fastest columns (the core's
    conv weight order), rows in (b, ho, wo) order. One copy of the padded input in NHWC, one of
    the patches."""
    if x.dim() != 4:
        raise ShapeError(f"im2col_nhwc expects x [B, Cin, H, W], got {tuple(x.shape)}")
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    b, c, h, w = x.shape
    ho, wo = conv_output_hw(h, w, k, s, padding, d)
    if ho <= 0 or wo <= 0:
        raise ShapeError(f"conv input {h}x{w} is smaller than the (dilated) kernel {k} with padding {padding!r}")
    t, bot, left, right = _paddings(padding, k, s, d)
    xp = F.pad(x, (left, right, t, bot)).permute(0, 2, 3, 1).contiguous()  # [B, Hp, Wp, C]
    sb, sh, sw, sc = xp.stride()
    patches = xp.as_strided((b, ho, wo, k[0], k[1], c), (sb, sh * s[0], sw * s[1], sh * d[0], sw * d[1], sc))
    return patches.reshape(b * ho * wo, k[0] * k[1] * c)


def expand_channel_vector(v: torch.Tensor, kernel_size: IntPair) -> torch.Tensor:
    """Per-input-channel vector [Cin] -> [kh*kw*Cin] matching :func:`im2col_nhwc` columns."""
    kh, kw = _pair(kernel_size, "kernel_size")
    return v.repeat(kh * kw)


def conv2d_via_gemm(
    x: torch.Tensor,
    linear_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Conv2d (groups=1) through a GEMM: x [B, Cin, H, W] -> [B, N, Ho, Wo].

    ``linear_fn`` maps patch rows [M, kh*kw*Cin] to [M, N], e.g.
    ``lambda a: w4a4_linear(a, qweight, wscale, 64, bias, lr_down=..., lr_up=..., smooth=s_k)``.
    1x1 unpadded kernels take the channels-last reshape path, everything else im2col (see the
    module docstring for what that means for per-token scales).
    """
    if x.dim() != 4:
        raise ShapeError(f"conv2d_via_gemm expects x [B, Cin, H, W], got {tuple(x.shape)}")
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    b, c, h, w = x.shape
    ho, wo = conv_output_hw(h, w, k, s, padding, d)
    if k == (1, 1) and _paddings(padding, k, s, d) == (0, 0, 0, 0):
        xs = x[:, :, :: s[0], :: s[1]] if s != (1, 1) else x
        rows = xs.permute(0, 2, 3, 1).reshape(b * ho * wo, c)
    else:
        rows = im2col_nhwc(x, k, s, padding, d)
    y = linear_fn(rows)
    return y.reshape(b, ho, wo, y.shape[-1]).permute(0, 3, 1, 2)
