"""Names a recipe uses for quantized attention: the formats, and the roles attention modules play.

``attn`` = ``none`` | ``int8`` (INT8 Q·Kᵀ and INT8 P·V) | ``int8-fp8`` (INT8 Q·Kᵀ, FP8 E4M3 P·V:
SageAttention2's choice) | ``int4-fp8`` (INT4 Q·Kᵀ: an accuracy experiment; it runs on the INT8 MMA,
no faster than ``int8-fp8``) | ``int8-fp16`` (INT8 Q·Kᵀ, 16-bit P·V: SageAttention1's choice, and
the format that shows the Q·Kᵀ error alone). The exact math is :mod:`diffq.kernels.attention_reference`.

Roles (for ``attn_skip_roles``): what an attention module attends over -- ``self_attn`` (image tokens
to image tokens), ``cross_attn`` (image queries to text keys: UNet / PixArt ``attn2``), ``joint_attn``
(one softmax over text and image tokens: SD3 / FLUX) -- and where it sits: ``first_block`` /
``last_block`` (the attention modules of the denoiser's first / last transformer block, in the
order the blocks run).
"""

from __future__ import annotations

from diffq.errors import RecipeError
from diffq.kernels.attention_reference import AttnFormat

#: recipe name -> (Q·Kᵀ bits, P·V format)
ATTN_FORMATS: dict[str, tuple[int, str]] = {
    "int8": (8, "int8"), "int8-fp8": (8, "fp8"), "int4-fp8": (4, "fp8"), "int8-fp16": (8, "fp16"),
}  # fmt: skip
ATTN_CHOICES = ("none", *ATTN_FORMATS)
ATTN_KINDS = ("self_attn", "cross_attn", "joint_attn")
ATTN_ROLES = (*ATTN_KINDS, "first_block", "last_block")
ATTN_GRANULARITIES = ("block", "head")


def attn_format(name: str, *, block: int = 64, granularity: str = "block", smooth_k: bool = True) -> AttnFormat | None:
    """Recipe fields -> the kernel's :class:`AttnFormat` (None for ``"none"``)."""
    if name == "none":
        return None
    if name not in ATTN_FORMATS:
        raise RecipeError(f"attn={name!r} is not one of {list(ATTN_CHOICES)}")
    bits, pv = ATTN_FORMATS[name]
    return AttnFormat(qk_bits=bits, pv=pv, block=block, granularity=granularity, smooth_k=smooth_k)


def format_label(fmt: AttnFormat | None) -> str:
    """The recipe name of ``fmt`` with its non-default options: ``int8-fp8``, ``int8-fp8/no-smooth``,
    ``int8/head``, ``int4-fp8/b128``; ``none`` for None."""
    if fmt is None:
        return "none"
    name = next(n for n, (bits, pv) in ATTN_FORMATS.items() if (bits, pv) == (fmt.qk_bits, fmt.pv))
    extra = [] if fmt.smooth_k else ["no-smooth"]
    if fmt.granularity == "head":
        extra.append("head")
    elif fmt.block != 64:
        extra.append(f"b{fmt.block}")
    return "/".join([name, *extra])
