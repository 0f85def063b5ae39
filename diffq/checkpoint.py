"""Save and load a quantized pipeline: the whole quantized denoiser (standalone) or only what
quantization changed (delta).

Layout of a checkpoint folder:
- ``quantized.safetensors``: every buffer of every quantized module, named ``<scope>/<layer>.<buffer>``
  (scope ``denoiser`` or a text-encoder attribute), and in a standalone checkpoint (the default) every
  other parameter and buffer of the denoiser, named ``dense/<name>``;
- ``manifest.json``: format version, recipe, bit plan, family, the base model's weight fingerprint,
  per layer its module kind, formats, geometry and each tensor's shape and dtype, and the sha256 of
  the safetensors file; a standalone checkpoint adds the denoiser's diffusers config
  (``denoiser_config``) and each dense tensor's shape and dtype (``dense``); ``lora``: LoRAs applied with :func:`diffq.lora.load_lora`, in order (their
  tensors are ``lora.<i>.<key>`` in the safetensors file, and the layers are saved as they were
  before them: ``load`` re-applies them, so the reloaded pipeline computes exactly what was saved
  and can still unload them).
Quantized ``to_qkv``/``to_kv``/``to_added_qkv`` made by ``fuse_qkv_projections`` are not saved (they
are copies of to_q/to_k/to_v: fuse again after loading). LoRA adapters loaded through diffusers are
refused: unload them, or fuse and unload them first.
Both are written atomically, the tensors first: a manifest only ever describes a complete file.
Loading reads only safetensors and JSON (no pickle, no code), checks the checksum, the manifest
against the tensors, and the fingerprint against the base pipeline, and refuses anything else.

:func:`load` puts the quantized layers into a full-precision base pipeline (either kind of checkpoint);
:func:`load_pipeline` builds the denoiser of a standalone checkpoint on ``meta`` from its config and
assigns the saved tensors, taking only the text encoders, VAE, tokenizers and scheduler from the base:
the full-precision denoiser is never loaded. The config and tensors are covered by the manifest's
checksum and the tensors' checksum (the fingerprints of a standalone checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from diffq.attention.install import attention_modules, installed_formats
from diffq.errors import CheckpointError, DiffqError
from diffq.fingerprint import weights_fingerprint
from diffq.io import write_json_atomic
from diffq.lora import enable_peft_layers, load_lora, lora_record, peft_adapter_layers
from diffq.modules import quantized_modules, set_submodule
from diffq.numerics import maybe_check_finite
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.attention import apply_attention
from diffq.quantization.diffusers_backend import mark_quantized
from diffq.quantization.fused_qkv import FUSED_NAMES
from diffq.quantization.layer_record import layer_info, rebuild_layer
from diffq.quantization.recipe import Recipe
from diffq.quantization.standalone import denoiser_config, dense_tensors
from diffq.quantization.state import QuantState, attach_state, quant_state, require_state
from diffq.tensor_file import read_safetensors, write_safetensors

FORMAT_VERSION = 1
TENSORS_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"
#: key prefix of the denoiser's 16-bit rest in a standalone checkpoint's safetensors file
DENSE_PREFIX = "dense/"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field.

    Why: the manifest carries geometry (strides, padding, formats) that the tensors' checksum does not
    cover; a flipped byte there could otherwise load silently and compute something else."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _quantized_scopes(pipe) -> dict[str, nn.Module]:
    """The adapter's scopes that hold quantized layers (the denoiser always)."""
    scopes = adapter_for(pipe).scopes(pipe)
    return {k: v for k, v in scopes.items() if k == "denoiser" or quantized_modules(v)}


