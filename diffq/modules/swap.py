"""Replace a submodule by its qualified name (the one place diffq swaps layers in and out)."""

from __future__ import annotations

from torch import nn


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """``root.<name> = new`` for a dotted ``name`` such as ``down_blocks.0.attentions.0.proj_in``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
