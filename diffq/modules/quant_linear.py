"""Quantized replacements for nn.Linear and nn.Conv2d.

``y = Q_a(x / s) · deq(W_q)ᵀ + ((x / s) · L1) · L2 + b``:
- ``s`` [K] smoothing factors (SmoothQuant; absent = 1), folded into the stored weight;
- ``Q_a`` the activation quantizer slot (absent = weight-only);
- ``L1`` [K, r], ``L2`` [r, N] the 16-bit low-rank branch that carries the outliers (SVDQuant),
  also the place a LoRA update goes.
Conv weights ``[N, Cin, kh, kw]`` are stored flattened as ``[N, kh·kw·Cin]`` (channel-fastest,
NHWC im2col order) so that groups run along input channels.

``forward`` calls :func:`diffq.kernels` when its formats match a kernel and that package is
available, else the torch reference path (dequantize, then dense op). Both compute the same math.
It has no host syncs and no branch on tensor values, so it traces under
``torch.compile(fullgraph=True)``.

``state_dict()`` also lists ``<layer>.weight`` as a shape-only *meta* tensor (``[N, K]`` or
``[N, Cin, kh, kw]``, no data): diffusers' LoRA loaders look layers up by that key (FLUX's
``load_lora_weights`` reads ``state_dict()[name + ".weight"].shape``). ``load_state_dict`` drops
that placeholder again; diffq's own save paths never write it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffq.errors import ShapeError
from diffq.formats import QTensor
from diffq.modules.activation import ActQuantizer
from diffq.modules.qweight import dequantize_weight, register_qweight
from diffq.sizes import module_bytes


def _fused_kernel(module: nn.Module, x: torch.Tensor):
    """The Triton forward for ``module`` on CUDA inputs when its formats match a kernel, else None.

    CPU inputs always get None (the torch reference math below stays the CPU path); so does a
    build without the kernels package.
    """
    if not x.is_cuda:
        return None
    try:
        from diffq.kernels.layer_dispatch import module_kernel
    except ImportError:
        return None
    return module_kernel(module, x)


def _weight_placeholder(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post hook: a meta ``weight`` of the dense layer's shape (see the module docstring)."""
    state_dict[prefix + "weight"] = torch.empty(module.dense_shape, dtype=module.compute_dtype, device="meta")


def _drop_weight_placeholder(module, state_dict, prefix, *args) -> None:
    """Load pre hook: forget the placeholder; a real ``weight`` stays and is refused as unexpected."""
    w = state_dict.get(prefix + "weight")
    if isinstance(w, torch.Tensor) and w.is_meta:
        del state_dict[prefix + "weight"]


def is_weight_placeholder(name: str, t: torch.Tensor) -> bool:
    """Whether a state-dict entry is the shape-only ``weight`` of a quantized layer."""
    return name.rpartition(".")[2] == "weight" and t.is_meta


class _QuantBase(nn.Module):
    in_features: int
    out_features: int

    def _init_common(
        self,
        q: QTensor,
        bias: torch.Tensor | None,
        act: ActQuantizer | None,
        lr_down: torch.Tensor | None,
        lr_up: torch.Tensor | None,
        smooth: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        register_qweight(self, q)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).contiguous().clone())
        self.register_buffer("lr_down", None if lr_down is None else lr_down.detach().to(dtype).contiguous())
        self.register_buffer("lr_up", None if lr_up is None else lr_up.detach().to(dtype).contiguous())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().contiguous())
        self.act = act
        self.compute_dtype = dtype
        self.register_state_dict_post_hook(_weight_placeholder)
        self.register_load_state_dict_pre_hook(_drop_weight_placeholder)

    @property
    def rank(self) -> int:
        return 0 if self.lr_down is None else int(self.lr_down.shape[1])

    def storage_bytes(self) -> int:
        """Bytes this module holds (codes, scales, zeros, bias, low-rank, smoothing, act tables)."""
        return module_bytes(self)

    def dense_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the dense layer it replaced, in ``dtype``."""
        n = self.out_features * self.in_features * self.kernel_numel
        return (n + (self.out_features if self.bias is not None else 0)) * torch.empty(0, dtype=dtype).element_size()

    kernel_numel = 1

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of the dense weight this layer replaced."""
        return (self.out_features, self.in_features)

    def set_lowrank(self, lr_down: torch.Tensor | None, lr_up: torch.Tensor | None) -> None:
        """Replace the 16-bit branch (used by LoRA fusion); shapes [K', r] and [r, N]."""
        dev, dt = self.qweight.device, self.compute_dtype
        self.lr_down = None if lr_down is None else lr_down.detach().to(dev, dt).contiguous()
        self.lr_up = None if lr_up is None else lr_up.detach().to(dev, dt).contiguous()

    def _quant_input(self, x_s: torch.Tensor) -> torch.Tensor:
        return x_s if self.act is None else self.act(x_s)


