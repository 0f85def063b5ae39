"""Units of a sensitivity analysis: layers grouped by block (and role), or one unit per layer.

Measuring costs one generation per (unit, candidate), so grouping the ~800 layers of an SDXL-size
UNet into ~70 blocks is what keeps the analysis affordable on large models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from diffq.errors import RecipeError
from diffq.pipelines.roles import role_of as common_role_of

_BLOCK = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+\.(?:attentions|resnets|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:attentions|resnets)\.\d+"
    r"|(?:single_)?transformer_blocks\.\d+)(\.|$)"
)


def block_of(name: str) -> str:
    """The transformer / ResNet / resampling block a layer sits in (the layer itself at top level)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def group_layers(
    names: Sequence[str],
    groups: str | Callable[[str], str] | None,
    role_of: Callable[[str], str] = common_role_of,
) -> dict[str, list[str]]:
    """unit name -> member layers, in first-appearance order.

    groups: None (one unit per layer), ``"block"`` (per transformer / ResNet block), ``"block_role"``
    (per block and role -- keeps cross-attention apart from the rest of its block), or a function
    layer name -> unit name. role_of: the family adapter's role table (for ``"block_role"``).
    """
    if groups is None:
        key = str
    elif groups == "block":
        key = block_of
    elif groups == "block_role":
        def key(n: str) -> str:
            b = block_of(n)
            return n if b == n else f"{b}:{role_of(n)}"
    elif callable(groups):
        key = groups
    else:
        raise RecipeError(f"groups={groups!r} must be None, 'block', 'block_role' or a function name -> unit")
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(str(key(n)), []).append(n)
    return out
