"""``fuse_qkv_projections()`` on a quantized denoiser fuses the *quantized* q/k/v layers.

diffusers fuses by concatenating ``to_q.weight``, ``to_k.weight``, ``to_v.weight`` into a new dense
``nn.Linear``; on a quantized layer ``.weight`` is a dequantized copy, so QKV would silently stop
being quantized. diffq gives every attention module of a quantized denoiser its own
``fuse_projections`` (diffusers' model-level ``fuse_qkv_projections`` calls it, then sets the fused
attention processors as usual), which builds ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` as one
QuantLinear from the parts: codes, scales and zero points concatenated along output rows, biases
concatenated, low-rank branches side by side (``L1 = [L1_q | L1_k | L1_v]``, ``L2`` block-diagonal),
so ``fused(x) == cat(q(x), k(x), v(x))`` up to float summation order.

Refused with a DiffqError naming the reason (nothing is changed): parts with different formats,
activation quantizers, smoothing factors (``shared_smoothing=False``: each layer smoothed with
its own weights) or per-tensor / NVFP4 global scales; a mix of quantized and dense parts; parts
wrapped by LoRA adapters. Unfused parts (both dense) are fused densely as diffusers would.
``diffq.save`` skips the fused copies (fuse again after loading).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from diffq.attention.processors import QuantProcessor
from diffq.errors import DiffqError
from diffq.formats import QTensor, decode_scale
from diffq.modules import ActQuantizer, QuantLinear
from diffq.modules.qweight import weight_codes
from diffq.quantization.projection_groups import projection_groups
from diffq.quantization.state import QuantState

FUSED_NAMES = ("to_qkv", "to_kv", "to_added_qkv")


def _same(tensors: list[torch.Tensor | None]) -> bool:
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and t.shape == first.shape and torch.equal(t, first) for t in tensors[1:])


def _fusable(parts: list[QuantLinear]) -> str | None:
    """Why these layers cannot be one QuantLinear, or None."""
    p0 = parts[0]
    if any(p.in_features != p0.in_features or p.wspec != p0.wspec or p.compute_dtype != p0.compute_dtype
           for p in parts):
        return "they have different input widths, weight formats or compute dtypes"
    if p0.wspec.granularity == "tensor" and not _same([p.wscale for p in parts]):
        return "their weights have one scale per tensor, and the scales differ"
    if not _same([p.wscale_global for p in parts]):
        return "their NVFP4 per-tensor scales differ (the FP8 block scales are relative to them)"
    if not _same([p.smooth for p in parts]):
        return ("each was smoothed with its own factors (SmoothQuant), so they do not share one input "
                "(quantize with shared_smoothing=True for one vector per q/k/v group)")
    acts = [p.act for p in parts]
    if any(a is None for a in acts):
        return None if all(a is None for a in acts) else "some quantize their input and some do not"
    a0 = acts[0]
    if any(getattr(a, "shift", None) is not None for a in acts):
        return "their inputs are quantized shifted (act_unsigned), which the fused layer does not carry"
    if any(a.spec != a0.spec or a.splits != a0.splits or a.static != a0.static or a.center != a0.center for a in acts):
        return "their activation quantizers differ"
    if a0.static and not (_same([a.amax for a in acts]) and _same([a.bucket_to_group for a in acts])):
        return "their calibrated activation ranges differ"
    return None


@torch.no_grad()
def fuse_quant_linears(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear with ``out(x) = cat([p(x) for p in parts], -1)``; DiffqError when impossible."""
    why = _fusable(parts)
    if why is not None:
        raise DiffqError(f"cannot fuse these quantized projections: {why}")
    p0 = parts[0]
    codes = torch.cat([weight_codes(p) for p in parts])
    stored = torch.cat([p.wscale for p in parts]) if p0.wspec.granularity != "tensor" else p0.wscale
    zero = None if p0.wzero is None else torch.cat([p.wzero for p in parts]).float()
    q = QTensor(codes=codes, scale=decode_scale(stored, p0.wspec, p0.wscale_global), spec=p0.wspec,
                shape=codes.shape, zero=zero, scale_stored=stored, global_scale=p0.wscale_global)
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.bias if p.bias is not None else p.qweight.new_zeros(p.out_features, dtype=p0.compute_dtype)
                          for p in parts])
    lr_down = lr_up = None
    if any(p.rank for p in parts):
        lr_down = torch.cat([p.lr_down if p.rank else p0.qweight.new_zeros((p.in_features, 0), dtype=p0.compute_dtype)
                             for p in parts], dim=1)
        lr_up = torch.block_diag(*[p.lr_up if p.rank else p0.qweight.new_zeros((0, p.out_features), dtype=p0.compute_dtype)
                                   for p in parts])
    act = None
    if p0.act is not None:
        a0 = p0.act
        act = ActQuantizer(a0.spec, splits=a0.splits, amax=a0.amax, bucket_to_group=a0.bucket_to_group,
                           check_finite=a0.check_finite, center=a0.center)
        act.tracker = a0.tracker
    fused = QuantLinear(q, bias=bias, act=act, lr_down=lr_down, lr_up=lr_up, smooth=p0.smooth, dtype=p0.compute_dtype)
    return fused.to(p0.qweight.device)


