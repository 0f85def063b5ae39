"""Safetensors files whose tensors come back 64-byte aligned, so loaded models compute bit for bit
what they computed before they were saved.

Why: a tensor read from a safetensors file is a view of the memory-mapped file, at
``8 + header + offset`` bytes from a page boundary. torch allocates 64-byte aligned memory, and
some CPU kernels round differently on a misaligned operand: on an AMD EPYC (AVX2) a
``[1, 256] x [256, 64]`` float32 ``linear`` whose weight sits at 40 mod 64 differs from the same
product on an aligned copy by 2e-7, and a FLUX fixture's images by 1e-6 after save and load (the
tensors themselves are bit-identical). On a Xeon (AVX-512) the same files gave identical images.

- :func:`write_safetensors` writes a standard safetensors file (any safetensors reader opens it)
  whose data starts at a multiple of 64 bytes, with the tensors whose sizes are multiples of 64
  bytes first, so each of them starts aligned (the format allows no gaps between tensors); the
  rest follow. It is atomic (:func:`diffq.io.atomic_path`).
- :func:`read_safetensors` (:func:`read_safetensors_with_metadata`) and :func:`aligned` give every CPU tensor a 64-byte aligned address:
  a tensor of the memory map that is aligned stays a view (no copy, no extra RSS); one that is not
  is copied. For a file from :func:`write_safetensors` that is only the small tensors at the end.
- :func:`align_module_tensors` does the same for the parameters and buffers of a module that
  another loader (diffusers' ``from_pretrained``) filled from a memory map.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from diffq.errors import DiffqError
from diffq.io import atomic_path

#: torch's CPU allocator alignment (c10's ``gAlignment``)
ALIGNMENT = 64

#: safetensors' dtype names
_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in row-major order, as a flat uint8 tensor (a view when it is contiguous)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors with 64-byte aligned tensors (see the module
    docstring); atomically. metadata: str -> str, stored in the header's ``__metadata__``."""
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise DiffqError(f"tensor name {name!r} cannot be stored in a safetensors file")
        if t.dtype not in _CODES:
            raise DiffqError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise DiffqError("safetensors metadata must map str to str")
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    order = sorted(tensors, key=lambda n: (sizes[n] % ALIGNMENT != 0, n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)  # the format allows trailing spaces in the header
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            data = _bytes_of(tensors[name])
            if data.numel():
                f.write(memoryview(data.numpy()))
    return path


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is not on the CPU or its address is 64-byte aligned, else an aligned copy."""
    if t.device.type != "cpu" or t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.preserve_format)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each 64-byte aligned (a view of the file where it can be).
    Raises what safetensors raises on a damaged file (``SafetensorError``, ``OSError``, ``ValueError``)."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors as :func:`read_safetensors` gives them, the header's ``__metadata__`` or {}), from one
    opening of the file; raises as :func:`read_safetensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: aligned(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return tensors, dict(f.metadata() or {})


def align_module_tensors(module: nn.Module) -> int:
    """Replace every misaligned CPU parameter and buffer of ``module`` by an aligned copy (same
    values and dtype, and the same strides for dense tensors; a tensor shared by two modules stays
    shared); returns how many tensors were copied."""
    seen: dict[int, torch.Tensor] = {}  # id of a buffer as found -> the buffer to use
    copied = 0
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen[id(p)] = p
                data = p.data  # a new view object on every access: compare against this one
                new = aligned(data)
                if new is not data:
                    p.data = new  # the same Parameter object: every module that shares it sees the copy
                    copied += 1
        for name, b in m._buffers.items():
            if b is None:
                continue
            if id(b) not in seen:
                seen[id(b)] = aligned(b)
                copied += seen[id(b)] is not b
            m._buffers[name] = seen[id(b)]
    return copied
