"""``diffq.load_pipeline``: a quantized pipeline from a standalone checkpoint (see :mod:`diffq.checkpoint`)
without the full-precision denoiser: it is built on ``meta`` from the saved config and the saved
tensors are assigned; only the text encoders, VAE, tokenizers and scheduler come from the base."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from diffq.checkpoint import (
    DENSE_PREFIX,
    activate,
    check_attention,
    layer_swaps,
    load_tensors,
    read_manifest,
    recipe_of,
)
from diffq.errors import CheckpointError
from diffq.modules import set_submodule
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.standalone import assign_dense, meta_denoiser, meta_tensors


def load_pipeline(directory: str | Path, base, **from_pretrained_kwargs):
    """A quantized pipeline from a standalone checkpoint, without the full-precision denoiser.

    The denoiser is built on ``meta`` from the saved config and gets the saved tensors assigned (no
    copy, no full-precision weights ever in memory); the text encoders, VAE, tokenizers and scheduler
    come from ``base``: a hub id or folder (``DiffusionPipeline.from_pretrained(base, <denoiser>=...,
    **from_pretrained_kwargs)``, which never loads the base's denoiser; ``torch_dtype`` defaults to the
    dtype of the denoiser's 16-bit rest) or a pipeline object (its
    components are shared with the returned pipeline, its own denoiser is not used).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if "dense" not in manifest:
        raise CheckpointError(f"{str(directory)!r} is a delta checkpoint (quantized layers only): load it onto the "
                              f"full-precision pipeline with diffq.load(dir, base_pipe), or re-save it with "
                              f"diffq.save(pipe, dir) to make it standalone")
    tensors = load_tensors(directory, manifest)
    recipe = recipe_of(manifest)
    denoiser = meta_denoiser(manifest["denoiser_class"], manifest["denoiser_config"])
    assign_dense(denoiser, {name: tensors.pop(DENSE_PREFIX + name) for name in manifest["dense"]})
    # the quantized layers first, so that the pipeline is never assembled around meta layers
    den_swaps = layer_swaps(manifest, tensors, {"denoiser": denoiser})
    for _, root, name, new in den_swaps:
        set_submodule(root, name, new)
    left = meta_tensors(denoiser)
    if left:
        raise CheckpointError(f"the standalone checkpoint leaves {len(left)} tensors of {type(denoiser).__name__} "
                              f"unset (e.g. {left[0]}); it is incomplete: re-save it with diffq.save(pipe, dir)")
    attr = manifest.get("denoiser_attr") or "transformer"
    pipe = _assemble(base, attr, denoiser, from_pretrained_kwargs)
    adapter = adapter_for(pipe)
    if manifest["family"] != adapter.name:
        raise CheckpointError(f"checkpoint is for a {manifest['family']} model, the base pipeline is {adapter.name}")
    attention = check_attention(manifest, denoiser)
    others = {k: v for k, v in adapter.scopes(pipe).items() if k != "denoiser"}
    rest = {"layers": {k: v for k, v in manifest["layers"].items() if not k.startswith("denoiser/")}}
    swaps = [("denoiser", denoiser, name, new) for _, _, name, new in den_swaps]
    swaps += layer_swaps(rest, tensors, others)
    return activate(pipe, manifest, tensors, swaps, recipe, attention, manifest["base_fingerprint"])


def _assemble(base, attr: str, denoiser: nn.Module, kwargs: dict):
    """A pipeline of ``base``'s components with ``denoiser`` in place of its own."""
    if isinstance(base, (str, Path)):
        from diffusers import DiffusionPipeline

        # the other components in the denoiser's dtype unless asked otherwise (fp32 VAE + bf16 latents fail)
        dtype = next((t.dtype for t in denoiser.parameters() if t.is_floating_point()), None)
        kwargs = {"torch_dtype": dtype, **kwargs} if dtype is not None else kwargs
        pipe = DiffusionPipeline.from_pretrained(str(base), **{attr: denoiser}, **kwargs)
    else:
        components = getattr(base, "components", None)
        if not isinstance(components, dict) or attr not in components:
            raise CheckpointError(f"base must be a hub id, a folder or a diffusers pipeline with a {attr!r} "
                                  f"component, not {type(base).__name__}")
        pipe = type(base)(**{**components, attr: denoiser})
        pipe.set_progress_bar_config(**getattr(base, "_progress_bar_config", {}))
    return pipe