@torch.no_grad()
def _fuse_dense(parts: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([p.weight for p in parts])
    has_bias = any(p.bias is not None for p in parts)
    out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    out.weight.copy_(w)
    if has_bias:
        out.bias.copy_(torch.cat([p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in parts]))
    return out


def _runs_quantized_attention(attn: nn.Module) -> bool:
    proc = getattr(attn, "processor", None)
    return isinstance(proc, QuantProcessor) and proc.attend is not None


def _plan(attn: nn.Module, name: str) -> list[tuple[str, list[nn.Module]]]:
    """(fused attribute, its parts) of one attention module, or DiffqError why it cannot be fused."""
    if _runs_quantized_attention(attn):
        # diffusers would then set its fused processors, silently replacing the quantized attention
        raise DiffqError(f"cannot fuse the projections of {name or 'this attention module'}: it runs diffq's quantized "
                         f"attention (recipe attn fields), which diffusers' fused processors would replace; keep the "
                         f"projections unfused, or quantize with attn='none' to fuse them")
    plan = []
    for target, part_names in projection_groups(attn):
        parts = [getattr(attn, n) for n in part_names]
        label = f"{name}.{target}" if name else target
        if any(hasattr(p, "base_layer") for p in parts):
            raise DiffqError(f"cannot fuse {label}: its projections carry LoRA adapters; pipe.fuse_lora() and "
                             f"pipe.unload_lora_weights() first, or unload them")
        if all(isinstance(p, QuantLinear) for p in parts):
            why = _fusable(parts)
            if why is not None:
                raise DiffqError(f"cannot fuse {label}: {why}; keep the projections unfused (QKV stays quantized), "
                                 f"or quantize with a recipe without smoothing")
        elif not all(type(p) is nn.Linear for p in parts):
            raise DiffqError(f"cannot fuse {label}: some of {part_names} are quantized and some are dense (recipe "
                             f"skips); keep the projections unfused, or quantize all of them")
        plan.append((target, parts))
    return plan


@torch.no_grad()
def fuse_projections(attn: nn.Module, state: QuantState, name: str, root: nn.Module, fuse: bool = True) -> None:
    """diffusers' ``Attention.fuse_projections`` for an attention module with quantized projections.

    The first call of a ``fuse_qkv_projections()`` checks every attention module of ``root`` first, so
    a refusal leaves the whole denoiser unfused."""
    if not getattr(attn, "_supports_qkv_fusion", True) or getattr(attn, "fused_projections", False):
        return
    if not state.fused_qkv:
        for other_name, other in root.named_modules():
            if isinstance(other.__dict__.get("fuse_projections"), functools.partial):
                _plan(other, other_name)
    built = {}
    for target, parts in _plan(attn, name):
        built[target] = fuse_quant_linears(parts) if isinstance(parts[0], QuantLinear) else _fuse_dense(parts)
    for target, mod in built.items():
        setattr(attn, target, mod)
    attn.fused_projections = fuse
    if name not in state.fused_qkv:
        state.fused_qkv.append(name)


def install_fused_qkv(denoiser: nn.Module, state: QuantState) -> int:
    """Give every attention module with quantized projections diffq's ``fuse_projections``; returns how many."""
    n = 0
    for name, mod in denoiser.named_modules():
        if not hasattr(type(mod), "fuse_projections"):
            continue
        if not (any(isinstance(getattr(mod, p, None), QuantLinear) for p in ("to_q", "to_k", "to_v", "add_q_proj"))
                or _runs_quantized_attention(mod)):
            continue
        mod.fuse_projections = functools.partial(fuse_projections, mod, state, name, denoiser)
        n += 1
    return n
