"""The ``diffq`` quantization backend of diffusers: a quantized denoiser round-trips through
diffusers' own ``save_pretrained`` / ``from_pretrained`` (like the torchao / quanto / bnb backends).

- ``diffq.quantize`` and ``diffq.load`` mark the denoiser as quantized the way diffusers does
  (``hf_quantizer``, ``is_quantized``, ``config.quantization_config``): its ``quantization_config`` is a
  :class:`DiffqConfig` recording the recipe, bit plan, family and base-model fingerprint.
- ``pipe.save_pretrained(dir)`` / ``denoiser.save_pretrained(dir)`` then write that config into the
  denoiser's ``config.json`` and the quantized layers' buffers into its safetensors file, with the
  per-layer manifest (kinds, geometry, formats, each tensor's dtype) in the safetensors header.
  Floating-point buffers of quantized layers (scales, smoothing, ranges, the 16-bit branch, FP8 codes)
  are stored as integer views of their bits, so ``from_pretrained(..., torch_dtype=...)`` cannot cast
  them: what loads is bit-identical to what was saved.
- ``DiffusionPipeline.from_pretrained(dir)`` (or the model class's) finds ``quant_method: "diffq"``,
  builds the quantized layers on the meta skeleton from the manifest, loads their buffers, and
  attaches the same :class:`~diffq.quantization.state.QuantState` as ``diffq.load``. The backend is
  registered with diffusers by ``import diffq`` (when diffusers is installed) and by every quantize.

Refused loudly at save time, each naming the call that works: ``safe_serialization=False`` (diffq
writes only safetensors), LoRA adapters still loaded through diffusers (fuse and unload, or unload),
a LoRA loaded with :func:`diffq.lora.load_lora` (``diffq.save`` records it), and quantized text
encoders (transformers' ``save_pretrained`` would write them as random weights: use ``diffq.save``).
"""

from __future__ import annotations

import json
from enum import Enum

import torch
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from diffq.attention import installed_formats
from diffq.errors import CheckpointError, DiffqError
from diffq.lora import enable_peft_layers, peft_adapter_layers
from diffq.modules import quantized_modules
from diffq.pipelines.adapters import ADAPTERS
from diffq.quantization.attention import apply_attention
from diffq.quantization.fused_qkv import FUSED_NAMES, install_fused_qkv
from diffq.quantization.layer_record import layer_info, rebuild_layer
from diffq.quantization.recipe import Recipe
from diffq.quantization.state import QuantState, attach_state, quant_state
from diffq.tensor_file import align_module_tensors

FORMAT_VERSION = 1
#: safetensors header key that holds the per-layer manifest
METADATA_KEY = "diffq_layers"
#: integer dtype of the same width, for storing a floating buffer's bits
_BITS_AS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class DiffqQuantizationMethod(str, Enum):
    DIFFQ = "diffq"


class DiffqConfig(QuantizationConfigMixin):
    """``quantization_config`` of a diffq-quantized diffusers model.

    recipe: the :class:`~diffq.quantization.recipe.Recipe` as a dict; plan: layer -> preset of a
    ``mixed`` recipe (or None); family: the family adapter's name; base_fingerprint: of the
    full-precision weights it was quantized from; attention: the attention modules that run diffq's
    quantized attention (the recipe's ``attn`` fields; None when it has none); version: the storage
    format version.
    """

    def __init__(self, recipe: dict | None = None, family: str | None = None, base_fingerprint: str | None = None,
                 plan: dict | None = None, attention: list[str] | None = None, version: int = FORMAT_VERSION,
                 **kwargs) -> None:
        self.quant_method = DiffqQuantizationMethod.DIFFQ
        self.recipe = recipe
        self.family = family
        self.base_fingerprint = base_fingerprint
        self.plan = plan
        self.attention = attention
        self.version = version
        self.post_init()

    def post_init(self) -> None:
        if self.version != FORMAT_VERSION:
            raise CheckpointError(f"diffq quantization_config has version {self.version}, this diffq reads "
                                  f"{FORMAT_VERSION}; upgrade diffq or re-save the model")
        if not isinstance(self.recipe, dict) or self.family not in {a.name for a in ADAPTERS}:
            raise CheckpointError(
                "a diffq quantization_config records the recipe and family of a quantized model; it is made by "
                "diffq.quantize(pipe, recipe) and saved by save_pretrained, not written by hand"
            )
        try:
            Recipe.from_dict(self.recipe)
        except DiffqError as e:
            raise CheckpointError(f"the saved diffq recipe is invalid ({e}); re-save the model with this diffq") from e

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["quant_method"] = DiffqQuantizationMethod.DIFFQ.value
        return d

    def to_diff_dict(self) -> dict:
        return self.to_dict()


