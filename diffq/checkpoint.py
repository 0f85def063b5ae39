"""Save and load a quantized pipeline: only what quantization changed.

Layout of a checkpoint folder:
- ``quantized.safetensors``: every buffer of every quantized module, named ``<scope>/<layer>.<buffer>``
  (scope ``denoiser`` or a text-encoder attribute);
- ``manifest.json``: format version, recipe, bit plan, family, the base model's weight fingerprint,
  per layer its module kind, formats, geometry and each tensor's shape and dtype, and the sha256 of
  the safetensors file.
Both are written atomically, the tensors first: a manifest only ever describes a complete file.
Loading reads only safetensors and JSON (no pickle, no code), checks the checksum, the manifest
against the tensors, and the fingerprint against the base pipeline, and refuses anything else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffq.errors import CheckpointError, DiffqError
from diffq.fingerprint import weights_fingerprint
from diffq.formats import QTensor, QuantSpec, decode_scale, unpack_bits
from diffq.io import atomic_path, write_json_atomic
from diffq.modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    ShiftedActQuantizer,
    quantized_modules,
    set_submodule,
)
from diffq.numerics import maybe_check_finite
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.recipe import Recipe
from diffq.quantization.state import QuantState, attach_state, quant_state, require_state

FORMAT_VERSION = 1
TENSORS_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"


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


def _layer_info(m: QuantLinear | QuantConv2d) -> dict:
    info = {
        "kind": "conv" if isinstance(m, QuantConv2d) else "linear",
        "in_features": m.in_features,
        "out_features": m.out_features,
        "weight": m.wspec.to_dict(),
        "dtype": str(m.compute_dtype).replace("torch.", ""),
        "act": None,
    }
    if isinstance(m, QuantConv2d):
        info.update(kernel_size=list(m.kernel_size), stride=list(m.stride), dilation=list(m.dilation),
                    padding=m.padding if isinstance(m.padding, str) else list(m.padding))
    if m.act is not None:
        info["act"] = {
            "spec": m.act.spec.to_dict(),
            "splits": list(m.act.splits) if m.act.splits else None,
            "static": m.act.static,
        }
    return info


def save(pipe, directory: str | Path) -> Path:
    """Write the quantized state of ``pipe`` to ``directory``; returns the folder."""
    directory = Path(directory)
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    state = require_state(denoiser, "diffq.save")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for scope, root in _quantized_scopes(pipe).items():
        for name, m in quantized_modules(root).items():
            key = f"{scope}/{name}"
            info = _layer_info(m)
            info["tensors"] = {}
            for bname, b in m.named_buffers():
                if b is None:
                    continue
                t = b.detach().contiguous().cpu()
                tensors[f"{key}.{bname}"] = t
                info["tensors"][bname] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            layers[key] = info
    directory.mkdir(parents=True, exist_ok=True)
    tpath = directory / TENSORS_FILE
    with atomic_path(tpath) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "diffq", "version": str(FORMAT_VERSION)})
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
    }
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
    return manifest


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
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tpath} cannot be read as safetensors ({e})") from e
    for key, info in manifest["layers"].items():
        metas = info.get("tensors")
        if not isinstance(metas, dict):
            raise CheckpointError(f"manifest entry of layer {key} has no 'tensors' object; the checkpoint is damaged")
        for bname, meta in metas.items():
            t = tensors.get(f"{key}.{bname}")
            if t is None:
                raise CheckpointError(f"checkpoint misses tensor {key}.{bname}")
            if not isinstance(meta, dict) or "shape" not in meta or "dtype" not in meta:
                raise CheckpointError(f"manifest entry of tensor {key}.{bname} lacks shape/dtype; it is damaged")
            if list(t.shape) != meta["shape"] or str(t.dtype).replace("torch.", "") != meta["dtype"]:
                raise CheckpointError(
                    f"tensor {key}.{bname} is {tuple(t.shape)} {t.dtype}, the manifest says "
                    f"{meta['shape']} {meta['dtype']}; the checkpoint is inconsistent: re-save it"
                )
    return tensors


def _rebuild(info: dict, buf: dict[str, torch.Tensor]) -> QuantLinear | QuantConv2d:
    try:
        wspec = QuantSpec.from_dict(info["weight"])
        n, k_in = info["out_features"], info["in_features"]
        ksz = info.get("kernel_size", [1, 1])
        k = k_in * ksz[0] * ksz[1]
        codes = (unpack_bits(buf["qweight"], wspec.bits, signed=wspec.is_int and wspec.symmetric)
                 if wspec.packed else buf["qweight"])
        if tuple(codes.shape) != (n, k):
            raise CheckpointError(f"weight codes have shape {tuple(codes.shape)}, expected {(n, k)}")
        gscale = buf.get("wscale_global")
        zero = buf.get("wzero")
        q = QTensor(
            codes=codes, scale=decode_scale(buf["wscale"], wspec, gscale), spec=wspec, shape=torch.Size((n, k)),
            zero=None if zero is None else zero.float(), scale_stored=buf["wscale"], global_scale=gscale,
        )
        act = None
        if info.get("act"):
            a = info["act"]
            kw = {"splits": tuple(a["splits"]) if a["splits"] else None, "amax": buf.get("act.amax"),
                  "bucket_to_group": buf.get("act.bucket_to_group")}
            aspec = QuantSpec.from_dict(a["spec"])
            shift = buf.get("act.shift")
            if shift is not None and shift.shape != (k_in,):
                raise CheckpointError(f"activation shift has shape {tuple(shift.shape)}, expected ({k_in},)")
            act = ActQuantizer(aspec, **kw) if shift is None else ShiftedActQuantizer(aspec, shift, **kw)
        dtype = getattr(torch, str(info["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"layer compute dtype {info['dtype']!r} is not a floating-point torch dtype")
        common = {"bias": buf.get("bias"), "act": act, "lr_down": buf.get("lr_down"),
                  "lr_up": buf.get("lr_up"), "smooth": buf.get("smooth"), "dtype": dtype}
        if info["kind"] == "conv":
            pad = info["padding"]
            return QuantConv2d(q, in_channels=k_in, kernel_size=tuple(ksz), stride=tuple(info["stride"]),
                               padding=pad if isinstance(pad, str) else tuple(pad),
                               dilation=tuple(info["dilation"]), **common)
        return QuantLinear(q, **common)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        if isinstance(e, DiffqError):
            raise
        raise CheckpointError(f"checkpoint layer cannot be rebuilt ({type(e).__name__}: {e}); re-save it") from e


def load(directory: str | Path, base_pipe):
    """Restore a quantized checkpoint onto ``base_pipe`` (the same base model, full precision)."""
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
        raise CheckpointError(
            "this checkpoint was made from a different base model (weight fingerprint mismatch); "
            "load it onto the exact pipeline it was quantized from"
        )
    tensors = load_tensors(directory, manifest)
    scopes = adapter.scopes(base_pipe)
    try:
        recipe = Recipe.from_dict(manifest["recipe"])
    except DiffqError as e:
        raise CheckpointError(f"the checkpoint's recipe is invalid ({e}); re-save it with this diffq") from e
    # rebuild every layer before swapping any in: a damaged checkpoint never leaves the base pipeline
    # half-quantized (and looking intact)
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
        buf = {b: tensors[f"{key}.{b}"] for b in info["tensors"]}
        new = _rebuild(info, buf)
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(ref.device)
        swaps.append((scope, root, name, new))
    state = QuantState(recipe=recipe, family=adapter.name, base_fingerprint=fp, plan=manifest.get("plan"))
    for scope, root, name, new in swaps:
        if new.act is not None and scope == "denoiser":
            new.act.tracker = state.tracker
        set_submodule(root, name, new)
    attach_state(denoiser, state, adapter.timestep_of)
    maybe_check_finite(base_pipe)  # DIFFQ_CHECK_FINITE=1: name the layer and step of the first NaN/Inf
    return base_pipe
