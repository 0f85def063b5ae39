"""One table that maps each model family's module names to canonical roles.

Recipes and skip rules speak roles (``attn_qkv``, ``cross_attn``, ``ffn_up``...), not name
substrings, so "keep every embedding in 16 bits" means the same thing for a UNet and for FLUX.
Patterns are regexes over the module's qualified name inside the denoiser; the first match wins.
"""

from __future__ import annotations

import re

ROLES = (
    "attn_qkv",  # self-attention q/k/v (and the image stream's q/k/v in joint attention)
    "cross_attn",  # k/v that read text states; the text stream's projections in MMDiT
    "attn_out",  # attention output projections
    "ffn_up",
    "ffn_down",
    "resblock_conv",  # ResNet 3x3 convolutions
    "shortcut",  # ResNet 1x1 skip convolutions (concatenated skip inputs in UNet up blocks)
    "resample",  # down/up-sampling convolutions
    "proj",  # proj_in / proj_out around UNet transformer blocks
    "embed",  # time, class, text-pooled and caption embeddings
    "adanorm",  # adaLN modulation linears (scale/shift/gate from the conditioning)
    "io",  # the first and last layers (patch embedding, conv_in/out, final projection)
    "other",
)

# (pattern, role); searched in order on the qualified module name.
_COMMON: list[tuple[str, str]] = [
    (r"(^|\.)attn2\.to_[kv]$", "cross_attn"),
    (r"(^|\.)attn\.add_[qkv]_proj$", "cross_attn"),
    (r"(^|\.)attn\d?\.to_[qkv]$", "attn_qkv"),
    (r"(^|\.)attn\d?\.(to_out\.0|to_add_out)$", "attn_out"),
    (r"(^|\.)ff(_context)?\.net\.0\.proj$", "ffn_up"),
    (r"(^|\.)ff(_context)?\.net\.2$", "ffn_down"),
    (r"(^|\.)single_transformer_blocks\.\d+\.proj_mlp$", "ffn_up"),
    (r"(^|\.)single_transformer_blocks\.\d+\.proj_out$", "ffn_down"),
    (r"(^|\.)resnets\.\d+\.conv[12]$", "resblock_conv"),
    (r"(^|\.)resnets\.\d+\.conv_shortcut$", "shortcut"),
    (r"(^|\.)resnets\.\d+\.time_emb_proj$", "embed"),
    (r"(^|\.)(downsamplers|upsamplers)\.\d+\.conv$", "resample"),
    (r"(^|\.)attentions\.\d+\.proj_(in|out)$", "proj"),
    (r"^(conv_in|conv_out|pos_embed\.proj|x_embedder|proj_out|proj_out_1|proj_out_2|norm_out\.linear)$", "io"),
    (r"(^|\.)(norm1|norm1_context|norm|norm_out)\.linear$", "adanorm"),
    (
        (
            r"(^|\.)(time_embedding|time_proj|add_embedding|adaln_single|time_text_embed|context_embedder"
            r"|caption_projection|class_embedding|encoder_hid_proj|emb)(\.|$)"
        ),
        "embed",
    ),
]
_COMPILED = [(re.compile(p), role) for p, role in _COMMON]


def role_of(name: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """Canonical role of a module from its qualified name inside the denoiser.

    extra: (regex, role) pairs searched first (a family adapter's own patterns)."""
    for pat, role in extra:
        if re.search(pat, name):
            return role
    for pat, role in _COMPILED:
        if pat.search(name):
            return role
    return "other"
