"""Find a denoiser's attention modules, give each its roles, and swap their processors.

Per module (``module.set_processor``, so it also works on denoisers without ``set_attn_processor``,
e.g. DiT): the processor is replaced by the quantized class of :mod:`diffq.attention.processors`
that covers it; modules whose processor diffq does not cover, or that the recipe skips by role or
name pattern, keep theirs, with the reason recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from diffq.attention.processors import Attend, QuantAttention, replacement_for
from diffq.attention.spec import format_label
from diffq.kernels.attention_reference import AttnFormat

#: block-list name -> rank in execution order (UNets run down, mid, up; FLUX double then single blocks)
_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 0, "single_transformer_blocks": 1}


@dataclass
class AttentionChoice:
    """One attention module: ``kind`` (self_attn / cross_attn / joint_attn), all its ``roles``
    (the kind plus first_block / last_block), its original processor class, the format installed
    (``format`` "none" and ``skip`` the reason when it was left alone)."""

    name: str
    module: nn.Module
    kind: str
    roles: tuple[str, ...]
    processor: str
    format: str = "none"
    skip: str | None = None


def attention_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every diffusers attention module (it has a ``processor`` and to_q/to_k/to_v)."""
    return {
        name: m for name, m in denoiser.named_modules()
        if hasattr(m, "processor") and all(isinstance(getattr(m, p, None), nn.Module) for p in ("to_q", "to_k", "to_v"))
    }  # fmt: skip


def attention_kind(name: str, module: nn.Module) -> str:
    """``joint_attn`` (SD3 / FLUX double blocks with ``add_*_proj``, FLUX single blocks over the
    concatenated stream), ``cross_attn`` (keys from the text encoder) or ``self_attn``."""
    if getattr(module, "added_kv_proj_dim", None) is not None or re.search(r"(^|\.)single_transformer_blocks\.", name):
        return "joint_attn"
    if getattr(module, "is_cross_attention", False):
        return "cross_attn"
    return "self_attn"


def _block_key(block: str) -> tuple:
    """Execution-order key of a block path such as ``up_blocks.1.attentions.0.transformer_blocks.0``."""
    head = block.split(".")[0]
    return (_STAGE.get(head, 0), tuple(int(p) for p in block.split(".") if p.isdigit()))


def choose_attention(denoiser: nn.Module, skip_roles: Sequence[str] = (), skip_patterns: Sequence[str] = (),
                     skip_names: dict[str, str] | None = None) -> list[AttentionChoice]:  # fmt: skip
    """Every attention module with its roles and whether it is skipped (a processor diffq does not
    cover, a role, a name pattern, or ``skip_names``: name -> reason)."""
    skip_names = skip_names or {}
    mods = attention_modules(denoiser)
    blocks = {name: name.rpartition(".")[0] for name in mods}
    order = sorted(set(blocks.values()), key=_block_key)
    first, last = (order[0], order[-1]) if order else (None, None)
    out = []
    for name, m in mods.items():
        kind = attention_kind(name, m)
        roles = (kind, *(["first_block"] if blocks[name] == first else []), *(["last_block"] if blocks[name] == last else []))
        ch = AttentionChoice(name, m, kind, roles, type(m.processor).__name__)
        hit = [r for r in roles if r in skip_roles]
        if replacement_for(m.processor) is None:
            ch.skip = f"processor {ch.processor} not covered"
        elif hit:
            ch.skip = f"role {hit[0]}"
        else:
            pat = next((p for p in skip_patterns if re.search(p, name)), None)
            if pat is not None:
                ch.skip = f"pattern {pat}"
            elif name in skip_names:
                ch.skip = skip_names[name]
        out.append(ch)
    return out


def swap_processors(choices: Sequence[AttentionChoice], make_attend: Callable[[AttentionChoice], Attend | None]
                    ) -> Callable[[], None]:  # fmt: skip
    """Give every non-skipped module the quantized processor with ``attend = make_attend(choice)``;
    returns a function that puts the original processors back."""
    saved = []
    for ch in choices:
        if ch.skip is not None:
            continue
        old = ch.module.processor
        ch.module.set_processor(replacement_for(old)(make_attend(ch)))
        saved.append((ch.module, old))

    def restore() -> None:
        for module, old in saved:
            module.set_processor(old)

    return restore


def install_attention(
    denoiser: nn.Module,
    fmt: AttnFormat,
    *,
    skip_roles: Sequence[str] = (),
    skip_patterns: Sequence[str] = (),
    skip_names: dict[str, str] | None = None,
    backend: str = "auto",
) -> list[AttentionChoice]:
    """Quantize the attention of ``denoiser`` in place with ``fmt``; returns every attention
    module's choice (``format`` set on the quantized ones)."""
    choices = choose_attention(denoiser, skip_roles, skip_patterns, skip_names)
    attend = QuantAttention(fmt, backend)  # stateless: one instance serves every module
    swap_processors(choices, lambda ch: attend)
    for ch in choices:
        if ch.skip is None:
            ch.format = format_label(fmt)
    return choices


def installed_formats(denoiser: nn.Module) -> dict[str, str]:
    """Attention module name -> format label of the quantized attention installed on it."""
    out = {}
    for name, m in attention_modules(denoiser).items():
        attend = getattr(m.processor, "attend", None)
        if isinstance(attend, QuantAttention):
            out[name] = format_label(attend.fmt)
    return out
