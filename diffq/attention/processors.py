"""Diffusers attention processors whose ``softmax(Q Kᵀ) V`` is quantized.

One class per processor family diffq supports, each doing what the processor it replaces does
(projections, head split, q/k norms, masks, rotary embeddings, output projections) and calling
``self.attend(q, k, v, mask)`` on ``[B, H, tokens, D]`` operands for the attention itself:

=========================  =====================================  ==================================
replaces                   used by                                class
=========================  =====================================  ==================================
``AttnProcessor2_0``,      SD / SDXL UNets, PixArt, DiT           :class:`QuantAttnProcessor`
``AttnProcessor``
``JointAttnProcessor2_0``  SD3 (joint image + text attention)     :class:`QuantJointAttnProcessor`
``FluxAttnProcessor``      FLUX (joint, rotary embeddings)        :class:`QuantFluxAttnProcessor`
=========================  =====================================  ==================================

``attend=None`` runs the replaced processor's own attention call (``F.scaled_dot_product_attention``,
or diffusers' ``dispatch_attention_fn`` for FLUX), so with quantization switched off the output is
bit-identical to the original processor's. Otherwise ``attend`` is a :class:`QuantAttention` (or
an error probe, :mod:`diffq.attention.error`). Nothing here reads a tensor's value on the host: a
forward has no host sync and no data-dependent branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffq.errors import DiffqError
from diffq.kernels.attention_reference import AttnFormat, attention_reference

#: ``attend(q, k, v, mask) -> out``, all ``[B, H, tokens, D]`` (mask broadcastable to [B, H, M, N])
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BACKENDS = ("auto", "triton", "reference")


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: AttnFormat,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantized ``softmax(q kᵀ · scale + mask) v``: q [B, H, M, D], k / v [B, H, N, D] -> [B, H, M, D].

    backend: ``"auto"`` (the Triton kernel on a CUDA GPU that runs it, else the torch reference),
    ``"triton"`` (forced) or ``"reference"`` (:func:`diffq.kernels.attention_reference.attention_reference`).
    """
    if backend not in BACKENDS:
        raise DiffqError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return attention_reference(q, k, v, fmt, mask, scale)
    from diffq.kernels.attention import kernel_unavailable_reason, quant_attention_triton  # imports Triton

    if backend == "auto" and (kernel_unavailable_reason(fmt, q.device) is not None or q.shape[-1] > 256):
        return attention_reference(q, k, v, fmt, mask, scale)
    return quant_attention_triton(q, k, v, fmt, mask, scale)


class QuantAttention:
    """``attend`` for the processors: :func:`quantized_attention` with one format and backend."""

    def __init__(self, fmt: AttnFormat, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise DiffqError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.fmt = fmt
        self.backend = backend

    def __call__(self, q, k, v, mask=None):
        return quantized_attention(q, k, v, self.fmt, mask, backend=self.backend)

    def __repr__(self) -> str:
        return f"QuantAttention({self.fmt.describe()}, backend={self.backend!r})"


def sdpa(q, k, v, mask=None):
    """Full-precision attention exactly as ``AttnProcessor2_0`` calls it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def _split_heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def _heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: int):
    """The projections [B, T, H * D] -> q, k, v [B, H, T, D], with the module's optional q / k norms."""
    head_dim = key.shape[-1] // attn.heads
    q, k, v = (_split_heads(t, batch, attn.heads, head_dim) for t in (query, key, value))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _merge_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D]."""
    return x.transpose(1, 2).reshape(batch, -1, x.shape[1] * x.shape[3])


class QuantProcessor:
    """Common part: the ``attend`` callable (None = the replaced processor's own attention)."""

    def __init__(self, attend: Attend | None = None) -> None:
        self.attend = attend

    def _attention(self, q, k, v, mask):
        return sdpa(q, k, v, mask) if self.attend is None else self.attend(q, k, v, mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.attend!r})"


class QuantAttnProcessor(QuantProcessor):
    """Replaces ``AttnProcessor2_0`` / ``AttnProcessor`` (self- and cross-attention of UNets,
    PixArt and DiT). Takes the same arguments; ``attention_mask`` goes through
    ``attn.prepare_attention_mask`` and is reshaped to [B, heads, M or 1, N] like there."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):  # fmt: skip
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # [B, C, H, W] -> [B, H*W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_tokens = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        q, k, v = _heads(attn, query, key, value, batch)
        out = _merge_heads(self._attention(q, k, v, attention_mask), batch).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class QuantJointAttnProcessor(QuantProcessor):
    """Replaces ``JointAttnProcessor2_0`` (SD3): one softmax over the image tokens followed by the
    text tokens (``encoder_hidden_states``, projected by ``add_*_proj``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = _heads(attn, query, key, value, batch)
        head_dim = q.shape[-1]
        if encoder_hidden_states is not None:
            cq, ck, cv = (_split_heads(proj(encoder_hidden_states), batch, attn.heads, head_dim)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = _merge_heads(self._attention(q, k, v, None), batch).to(q.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, context)


class QuantFluxAttnProcessor(QuantProcessor):
    """Replaces ``FluxAttnProcessor``: joint attention over [text, image] tokens (double blocks:
    text through ``add_*_proj``; single blocks: one stream already concatenated), RMS-normed q/k,
    rotary embeddings on q and k, ``attention_mask`` passed to the attention as is."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):  # fmt: skip
        from diffusers.models.embeddings import apply_rotary_emb

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # [B, T, H, D] layout, as the Flux processor keeps it
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if joint:
            if attn.fused_projections:
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                cq, ck, cv = (proj(encoder_hidden_states) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            query, key, value = (torch.cat([c, t], dim=1) for c, t in ((cq, query), (ck, key), (cv, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if self.attend is None:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            heads_first = [t.transpose(1, 2) for t in (query, key, value)]
            out = self._attention(*heads_first, attention_mask).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        context, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


#: class name of a diffusers processor -> the class that replaces it (our own map to themselves)
REPLACEMENTS: dict[str, type[QuantProcessor]] = {
    "AttnProcessor2_0": QuantAttnProcessor,
    "AttnProcessor": QuantAttnProcessor,
    "JointAttnProcessor2_0": QuantJointAttnProcessor,
    "FluxAttnProcessor": QuantFluxAttnProcessor,
    **{c.__name__: c for c in (QuantAttnProcessor, QuantJointAttnProcessor, QuantFluxAttnProcessor)},
}


def replacement_for(processor) -> type[QuantProcessor] | None:
    """The quantized processor class for ``processor``, or None when diffq does not cover it
    (IP-adapter, fused-projection, custom processors)."""
    return REPLACEMENTS.get(type(processor).__name__)
