"""Block-streamed, resumable quantization: the layers of one transformer/UNet block at a time.

``diffq.quantize(pipe, recipe, calibration, work_dir=DIR)`` builds the quantized layers block by
block (a block: ``transformer_blocks.3``, ``single_transformer_blocks.0``, ``down_blocks.1``...;
layers outside blocks form a group per top-level module), swaps them in, and writes each finished
block to ``DIR/block-NNNN.safetensors`` (atomically, with the per-layer records of
:mod:`diffq.quantization.layer_record` and the seconds it took). A run that is killed resumes at the
next block: finished blocks are rebuilt from their files, bit for bit what they were, so the
result is identical to an uninterrupted run. ``DIR/run.json`` names the run (recipe, base weights,
calibration): another run's blocks are never reused.

With ``dense_source=`` (the denoiser's safetensors file, e.g. diffusers'
``diffusion_pytorch_model.safetensors``) the denoiser may be built on ``meta``: each block's dense
tensors are read from the file just before that block is quantized and dropped when its layers are
swapped in, so peak memory is about one dense block plus the quantized model (and the 16-bit
layers kept so far). Calibration statistics, when the recipe needs them, come from a separate
:func:`diffq.calibrate` run (it needs the whole model).

Several processes (``accelerate launch --num_processes N`` or ``torchrun``, which set ``RANK`` and
``WORLD_SIZE``; or ``shard=(rank, world)``) share one ``work_dir``: process r quantizes blocks
r, r + N, ... and restores the others from the files the other processes write (waiting for them),
so every process ends with the same quantized model and one of them saves the checkpoint.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from diffq.calibration.container import CalibrationStats
from diffq.errors import CheckpointError
from diffq.fingerprint import tensors_fingerprint
from diffq.io import remove_stale_temps, write_json_atomic
from diffq.modules import TimestepTracker, set_submodule
from diffq.quantization.build import install_layers
from diffq.quantization.layer_record import layer_info, rebuild_layer
from diffq.quantization.recipe import Recipe
from diffq.quantization.selection import LayerChoice
from diffq.quantization.standalone import assign_dense, meta_tensors
from diffq.tensor_file import read_safetensors_with_metadata, write_safetensors

RUN_FILE = "run.json"
#: seconds a process waits for a block another process quantizes (DIFFQ_SHARD_TIMEOUT overrides)
SHARD_TIMEOUT = 6 * 3600.0
_META_KEY = "diffq_block"


def block_of(name: str) -> str:
    """The block a layer belongs to: the path up to the first numeric index, else its top-level module."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return parts[0]


def group_blocks(choices: list[LayerChoice]) -> dict[str, list[LayerChoice]]:
    """Block -> its layer choices, blocks in the order of their first layer."""
    out: dict[str, list[LayerChoice]] = {}
    for ch in choices:
        out.setdefault(block_of(ch.name), []).append(ch)
    return out


def run_key(recipe: Recipe, base_fingerprint: str, calibration: CalibrationStats | None) -> str:
    """Identity of a quantization run: recipe, base weights and calibration statistics."""
    h = hashlib.sha256(recipe.to_json().encode())
    h.update(base_fingerprint.encode())
    if calibration is not None:
        h.update(f"{calibration.structure}:{calibration.step_buckets}".encode())
        for name in sorted(calibration.layers):
            h.update(name.encode())
            h.update(calibration.layers[name].channel_absmax().float().numpy().tobytes())
    return h.hexdigest()


class DenseSource:
    """Tensors of a denoiser's safetensors file, read when needed.

    Every read opens the file, copies the tensors it returns out of the memory map and closes it:
    pages of the file that were read do not stay mapped (a kept map would count every page ever
    read, i.e. the whole file after the fingerprint pass, in the process's resident memory)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._open() as f:
            self.names = set(f.keys())

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"dense_source {str(self.path)!r} cannot be read as safetensors ({e})") from e

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """name -> tensor (a copy in ordinary memory, not a view of the file) for every name."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise CheckpointError(f"dense_source {self.path.name} has no tensor {missing[0]}; it is not this "
                                  f"model's file")
        with self._open() as f:
            return {n: f.get_tensor(n).clone() for n in names}

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def fingerprint(self, model: nn.Module) -> str:
        """:func:`diffq.fingerprint.weights_fingerprint` of ``model`` with these tensors as its weights
        (read one at a time, so ``model`` may be on meta)."""
        return tensors_fingerprint(type(model).__name__, ((n, self.get(n)) for n in sorted(model.state_dict())))

    def materialise(self, root: nn.Module, prefix: str | None) -> None:
        """Read every meta tensor of ``root`` under ``prefix`` (all of them when None) from the file."""
        names = [n for n in meta_tensors(root) if prefix is None or n == prefix or n.startswith(prefix + ".")]
        if names:
            assign_dense(root, self.read(names))


