"""LoRA on a quantized pipeline without re-quantizing: the update rides on the 16-bit branch.

Two ways in, one math (:mod:`diffq.lora.branch`):

- diffusers' own API: ``pipe.load_lora_weights(...)``, ``set_adapters``, ``fuse_lora`` /
  ``unfuse_lora``, ``unload_lora_weights``, ``delete_adapters``. diffq registers PEFT LoRA layers for
  QuantLinear / QuantConv2d (:mod:`diffq.lora.peft_layers`): unfused, the LoRA runs beside the
  quantized layer; fused, its factors are appended to the 16-bit branch; unfused again, the
  branch is put back bit for bit.
- :func:`load_lora` / :func:`unload_lora` here, without PEFT: quantized layers get the factors
  appended to their branch, dense layers (skipped layers, text encoders) get ``W += scale·B·A``.
  ``diffq.save`` records such a LoRA next to the pre-LoRA branch, and ``diffq.load`` re-applies
  it, so a reloaded checkpoint computes exactly what was saved (and can still unload it).

Key styles: :mod:`diffq.lora.keys` (diffusers/PEFT, old attention-processor, kohya).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffq.errors import DiffqError
from diffq.lora.branch import append_to_branch, branch_factors, lora_rows, restore_branch
from diffq.lora.keys import LoraPair, parse_lora
from diffq.modules import QuantConv2d, QuantLinear
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.state import QuantState, require_state
from diffq.tensor_file import read_safetensors

__all__ = [
    "LoraPair",
    "enable_peft_layers",
    "load_lora",
    "lora_record",
    "parse_lora",
    "peft_adapter_layers",
    "unload_lora",
]


def enable_peft_layers() -> bool:
    """Let diffusers' LoRA calls (PEFT) wrap QuantLinear / QuantConv2d; False when PEFT is missing.
    Idempotent; ``diffq.quantize`` and ``diffq.load`` call it."""
    try:
        from diffq.lora import peft_layers
    except ImportError:
        return False
    peft_layers.install_dispatch()
    return True


def peft_adapter_layers(root: nn.Module) -> list[str]:
    """Names of the PEFT LoRA layers (diffusers' ``load_lora_weights``) under ``root``."""
    return [n for n, m in root.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


def _target(roots: dict[str, nn.Module], pair: LoraPair) -> nn.Module:
    root = roots.get(pair.scope)
    if root is None:
        raise DiffqError(
            f"LoRA has keys for {pair.scope!r}, which this pipeline does not have (it has {sorted(roots)})"
        )
    try:
        mod = root.get_submodule(pair.module)
    except AttributeError as e:
        raise DiffqError(f"LoRA targets {pair.scope}/{pair.module}, which this pipeline does not have") from e
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
        raise DiffqError(
            f"{pair.scope}/{pair.module} already carries a LoRA loaded with pipe.load_lora_weights; use one LoRA "
            f"path at a time (pipe.unload_lora_weights() first, or load this one with pipe.load_lora_weights too)"
        )
    if not isinstance(mod, (QuantLinear, QuantConv2d, nn.Linear, nn.Conv2d)):
        raise DiffqError(f"LoRA target {pair.scope}/{pair.module} is a {type(mod).__name__}, not a Linear/Conv2d")
    return mod


def _dense_delta(mod: nn.Module, a_rows: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    delta = (b @ a_rows) * scale
    if isinstance(mod, nn.Conv2d):
        kh, kw = mod.kernel_size
        delta = delta.reshape(mod.out_channels, kh, kw, mod.in_channels).permute(0, 3, 1, 2)
    if delta.shape != mod.weight.shape:
        raise DiffqError(f"LoRA update of shape {tuple(delta.shape)} does not fit weight {tuple(mod.weight.shape)}")
    return delta


@torch.no_grad()
def load_lora(pipe, lora: str | Path | dict[str, torch.Tensor], *, scale: float = 1.0) -> list[str]:
    """Apply a LoRA to a quantized pipeline; returns the ``scope/module`` names it touched.

    Quantized layers get the update on their 16-bit branch; dense layers (layers the recipe kept in
    16 bits, the text encoders) get it merged into their weight. Every target is checked before any
    is changed. :func:`unload_lora` removes it exactly.
    """
    weights = read_safetensors(lora) if not isinstance(lora, dict) else dict(lora)
    adapter = adapter_for(pipe)
    state = require_state(adapter.denoiser(pipe), "diffq.lora.load_lora")
    roots = adapter.scopes(pipe)
    pairs = parse_lora(weights, roots)
    updates = []
    for pair in pairs:  # validate everything first: a refused LoRA changes nothing
        mod = _target(roots, pair)
        a_rows, b = lora_rows(pair.a, pair.b)
        s = scale * pair.scale
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            updates.append((pair, mod, branch_factors(mod, a_rows, b, s)))
        else:
            updates.append((pair, mod, _dense_delta(mod, a_rows, b, s)))
    for pair, mod, update in updates:
        key = f"{pair.scope}/{pair.module}"
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            before = append_to_branch(mod, *update)
            state.lora_saved.setdefault(key, before)
        else:
            state.lora_saved.setdefault(key, mod.weight.detach().clone())
            mod.weight.add_(update.to(mod.weight.dtype))
    state.lora_loaded.append({"scale": float(scale), "tensors": _canonical(pairs)})
    return [f"{p.scope}/{p.module}" for p in pairs]


@torch.no_grad()
def unload_lora(pipe) -> None:
    """Remove every LoRA applied with :func:`load_lora`, restoring the exact previous state."""
    adapter = adapter_for(pipe)
    state = require_state(adapter.denoiser(pipe), "diffq.lora.unload_lora")
    roots = adapter.scopes(pipe)
    for key, old in state.lora_saved.items():
        scope, _, name = key.partition("/")
        mod = roots[scope].get_submodule(name)
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            restore_branch(mod, old)
        else:
            mod.weight.copy_(old)
    state.lora_saved.clear()
    state.lora_loaded.clear()


def _canonical(pairs: list[LoraPair]) -> dict[str, torch.Tensor]:
    """The pairs as diffusers-style keys (``transformer.`` for the denoiser), alpha as a 0-d tensor."""
    out = {}
    for p in pairs:
        prefix = "transformer" if p.scope == "denoiser" else p.scope
        out[f"{prefix}.{p.module}.lora_A.weight"] = p.a.detach().cpu().contiguous()
        out[f"{prefix}.{p.module}.lora_B.weight"] = p.b.detach().cpu().contiguous()
        if p.alpha is not None:
            out[f"{prefix}.{p.module}.alpha"] = torch.tensor(float(p.alpha))
    return out


def lora_record(state: QuantState) -> tuple[dict[str, tuple], list[dict], dict[str, torch.Tensor]]:
    """What ``diffq.save`` writes for LoRAs loaded with :func:`load_lora`.

    Returns (``scope/layer`` -> the pre-LoRA ``(lr_down, lr_up)`` of quantized layers, to be saved
    instead of the current branch; manifest entries ``{"scale", "keys"}`` in load order; the LoRA
    tensors, named ``lora.<i>.<key>``). ``diffq.load`` re-applies them in order.
    """
    pre = {k: v for k, v in state.lora_saved.items() if isinstance(v, tuple)}
    entries, tensors = [], {}
    for i, rec in enumerate(state.lora_loaded):
        entries.append({"scale": rec["scale"], "keys": sorted(rec["tensors"])})
        tensors.update({f"lora.{i}.{k}": v for k, v in rec["tensors"].items()})
    return pre, entries, tensors
