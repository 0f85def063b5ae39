"""The 16-bit rest of a quantized denoiser and its config: what a standalone checkpoint adds to the
quantized layers so that the denoiser can be rebuilt without the full-precision model.

:func:`dense_tensors` lists every parameter and buffer outside the quantized layers (norms,
embeddings, the layers a recipe skipped), :func:`denoiser_config` the diffusers config that builds the
denoiser's skeleton, :func:`meta_denoiser` builds that skeleton on the ``meta`` device (no weight
memory) and :func:`assign_dense` puts the saved tensors in place (assigned, not copied). The quantized
layers themselves are described by :mod:`diffq.quantization.layer_record`, as for every other save path.
"""

from __future__ import annotations

import torch
from torch import nn

from diffq.errors import CheckpointError
from diffq.modules import quantized_modules

#: config keys diffusers keeps for itself (paths, versions) or that diffq sets (the quantization config)
_NOT_CONFIG = ("quantization_config",)


def _under(name: str, prefixes: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def dense_tensors(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """Qualified name -> every parameter and buffer (persistent or not) of ``denoiser`` that is not
    inside a quantized layer; detached, contiguous, on CPU, in the dtype they have."""
    skip = set(quantized_modules(denoiser))
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    named = [*denoiser.named_parameters(remove_duplicate=False), *denoiser.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t is None or _under(name, skip):
            continue
        if t.is_meta:
            raise CheckpointError(f"{name} of the denoiser is on the meta device (offloaded?); a standalone checkpoint "
                                  f"needs every weight: save before enable_sequential_cpu_offload")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:  # safetensors refuses shared memory (tied weights): a copy per name
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def denoiser_config(denoiser: nn.Module) -> dict:
    """The denoiser's diffusers config (what ``from_config`` needs), without private keys and the
    quantization config; JSON-ready (tuples become lists)."""
    cfg = getattr(denoiser, "config", None)
    if cfg is None or not hasattr(denoiser, "from_config"):
        raise CheckpointError(f"{type(denoiser).__name__} is not a diffusers model (no config/from_config); a "
                              f"standalone checkpoint needs one: save a delta checkpoint with standalone=False")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items()
            if not k.startswith("_") and k not in _NOT_CONFIG}


def meta_denoiser(class_name: str, config: dict) -> nn.Module:
    """The diffusers model ``class_name`` built from ``config`` on the meta device (no weight memory)."""
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CheckpointError(f"the checkpoint's denoiser class {class_name!r} is not a diffusers model class; "
                              f"it is damaged or needs a newer diffusers")
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{class_name} cannot be built from the checkpoint's config ({type(e).__name__}: {e}); "
                              f"it is damaged or was saved with another diffusers version") from e
    return model.eval().requires_grad_(False)


def assign_dense(denoiser: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (from :func:`dense_tensors`) into ``denoiser`` in place of its (meta) parameters and
    buffers, without copying; a name the model lacks, or a shape that differs, is a CheckpointError."""
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = denoiser.get_submodule(owner_name) if owner_name else denoiser
        except AttributeError as e:
            raise CheckpointError(f"the checkpoint has tensor {name}, which {type(denoiser).__name__} lacks") from e
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            new = nn.Parameter(t, requires_grad=False)
            store = owner._parameters
        elif leaf in owner._buffers:
            old, new, store = owner._buffers[leaf], t, owner._buffers
        else:
            raise CheckpointError(f"the checkpoint has tensor {name}, which {type(denoiser).__name__} lacks")
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise CheckpointError(f"checkpoint tensor {name} is {tuple(t.shape)}, the model built from the "
                                  f"checkpoint's config has {tuple(old.shape)}; the checkpoint is inconsistent")
        store[leaf] = new


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers of ``model`` still on the meta device."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [n for n, t in named if t is not None and t.is_meta]
