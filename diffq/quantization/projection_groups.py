"""Which projections of an attention module read one input and are fused together by diffusers'
``fuse_qkv_projections``: q/k/v of self-attention (``to_qkv``), k/v of cross-attention (``to_kv``),
the added q/k/v of joint attention (``to_added_qkv``). Used by the QKV fusion of quantized layers
(:mod:`diffq.quantization.fused_qkv`) and by the shared smoothing that keeps them fusable
(:func:`diffq.quantization.build.shared_smoothing`)."""

from __future__ import annotations

from torch import nn


def projection_groups(attn: nn.Module) -> list[tuple[str, list[str]]]:
    """(fused attribute, its parts) in diffusers' fusion rule; [] for a module without ``to_q``/``to_k``/``to_v``."""
    if not all(isinstance(getattr(attn, n, None), nn.Module) for n in ("to_k", "to_v")):
        return []
    cross = bool(getattr(attn, "is_cross_attention", False))
    if not cross and not isinstance(getattr(attn, "to_q", None), nn.Module):
        return []
    groups = [("to_kv", ["to_k", "to_v"])] if cross else [("to_qkv", ["to_q", "to_k", "to_v"])]
    if all(isinstance(getattr(attn, n, None), nn.Module) for n in ("add_q_proj", "add_k_proj", "add_v_proj")):
        groups.append(("to_added_qkv", ["add_q_proj", "add_k_proj", "add_v_proj"]))
    return groups
