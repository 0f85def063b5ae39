"""LoRA state-dict key styles -> (scope, module, A, B, alpha), for :func:`diffq.lora.load_lora`.

Accepted styles (the scope is ``denoiser`` or a text-encoder attribute of the pipeline):

- diffusers / PEFT: ``[<prefix>.]<module>.lora_A.weight`` / ``.lora_B.weight``, optional
  ``[<prefix>.]<module>.alpha``; prefixes ``unet.`` / ``transformer.`` (denoiser, also no prefix) and
  ``text_encoder.`` / ``text_encoder_2.`` / ``text_encoder_3.``;
- old diffusers attention processors: ``<module>.lora.down.weight`` / ``.lora.up.weight``;
- kohya (most community SD LoRAs): ``lora_unet_<module with _ for .>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``
  for the text encoders. The underscored names are resolved against the module's own names, so
  LoRAs trained on the diffusers layout load; other layouts (SDXL's original-SD block names, BFL
  FLUX names) are refused by name with a pointer to ``pipe.load_lora_weights``, which converts them.

The update of a pair is ``scale · (alpha / r) · B·A`` (``alpha`` absent: ``scale · B·A``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from diffq.errors import CheckpointError

#: diffusers' key prefix -> pipeline scope
PREFIX_SCOPES = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text_encoder",
                 "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3"}
#: kohya's key prefix -> pipeline scope
KOHYA_SCOPES = {"lora_unet": "denoiser", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}

_DIFFUSERS = re.compile(
    r"^(?:(?P<prefix>unet|transformer|text_encoder(?:_2|_3)?)\.)?(?P<mod>.+?)\.(?P<kind>lora_A|lora\.down)\.weight$"
)
_KOHYA = re.compile(r"^(?P<prefix>lora_unet|lora_te[123]?)_(?P<mod>.+?)\.lora_down\.weight$")


@dataclass
class LoraPair:
    """One targeted layer: ``scope``/``module``, factors A ``[r, K]`` (or conv ``[r, Cin, kh, kw]``),
    B ``[N, r]`` (or ``[N, r, 1, 1]``), and alpha (None: the factors are already scaled)."""

    scope: str
    module: str
    a: torch.Tensor
    b: torch.Tensor
    alpha: float | None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.a.shape[0]


def _alpha(state: dict, key: str) -> float | None:
    value = state.get(key)
    if value is None:
        return None
    return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)


def parse_lora(state: dict[str, torch.Tensor], roots: dict[str, nn.Module] | None = None) -> list[LoraPair]:
    """Every LoRA pair of ``state``; ``roots`` (scope -> module) resolves kohya's underscored names.

    Raises CheckpointError for a down/A key without its up/B partner, kohya names that match no module,
    and a state dict without LoRA keys.
    """
    pairs: list[LoraPair] = []
    unresolved: list[str] = []
    lookup: dict[str, dict[str, str]] = {}
    for key, a in state.items():
        m = _DIFFUSERS.match(key)
        if m:
            b_key = key.replace("lora_A", "lora_B") if m["kind"] == "lora_A" else key.replace("lora.down", "lora.up")
            base = key[: -len(".lora_A.weight")] if m["kind"] == "lora_A" else key[: -len(".lora.down.weight")]
            scope = PREFIX_SCOPES[m["prefix"]] if m["prefix"] else "denoiser"
            pairs.append(LoraPair(scope, m["mod"], a, _partner(state, key, b_key), _alpha(state, f"{base}.alpha")))
            continue
        m = _KOHYA.match(key)
        if not m:
            continue
        scope = KOHYA_SCOPES[m["prefix"]]
        base = key[: -len(".lora_down.weight")]
        b = _partner(state, key, f"{base}.lora_up.weight")
        if scope not in lookup:
            root = (roots or {}).get(scope)
            lookup[scope] = {} if root is None else {n.replace(".", "_"): n for n, _ in root.named_modules() if n}
        name = lookup[scope].get(m["mod"])
        if name is None:
            unresolved.append(key)
            continue
        pairs.append(LoraPair(scope, name, a, b, _alpha(state, f"{base}.alpha")))
    if unresolved:
        raise CheckpointError(
            f"kohya LoRA keys {unresolved[:3]} name no module of this pipeline (this reader resolves the diffusers "
            f"module layout); load this LoRA with pipe.load_lora_weights(...), which converts the other layouts"
        )
    if not pairs:
        raise CheckpointError(
            "no LoRA weights found (expected keys ending in lora_A.weight, lora.down.weight or kohya's "
            "lora_down.weight)"
        )
    return pairs


def _partner(state: dict, key: str, b_key: str) -> torch.Tensor:
    if b_key not in state:
        raise CheckpointError(f"LoRA key {key} has no matching up/B weight {b_key}")
    return state[b_key]
