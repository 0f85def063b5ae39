"""PEFT LoRA layers for QuantLinear / QuantConv2d, so diffusers' own LoRA calls work on a quantized
pipeline (``load_lora_weights``, ``set_adapters``, ``fuse_lora``/``unfuse_lora``,
``unload_lora_weights``, ``delete_adapters``).

- Unfused, a layer computes PEFT's ``base(x) + Σ scale_a · B_a(A_a(x))`` with ``base`` the quantized
  layer, so several adapters and their weights (``set_adapters``) work as on a dense model.
- ``merge`` (``fuse_lora``) appends each adapter's factors to the quantized layer's 16-bit branch
  (:mod:`diffq.lora.branch`) and keeps the branch it replaced; ``unmerge`` (``unfuse_lora``) puts
  that branch back, bit for bit. The 4/8-bit codes are never touched (PEFT's own merge would write
  into ``.weight``, which on a quantized layer is a temporary dequantized copy: the LoRA would be
  silently dropped).
- ``unload_lora_weights`` swaps the PEFT layer for its base layer, as for dense layers: a fused
  LoRA stays in the branch (diffusers' "fuse, then unload" bakes it in), an unfused one is gone.

How PEFT finds these classes: PEFT picks a LoRA layer type with a list of dispatchers; third-party
layer types can only be added per config (``LoraConfig._register_custom_module``), and diffusers
builds that config inside ``load_lora_weights``. So :func:`install_dispatch` puts one dispatcher in
front of PEFT's own (``LoraModel._create_new_module``), once, which claims QuantLinear / QuantConv2d
and hands every other module to PEFT unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from diffq.errors import DiffqError
from diffq.lora.branch import append_to_branch, branch_factors, lora_rows, restore_branch
from diffq.modules import QuantConv2d, QuantLinear


class _BranchMerge:
    """merge/unmerge of a PEFT LoRA layer into the quantized base layer's 16-bit branch."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        saved = self.__dict__.setdefault("_diffq_premerge", {})
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise DiffqError(
                    f"adapter {name!r} is a LoRA variant (e.g. DoRA) that cannot be fused into a quantized layer; "
                    f"keep it unfused (it still runs beside the layer)"
                )
            with torch.no_grad():
                a_rows, b = lora_rows(self.lora_A[name].weight, self.lora_B[name].weight)
                down, up = branch_factors(base, a_rows, b, float(self.scaling[name]))
                bias = None
                if self.lora_bias[name]:
                    if base.bias is None:
                        raise DiffqError(f"adapter {name!r} has a LoRA bias, but the quantized layer has no bias")
                    bias = base.bias + (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
                if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                before = append_to_branch(base, down, up)
                saved[name] = (before, base.bias)
                if bias is not None:
                    base.bias = bias.contiguous()
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        saved = self.__dict__.setdefault("_diffq_premerge", {})
        while self.merged_adapters:  # last merged first, so each restore is exact
            name = self.merged_adapters.pop()
            if name in saved:
                before, bias = saved.pop(name)
                restore_branch(base, before)
                base.bias = bias

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features


class QuantLoraLinear(_BranchMerge, lora_layer.Linear):
    """PEFT LoRA around a QuantLinear (PEFT's Linear forward; merge into the 16-bit branch)."""

    def __repr__(self) -> str:
        return "diffq." + nn.Module.__repr__(self)


class QuantLoraConv2d(_BranchMerge, lora_layer.Conv2d):
    """PEFT LoRA around a QuantConv2d: A is a conv with the base layer's kernel, stride, padding and
    dilation, B a 1x1 conv (PEFT's conv LoRA layout); merge into the 16-bit branch."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self._kernel_dim = 4
        self.conv_fn = F.conv2d
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        variant = self.resolve_lora_variant(config=config)
        if variant is not None:
            raise DiffqError("LoRA variants (e.g. DoRA) are not supported on quantized convolutions")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                              base.dilation, bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, 1, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``[N, Cin, kh, kw]`` update (for inspection; merging never builds it)."""
        base = self.get_base_layer()
        a_rows, b = lora_rows(self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        kh, kw = base.kernel_size
        delta = (b @ a_rows * self.scaling[adapter]).reshape(base.out_channels, kh, kw, base.in_channels)
        return delta.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return "diffq." + nn.Module.__repr__(self)


def dispatch_quantized(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module | None:
    """The LoRA layer for a QuantLinear / QuantConv2d target, else None (PEFT decides)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear):
        return QuantLoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, QuantConv2d):
        return QuantLoraConv2d(target, adapter_name, config=config, **kwargs)
    return None


def install_dispatch() -> None:
    """Put :func:`dispatch_quantized` in front of PEFT's dispatchers (idempotent)."""
    current = LoraModel.__dict__["_create_new_module"]
    fn = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(fn, "_diffq_dispatch", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_quantized(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else fn(lora_config, adapter_name, target, **kwargs)

    _create_new_module._diffq_dispatch = True
    _create_new_module.__doc__ = fn.__doc__
    LoraModel._create_new_module = staticmethod(_create_new_module)