class QuantLinear(_QuantBase):
    """Drop-in for ``nn.Linear``: input ``[..., K]`` -> output ``[..., N]`` in the input dtype."""

    def __init__(
        self,
        q: QTensor,
        *,
        bias: torch.Tensor | None = None,
        act: ActQuantizer | None = None,
        lr_down: torch.Tensor | None = None,
        lr_up: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        n, k = q.codes.shape
        self.in_features, self.out_features = k, n
        self._init_common(q, bias, act, lr_down, lr_up, smooth, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"QuantLinear expects [..., {self.in_features}] input, got {tuple(x.shape)}")
        kernel = _fused_kernel(self, x)
        if kernel is not None:
            return kernel(self, x)
        x_s = x if self.smooth is None else x / self.smooth.to(x.dtype)
        w = dequantize_weight(self, x.dtype)
        y = F.linear(self._quant_input(x_s), w, None if self.bias is None else self.bias.to(x.dtype))
        if self.lr_down is not None:
            y = y + (x_s @ self.lr_down.to(x.dtype)) @ self.lr_up.to(x.dtype)
        return y

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for code that inspects ``.weight`` (dtype/device/shape); costs a dequantize."""
        return dequantize_weight(self, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w={self.wspec.describe()}, rank={self.rank}"


class QuantConv2d(_QuantBase):
    """Drop-in for ``nn.Conv2d`` (groups=1): input ``[B, Cin, H, W]`` -> ``[B, N, Ho, Wo]``."""

    def __init__(
        self,
        q: QTensor,
        *,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] | str,
        dilation: tuple[int, int],
        bias: torch.Tensor | None = None,
        act: ActQuantizer | None = None,
        lr_down: torch.Tensor | None = None,
        lr_up: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        n, kflat = q.codes.shape
        kh, kw = kernel_size
        if kflat != kh * kw * in_channels:
            raise ShapeError(f"conv codes have K={kflat}, expected kh*kw*Cin={kh * kw * in_channels}")
        self.in_channels, self.out_channels = in_channels, n
        self.in_features, self.out_features = in_channels, n
        self.kernel_size, self.stride, self.padding, self.dilation = tuple(kernel_size), stride, padding, dilation
        self.kernel_numel = kh * kw
        self._init_common(q, bias, act, lr_down, lr_up, smooth, dtype)

    def _as_conv_weight(self, w2d: torch.Tensor, cout: int) -> torch.Tensor:
        kh, kw = self.kernel_size
        return w2d.reshape(cout, kh, kw, self.in_channels).permute(0, 3, 1, 2)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"QuantConv2d expects [B, {self.in_channels}, H, W] input, got {tuple(x.shape)}")
        kernel = _fused_kernel(self, x)
        if kernel is not None:
            return kernel(self, x)
        x_s = x if self.smooth is None else x / self.smooth.to(x.dtype).view(1, -1, 1, 1)
        xq = x_s
        if self.act is not None:
            xq = self.act(x_s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        w = self._as_conv_weight(dequantize_weight(self, x.dtype), self.out_channels)
        y = self._conv(xq, w, None if self.bias is None else self.bias.to(x.dtype))
        if self.lr_down is not None:
            r = self.lr_down.shape[1]
            down = self._as_conv_weight(self.lr_down.to(x.dtype).t(), r)
            h = self._conv(x_s, down, None)
            y = y + torch.einsum("brhw,rn->bnhw", h, self.lr_up.to(x.dtype))
        return y

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        return self._as_conv_weight(dequantize_weight(self, self.compute_dtype), self.out_channels)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}->{self.out_channels}, k={self.kernel_size}, w={self.wspec.describe()}, "
            f"rank={self.rank}"
        )


def conv_weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d weight [N, Cin, kh, kw] -> rows [N, kh·kw·Cin] in the stored (channel-fastest) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