def _meta(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def save(pipe, directory: str | Path, *, standalone: bool = True) -> Path:
    """Write the quantized state of ``pipe`` to ``directory``; returns the folder.

    standalone: also write the denoiser's 16-bit rest and config, so that :func:`load_pipeline` needs
    only the base's text encoders, VAE, tokenizers and scheduler; False writes the quantized layers only
    (a delta that :func:`load` puts onto the full-precision base pipeline)."""
    directory = Path(directory)
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    state = require_state(denoiser, "diffq.save")
    scopes = _quantized_scopes(pipe)
    loaded = [f"{scope}/{n}" for scope, root in scopes.items() for n in peft_adapter_layers(root)]
    if loaded:
        raise CheckpointError(
            f"this pipeline has LoRA adapters loaded with pipe.load_lora_weights ({len(loaded)} layers, e.g. "
            f"{loaded[0]}); diffq.save writes the quantized layers only: pipe.unload_lora_weights() first, or "
            f"pipe.fuse_lora() then pipe.unload_lora_weights() to bake the LoRA into the 16-bit branch"
        )
    pre_lora, lora_entries, tensors = lora_record(state)
    fused = {f"denoiser/{a}.{p}" if a else f"denoiser/{p}" for a in state.fused_qkv for p in FUSED_NAMES}
    layers: dict[str, dict] = {}
    for scope, root in scopes.items():
        for name, m in quantized_modules(root).items():
            key = f"{scope}/{name}"
            if key in fused:
                continue
            info = layer_info(m)
            info["tensors"] = {}
            buffers = dict(m.named_buffers())
            if key in pre_lora:  # the branch as it was before load_lora; the LoRA is recorded apart
                buffers["lr_down"], buffers["lr_up"] = pre_lora[key]
            for bname, b in buffers.items():
                if b is None:
                    continue
                t = b.detach().contiguous().cpu()
                tensors[f"{key}.{bname}"] = t
                info["tensors"][bname] = _meta(t)
            layers[key] = info
    dense: dict[str, dict] | None = None
    if standalone:
        rest = dense_tensors(denoiser)
        dense = {name: _meta(t) for name, t in rest.items()}
        tensors.update({DENSE_PREFIX + name: t for name, t in rest.items()})
    directory.mkdir(parents=True, exist_ok=True)
    tpath = directory / TENSORS_FILE
    write_safetensors(tpath, tensors, {"format": "diffq", "version": str(FORMAT_VERSION)})
    manifest = {
        "format": "diffq",
        "version": FORMAT_VERSION,
        "family": adapter.name,
        "denoiser_class": type(denoiser).__name__,
        "base_fingerprint": state.base_fingerprint,
        "recipe": state.recipe.to_dict(),
        "plan": state.plan,
        "tensors_sha256": _sha256(tpath),
        "tensors_bytes": tpath.stat().st_size,
        "layers": layers,
        # quantized attention holds no tensors (its scales are dynamic): the recipe's attn fields
        # rebuild it; this lists what they gave, for `diffq inspect`
        "attention": installed_formats(denoiser),
        "lora": lora_entries,
    }
    if standalone:
        manifest.update(denoiser_config=denoiser_config(denoiser), dense=dense,
                        pipeline_class=type(pipe).__name__, denoiser_attr=adapter.denoiser_attr)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(directory / MANIFEST_FILE, manifest)
    return directory


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    mpath = directory / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {MANIFEST_FILE}; it is not a diffq checkpoint")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{mpath} is corrupted (not JSON: {e}); re-save the checkpoint") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "diffq":
        raise CheckpointError(f"{mpath} is not a diffq manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} has format version {manifest.get('version')}, this diffq reads {FORMAT_VERSION}; "
            f"upgrade diffq or re-save"
        )
    for k in ("layers", "tensors_sha256", "base_fingerprint", "recipe", "family", "manifest_sha256"):
        if k not in manifest:
            raise CheckpointError(f"{mpath} misses field {k!r}; it is truncated or hand-edited")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise CheckpointError(
            f"{mpath} does not match its own checksum: it is corrupted or was edited by hand; re-save the checkpoint"
        )
    if not isinstance(manifest["layers"], dict) or not all(isinstance(v, dict) for v in manifest["layers"].values()):
        raise CheckpointError(f"{mpath}: 'layers' must map layer names to objects; re-save the checkpoint")
    if "dense" in manifest and not (isinstance(manifest["dense"], dict) and isinstance(manifest.get("denoiser_config"), dict)
                                    and isinstance(manifest.get("denoiser_class"), str)):
        raise CheckpointError(f"{mpath}: the standalone fields 'dense'/'denoiser_config' are damaged; re-save the checkpoint")
    return manifest


