"""Which tensors are the operands of attention's two matmuls, for calibrating their quantization.

Attention computes ``P = softmax(Q Kᵀ / sqrt(d))`` and ``P V``. Quantizing those matmuls (as
low-bit attention kernels do) needs ranges for Q, K and V; P needs none, its range is [0, 1] by
construction. In diffusers' ``Attention`` modules Q, K and V are the outputs of ``to_q`` / ``to_k`` /
``to_v`` -- after ``norm_q`` / ``norm_k`` when the model normalises queries and keys (SD3, FLUX,
PixArt-Sigma) -- and of ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj`` for the text stream of joint
attention (MMDiT). This module finds those submodules; calibration hooks their outputs.
"""

from __future__ import annotations

from torch import nn

# operand -> submodule names that produce it, the first present wins (normalised q/k before raw)
_SOURCES = {
    "q": ("norm_q", "to_q"),
    "k": ("norm_k", "to_k"),
    "v": ("to_v",),
    "added_q": ("norm_added_q", "add_q_proj"),
    "added_k": ("norm_added_k", "add_k_proj"),
    "added_v": ("add_v_proj",),
}


def attention_operands(denoiser: nn.Module) -> dict[str, nn.Module]:
    """``"<attention module>.<operand>"`` -> the submodule whose output is that operand.

    Operands are q, k, v (and added_q/k/v for joint attention); the output of each is
    [B, tokens, heads * head_dim], the layout every diffusers attention processor reshapes into heads.
    """
    out: dict[str, nn.Module] = {}
    for name, mod in denoiser.named_modules():
        if not all(isinstance(getattr(mod, p, None), nn.Module) for p in ("to_q", "to_k", "to_v")):
            continue  # not an attention module (every diffusers attention class has these three)
        for operand, sources in _SOURCES.items():
            for src in sources:
                sub = getattr(mod, src, None)
                if isinstance(sub, nn.Module):
                    out[f"{name}.{operand}"] = sub
                    break
    return out
