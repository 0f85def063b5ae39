"""Quantized attention for diffusers pipelines (SageAttention2-style): INT8 Q·Kᵀ with K smoothed
by its mean over tokens, FP8 E4M3 (or INT8) P·V, fp32 accumulation.

* :mod:`diffq.attention.spec` -- the recipe's names (``attn`` formats, attention roles);
* :mod:`diffq.attention.processors` -- drop-in processors for ``AttnProcessor2_0`` (UNets, PixArt,
  DiT), ``JointAttnProcessor2_0`` (SD3) and ``FluxAttnProcessor`` (FLUX), and
  :func:`quantized_attention` (Triton kernel on CUDA, torch reference elsewhere);
* :mod:`diffq.attention.install` -- attention modules, their roles, installing the processors;
* :mod:`diffq.attention.error` -- the attention output's error against full precision, measured in
  a running pipeline.

The math and the kernel are in :mod:`diffq.kernels.attention_reference` / :mod:`diffq.kernels.attention`.

```python
from diffq.attention import attn_format, install_attention
install_attention(pipe.transformer, attn_format("int8-fp8"))   # or diffq.quantize(pipe, "w8a8-attn")
```
"""

from diffq.attention.error import ErrorProbe, default_probe_formats, probe_attention, relative_l2
from diffq.attention.install import (
    AttentionChoice,
    attention_modules,
    choose_attention,
    install_attention,
    installed_formats,
)
from diffq.attention.processors import (
    QuantAttention,
    QuantAttnProcessor,
    QuantFluxAttnProcessor,
    QuantJointAttnProcessor,
    quantized_attention,
    sdpa,
)
from diffq.attention.spec import ATTN_CHOICES, ATTN_FORMATS, ATTN_ROLES, attn_format, format_label
from diffq.kernels.attention_reference import AttnFormat

__all__ = [
    "ATTN_CHOICES",
    "ATTN_FORMATS",
    "ATTN_ROLES",
    "AttentionChoice",
    "AttnFormat",
    "ErrorProbe",
    "QuantAttention",
    "QuantAttnProcessor",
    "QuantFluxAttnProcessor",
    "QuantJointAttnProcessor",
    "attention_modules",
    "attn_format",
    "choose_attention",
    "default_probe_formats",
    "format_label",
    "install_attention",
    "installed_formats",
    "probe_attention",
    "quantized_attention",
    "relative_l2",
    "sdpa",
]