def _check_tensor(tensors: dict, key: str, meta) -> None:
    t = tensors.get(key)
    if t is None:
        raise CheckpointError(f"checkpoint misses tensor {key}")
    if not isinstance(meta, dict) or "shape" not in meta or "dtype" not in meta:
        raise CheckpointError(f"manifest entry of tensor {key} lacks shape/dtype; it is damaged")
    if list(t.shape) != meta["shape"] or str(t.dtype).replace("torch.", "") != meta["dtype"]:
        raise CheckpointError(
            f"tensor {key} is {tuple(t.shape)} {t.dtype}, the manifest says "
            f"{meta['shape']} {meta['dtype']}; the checkpoint is inconsistent: re-save it"
        )


def load_tensors(directory: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, after checking the checksum and every shape/dtype in the manifest."""
    tpath = Path(directory) / TENSORS_FILE
    if not tpath.is_file():
        raise CheckpointError(f"{str(tpath)!r} is missing; the checkpoint is incomplete")
    if _sha256(tpath) != manifest["tensors_sha256"]:
        raise CheckpointError(
            f"{tpath} does not match the checksum in its manifest: the file is corrupted or truncated; "
            f"re-save or re-download it"
        )
    try:
        tensors = read_safetensors(tpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tpath} cannot be read as safetensors ({e})") from e
    for key, info in manifest["layers"].items():
        metas = info.get("tensors")
        if not isinstance(metas, dict):
            raise CheckpointError(f"manifest entry of layer {key} has no 'tensors' object; the checkpoint is damaged")
        for bname, meta in metas.items():
            _check_tensor(tensors, f"{key}.{bname}", meta)
    for name, meta in (manifest.get("dense") or {}).items():
        _check_tensor(tensors, DENSE_PREFIX + name, meta)
    return tensors


def _dtypes(names) -> str:
    return "/".join(sorted({str(d).replace("torch.", "") for d in names}))


def _fingerprint_mismatch(denoiser: nn.Module, manifest: dict) -> CheckpointError:
    """The error for a base whose fingerprint differs: a dtype change says so and names the dtype."""
    saved = {info.get("dtype") for info in manifest["layers"].values()} | {
        m.get("dtype") for m in (manifest.get("dense") or {}).values() if isinstance(m, dict)}
    saved = {d for d in saved if isinstance(d, str) and getattr(torch, d, None) in (torch.float32, torch.float16,
                                                                                    torch.bfloat16)}
    have = {p.dtype for p in denoiser.parameters() if p.is_floating_point()}
    have_s = {str(d).replace("torch.", "") for d in have}
    if saved and have and saved != have_s:
        return CheckpointError(
            f"this checkpoint was quantized from a {'/'.join(sorted(saved))} model and this pipeline's denoiser is "
            f"{_dtypes(have)}: load the base with torch_dtype=torch.{min(saved)} (the weights must match the "
            f"ones it was quantized from), or load it with diffq.load_pipeline(dir, base=...) if it is standalone"
        )
    return CheckpointError(
        "this checkpoint was made from a different base model (weight fingerprint mismatch); "
        "load it onto the exact pipeline it was quantized from"
    )


def recipe_of(manifest: dict) -> Recipe:
    try:
        return Recipe.from_dict(manifest["recipe"])
    except DiffqError as e:
        raise CheckpointError(f"the checkpoint's recipe is invalid ({e}); re-save it with this diffq") from e


def layer_swaps(manifest: dict, tensors: dict, scopes: dict[str, nn.Module]) -> list:
    """(scope, root, name, rebuilt layer) for every saved layer, built before any is swapped in: a damaged
    checkpoint never leaves the base pipeline half-quantized (and looking intact). Pops the layers'
    tensors from ``tensors``."""
    swaps = []
    for key, info in manifest["layers"].items():
        scope, _, name = key.partition("/")
        root = scopes.get(scope)
        if root is None:
            raise CheckpointError(f"checkpoint has layers for {scope!r}, which this pipeline lacks")
        try:
            old = root.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint layer {key} does not exist in this pipeline") from e
        # the layer is built shape-only and gets the loaded tensors themselves (popped, not copied): the
        # checkpoint is held in memory once
        buf = {b: tensors.pop(f"{key}.{b}") for b in info["tensors"]}
        new = rebuild_layer(info, {b: torch.empty(t.shape, dtype=t.dtype, device="meta") for b, t in buf.items()})
        for b, t in buf.items():
            owner, _, leaf = b.rpartition(".")
            mod = new.get_submodule(owner) if owner else new
            if leaf not in mod._buffers:
                raise CheckpointError(f"checkpoint tensor {key}.{b} is not a buffer of a {info.get('kind')} layer; "
                                      f"the checkpoint is damaged: re-save it")
            mod._buffers[leaf] = t
        ref = next(old.parameters(), None)
        if ref is not None and not ref.is_meta:
            new = new.to(ref.device)
        swaps.append((scope, root, name, new))
    return swaps


def check_attention(manifest: dict, denoiser: nn.Module) -> list[str] | None:
    attention = manifest.get("attention")
    if attention is None:
        return None
    if not isinstance(attention, dict) or not all(isinstance(k, str) for k in attention):
        raise CheckpointError("the checkpoint's 'attention' entry must map module names to formats; re-save it")
    missing = sorted(set(attention) - set(attention_modules(denoiser)))
    if missing:
        raise CheckpointError(f"checkpoint quantizes attention modules {missing[:3]} that this pipeline lacks")
    return list(attention)


def activate(pipe, manifest: dict, tensors: dict, swaps: list, recipe: Recipe, attention, fp: str):
    """Swap the rebuilt layers in and attach the QuantState, attention and LoRAs (both load paths)."""
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    state = QuantState(recipe=recipe, family=adapter.name, base_fingerprint=fp, plan=manifest.get("plan"))
    for scope, root, name, new in swaps:
        if new.act is not None and scope == "denoiser":
            new.act.tracker = state.tracker
        set_submodule(root, name, new)
    apply_attention(denoiser, recipe, names=attention)
    attach_state(denoiser, state, adapter.timestep_of)
    enable_peft_layers()
    mark_quantized(adapter.scopes(pipe), state)
    for i, entry in enumerate(manifest.get("lora") or []):  # LoRAs of diffq.lora.load_lora, in order
        missing = [k for k in entry["keys"] if f"lora.{i}.{k}" not in tensors]
        if missing:
            raise CheckpointError(f"checkpoint misses LoRA tensors {missing[:3]}; re-save it")
        load_lora(pipe, {k: tensors[f"lora.{i}.{k}"] for k in entry["keys"]}, scale=entry["scale"])
    maybe_check_finite(pipe)  # DIFFQ_CHECK_FINITE=1: name the layer and step of the first NaN/Inf
    return pipe


def load(directory: str | Path, base_pipe):
    """Restore a quantized checkpoint onto ``base_pipe`` (the same base model, full precision).

    Works for both kinds of checkpoint (a standalone one's dense tensors are not needed here: the base
    has them, and its fingerprint is checked); :func:`load_pipeline` loads a standalone one without it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    adapter = adapter_for(base_pipe)
    denoiser = adapter.denoiser(base_pipe)
    if quant_state(denoiser) is not None:
        raise CheckpointError("the base pipeline is already quantized; load onto a fresh full-precision pipeline")
    if manifest["family"] != adapter.name:
        raise CheckpointError(f"checkpoint is for a {manifest['family']} model, the pipeline is {adapter.name}")
    fp = weights_fingerprint(denoiser)
    if fp != manifest["base_fingerprint"]:
        raise _fingerprint_mismatch(denoiser, manifest)
    tensors = load_tensors(directory, manifest)
    recipe = recipe_of(manifest)
    attention = check_attention(manifest, denoiser)
    swaps = layer_swaps(manifest, tensors, adapter.scopes(base_pipe))
    return activate(base_pipe, manifest, tensors, swaps, recipe, attention, fp)