def _stored(t: torch.Tensor) -> torch.Tensor:
    """A floating buffer as an integer view of its bits (diffusers casts floating tensors on load)."""
    return t.view(_BITS_AS[t.element_size()]) if t.is_floating_point() else t


def _true_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"the saved diffq manifest names an unknown dtype {name!r}; re-save the model")
    return dtype


class DiffqQuantizer(DiffusersQuantizer):
    """Loads and saves diffq-quantized diffusers models (see the module docstring)."""

    requires_calibration = False  # only pre-quantized checkpoints load; validate_environment says why
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DiffqConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.model: nn.Module | None = None  # set once the model is quantized/loaded (save needs it)
        self.layers: dict[str, dict] = {}
        self.pending: dict[str, torch.dtype] = {}  # "<layer>.<buffer>" -> true dtype, until loaded

    # ------------------------------------------------------------------ loading (from_pretrained)
    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise DiffqError(
                "quantization_config=DiffqConfig(...) only loads models saved after diffq.quantize; to quantize a "
                "full-precision model, load it normally and call diffq.quantize(pipe, recipe)"
            )

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """Read the per-layer manifest from the safetensors header (before the skeleton is processed)."""
        from safetensors import safe_open

        files = [str(f) for f in (checkpoint_files or [])]
        if not files or not files[0].endswith(".safetensors"):
            raise CheckpointError(f"diffq models are stored as safetensors, got {files[:1]}; re-save the model")
        with safe_open(files[0], framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            raise CheckpointError(f"{files[0]} has no diffq layer manifest; it was not written by save_pretrained "
                                  f"of a diffq-quantized model")
        self.layers = json.loads(raw)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        """Swap the dense layers of the meta skeleton for quantized layers with meta buffers."""
        for name, info in self.layers.items():
            metas = {b: torch.empty(m["shape"], dtype=_true_dtype(m["dtype"]), device="meta")
                     for b, m in info["tensors"].items()}
            new = rebuild_layer(info, metas)
            for b, m in info["tensors"].items():
                self.pending[f"{name}.{b}"] = _true_dtype(m["dtype"])
                owner, _, leaf = b.rpartition(".")
                mod = new.get_submodule(owner) if owner else new
                mod._buffers[leaf] = _stored(torch.empty(m["shape"], dtype=_true_dtype(m["dtype"]), device="meta"))
            try:
                model.get_submodule(name)
            except AttributeError as e:
                raise CheckpointError(f"the saved diffq model has layer {name}, which {type(model).__name__} "
                                      f"lacks") from e
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return param_name in self.pending

    def check_quantized_param_shape(self, *args, **kwargs) -> bool:
        return True

    def create_quantized_param(self, model, param_value: torch.Tensor, param_name: str, target_device, state_dict,
                               unexpected_keys=None, **kwargs) -> None:
        dtype = self.pending.pop(param_name)
        owner, _, leaf = param_name.rpartition(".")
        value = param_value.view(dtype) if param_value.dtype != dtype else param_value
        model.get_submodule(owner)._buffers[leaf] = value.to(target_device).contiguous()

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        layers = set(self.layers)
        return [k for k in missing_keys if not (k.endswith(".weight") and k[: -len(".weight")] in layers)]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        if self.pending:
            raise CheckpointError(f"the saved diffq model misses tensors {sorted(self.pending)[:3]}; it is "
                                  f"truncated: re-save it")
        # the tensors are views of diffusers' memory map of the file, most of them misaligned: CPU
        # kernels would round differently from the model that was saved (diffq.tensor_file)
        align_module_tensors(model)
        cfg = self.quantization_config
        adapter = next(a for a in ADAPTERS if a.name == cfg.family)()
        state = QuantState(recipe=Recipe.from_dict(cfg.recipe), family=cfg.family,
                           base_fingerprint=cfg.base_fingerprint, plan=cfg.plan)
        for m in quantized_modules(model).values():
            if m.act is not None:
                m.act.tracker = state.tracker
        attach_state(model, state, adapter.timestep_of)
        # quantized attention holds no tensors: the recipe's attn fields rebuild it on the saved modules
        apply_attention(model, state.recipe, names=cfg.attention)
        enable_peft_layers()
        install_fused_qkv(model, state)
        self.model = model
        return model

    # ------------------------------------------------------------------ saving (save_pretrained)
    def get_state_dict_and_metadata(self, state_dict: dict, safe_serialization: bool = False):
        model = self.model
        state = quant_state(model) if model is not None else None
        if state is None:
            raise DiffqError("this diffq quantizer is attached to no quantized model; quantize with diffq.quantize")
        if not safe_serialization:
            raise DiffqError("diffq models are saved as safetensors only; call save_pretrained(dir) without "
                             "safe_serialization=False")
        loaded = peft_adapter_layers(model)
        if loaded:
            raise DiffqError(
                f"this denoiser has LoRA adapters loaded ({len(loaded)} layers, e.g. {loaded[0]}); save_pretrained "
                f"writes the quantized layers only: pipe.unload_lora_weights() first, or pipe.fuse_lora() then "
                f"pipe.unload_lora_weights() to bake the LoRA into the 16-bit branch"
            )
        if state.lora_loaded:
            raise DiffqError("this pipeline carries a LoRA loaded with diffq.lora.load_lora; save it with "
                             "diffq.save(pipe, dir) (which records the LoRA), or diffq.lora.unload_lora(pipe) first")
        if state.recipe.text_encoder:
            raise DiffqError("this recipe quantized the text encoders, which transformers' save_pretrained cannot "
                             "store; save with diffq.save(pipe, dir) and reload with diffq.load(dir, base_pipe)")
        fused = {f"{a}.{p}" if a else p for a in state.fused_qkv for p in FUSED_NAMES}
        out, layers = {}, {}
        mods = {n: m for n, m in quantized_modules(model).items() if n not in fused}
        for key, t in state_dict.items():
            layer = key.rpartition(".")[0]
            if any(key.startswith(f + ".") for f in fused) or (t.is_meta and layer in mods):
                continue  # fused q/k/v are rebuilt by fuse_qkv_projections; .weight of a quantized layer is a placeholder
            out[key] = t
        for name, m in mods.items():
            info = layer_info(m)
            info["tensors"] = {}
            for bname, b in m.named_buffers():
                info["tensors"][bname] = {"shape": list(b.shape), "dtype": str(b.dtype).replace("torch.", "")}
                out[f"{name}.{bname}"] = _stored(b.detach().contiguous())
            layers[name] = info
        return out, {METADATA_KEY: json.dumps(layers, sort_keys=True), "diffq_version": str(FORMAT_VERSION)}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


class _RefuseSave:
    """``hf_quantizer`` of a text encoder diffq quantized: transformers' save_pretrained stops with the fix."""

    @property
    def quantization_config(self):
        raise DiffqError("this text encoder was quantized by diffq (recipe.text_encoder), which transformers' "
                         "save_pretrained cannot store; save the pipeline with diffq.save(pipe, dir) and reload it "
                         "with diffq.load(dir, base_pipe)")

    def is_serializable(self, *args, **kwargs) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "diffq"`` known to diffusers' from_pretrained (idempotent)."""
    diffusers_auto.AUTO_QUANTIZER_MAPPING.setdefault("diffq", DiffqQuantizer)
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault("diffq", DiffqConfig)


def mark_quantized(pipe_scopes: dict[str, nn.Module], state: QuantState) -> None:
    """Tell diffusers (and transformers) that these modules are quantized, the way their own backends
    do: the denoiser gets an ``hf_quantizer`` and ``quantization_config``, quantized text encoders a
    quantizer that refuses ``save_pretrained`` with the diffq call that works; and give the
    denoiser's attention modules diffq's ``fuse_projections`` (:mod:`diffq.quantization.fused_qkv`)."""
    from diffusers.models.modeling_utils import ModelMixin  # not at import: register() runs inside its import

    register()
    denoiser = pipe_scopes["denoiser"]
    install_fused_qkv(denoiser, state)
    if isinstance(denoiser, ModelMixin):
        attention = sorted(installed_formats(denoiser)) if state.recipe.attention_format() is not None else None
        cfg = DiffqConfig(recipe=state.recipe.to_dict(), family=state.family,
                          base_fingerprint=state.base_fingerprint, plan=state.plan, attention=attention)
        quantizer = DiffqQuantizer(cfg, pre_quantized=True)
        quantizer.model = denoiser
        denoiser.hf_quantizer = quantizer
        denoiser.is_quantized = True
        denoiser.quantization_method = cfg.quant_method
        denoiser.register_to_config(quantization_config=cfg)
    for scope, root in pipe_scopes.items():
        if scope != "denoiser" and quantized_modules(root) and getattr(root, "hf_quantizer", None) is None:
            root.hf_quantizer = _RefuseSave()


register()  # importing the backend is enough for from_pretrained to know "diffq"
