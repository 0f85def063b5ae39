"""The one byte counter: what a module holds, or what a 16-bit deployment of it would hold."""

from __future__ import annotations

from torch import nn


def module_bytes(m: nn.Module, *, float_bits: int | None = None) -> int:
    """Bytes of a module's parameters and buffers, recursively, each tensor counted once.

    float_bits=None counts what is held. float_bits=16 gives the size of a 16-bit deployment:
    floating tensors wider than 16 bits (an fp32 demo model, fp32 low-rank factors or scales) count
    at 16 bits, so size ratios compare against bf16 whatever dtype the model was loaded in; narrower
    tensors (packed codes, fp8 scales) count as they are.
    """
    seen: set[int] = set()
    total = 0
    for t in [*m.parameters(), *m.buffers()]:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size()
        if float_bits is not None and t.is_floating_point():
            size = min(size, float_bits // 8)
        total += t.numel() * size
    return total