def release_dense(modules: list[nn.Module]) -> None:
    """Put the parameters and buffers of dense layers that were swapped out (their quantized
    replacements are in the model) back on ``meta``: shapes and dtypes stay for the summary, the
    memory goes. Only for layers whose weights were read from a ``dense_source`` (never the caller's
    tensors)."""
    for mod in modules:
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if t is not None and not t.is_meta:
                    meta = torch.empty_like(t, device="meta")
                    store[key] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; elsewhere nothing). The
    per-layer working tensors (Hessians, their factors, calibration rows in fp32) are freed to glibc's
    heap, which keeps them resident once its dynamic mmap threshold has grown past their size: without
    this, each layer starts on top of what the previous layers left behind."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def launcher_shard() -> tuple[int, int] | None:
    """(rank, world size) set by ``accelerate launch`` / ``torchrun`` (``RANK``, ``WORLD_SIZE``), else None."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return (rank, world) if world > 1 and 0 <= rank < world else None


def _wait_for(path: Path, block: str, timeout: float) -> None:
    t0 = time.monotonic()
    while not path.is_file():
        if time.monotonic() - t0 > timeout:
            raise CheckpointError(f"block {block} ({path.name}) was not written by its process within {timeout:.0f} s; "
                                  f"that process failed: rerun all processes with the same work_dir to resume")
        time.sleep(0.2)


def _block_path(work_dir: Path, i: int) -> Path:
    return work_dir / f"block-{i:04d}.safetensors"


def _write_block(path: Path, block: str, built: dict[str, nn.Module], seconds: dict) -> None:
    tensors, records = {}, {}
    for name, m in built.items():
        info = layer_info(m)
        info["tensors"] = {}
        for bname, b in m.named_buffers():
            t = b.detach().contiguous().cpu()
            tensors[f"{name}.{bname}"] = t
            info["tensors"][bname] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        records[name] = info
    meta = {_META_KEY: json.dumps({"block": block, "layers": records, "seconds": seconds}, sort_keys=True)}
    write_safetensors(path, tensors, meta)


def read_block(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of a finished block file; CheckpointError when it is damaged."""
    try:
        tensors, meta = read_safetensors_with_metadata(path)
        record = json.loads(meta[_META_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"block file {path} is damaged ({type(e).__name__}: {e}); delete it to redo "
                              f"that block") from e
    return record, tensors


def _restore(root: nn.Module, path: Path, block: str, names: list[str], tracker) -> dict[str, nn.Module]:
    record, tensors = read_block(path)
    if record.get("block") != block or sorted(record.get("layers", {})) != sorted(names):
        raise CheckpointError(f"block file {path} holds {record.get('block')!r}, this run expects {block!r}; "
                              f"the work_dir belongs to another model: use another directory")
    built = {}
    for name, info in record["layers"].items():
        new = rebuild_layer(info, {b: tensors[f"{name}.{b}"] for b in info["tensors"]})
        if new.act is not None:
            new.act.tracker = tracker
        set_submodule(root, name, new)
        built[name] = new
    return built


def install_blocks(
    root: nn.Module,
    choices: list[LayerChoice],
    stats: CalibrationStats | None,
    splits: dict[str, tuple[int, int]],
    tracker: TimestepTracker | None,
    *,
    work_dir: str | Path,
    key: str,
    dense_source: DenseSource | None = None,
    progress: Callable[[], None] | None = None,
    shard: tuple[int, int] | None = None,
    workers: int = 1,
) -> dict[str, nn.Module]:
    """:func:`~diffq.quantization.build.install_layers` one block at a time, each finished block saved to
    ``work_dir`` and restored from there on a rerun; with ``shard=(rank, world)`` this process builds
    every ``world``-th block and waits for the others' files (see the module docstring); ``workers``: the
    layers of a block built at once (:mod:`diffq.quantization.workers`)."""
    rank, world = shard or (0, 1)
    timeout = float(os.environ.get("DIFFQ_SHARD_TIMEOUT", SHARD_TIMEOUT))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file = work_dir / RUN_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text()).get("key")
        except (json.JSONDecodeError, OSError, AttributeError):
            saved = None
        if saved != key:
            raise CheckpointError(f"{str(work_dir)!r} holds the blocks of another quantization run (other recipe, "
                                  f"weights or calibration); pass another work_dir or delete it")
    elif rank == 0 or world == 1:
        write_json_atomic(run_file, {"key": key})
    built: dict[str, nn.Module] = {}
    for i, (block, chs) in enumerate(group_blocks(choices).items()):
        path = _block_path(work_dir, i)
        mine = i % world == rank
        if mine:
            remove_stale_temps(path)
        else:
            _wait_for(path, block, timeout)
        names = [c.name for c in chs if c.skip is None]
        if path.is_file():
            built.update(_restore(root, path, block, names, tracker))
            if dense_source is not None:  # the block's 16-bit rest (norms, skipped layers)
                dense_source.materialise(root, block)
        else:
            from_file = []  # layers whose weights this call reads from the file (not the caller's tensors)
            if dense_source is not None:
                from_file = [c.name for c in chs if any(t.is_meta for t in c.module.parameters())]
                dense_source.materialise(root, block)
            t0, c0 = time.perf_counter(), time.process_time()
            new = install_layers(root, chs, stats, splits, tracker, progress=trim_heap,  # trimmed after each layer
                                 workers=workers)
            secs = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "rank": rank}
            _write_block(path, block, new, secs)
            built.update(new)
            release_dense([c.module for c in chs if c.name in new and c.name in from_file])
        trim_heap()
        if progress is not None:
            for _ in chs:
                progress()
    if dense_source is not None:
        dense_source.materialise(root, None)
    return built


def block_seconds(work_dir: str | Path) -> dict[str, dict]:
    """Block -> {"wall", "cpu"} seconds it took to quantize and the ``rank`` of the process that did it,
    from the block files of ``work_dir``."""
    out = {}
    for path in sorted(Path(work_dir).glob("block-*.safetensors")):
        record, _ = read_block(path)
        out[record["block"]] = record["seconds"]
    return out
