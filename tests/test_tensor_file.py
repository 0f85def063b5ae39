"""diffq's safetensors files: any safetensors reader opens them bit for bit, and their tensors come
back at torch's 64-byte alignment (CPU kernels round differently on misaligned operands, so a
loaded model would not compute what the saved one did); files of other writers are aligned on read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffq.errors import DiffqError
from diffq.tensor_file import (
    ALIGNMENT,
    align_module_tensors,
    aligned,
    read_safetensors,
    read_safetensors_with_metadata,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 256, generator=g),  # sizes that are multiples of 64 bytes
        "w16": torch.randn(96, 32, generator=g).to(torch.bfloat16),
        "codes": torch.randint(0, 255, (40, 16), generator=g, dtype=torch.uint8),
        "bias": torch.randn(3, generator=g),  # and ones that are not
        "half": torch.randn(5, 7, generator=g).half(),
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([True, False, True]),
        "fp8": torch.randn(17, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(16, 8, generator=g).t(),  # written contiguous, same values
        "i64": torch.arange(5),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def test_written_file_reads_back_exactly_with_safetensors_itself(tmp_path):
    ts = _tensors()
    path = write_safetensors(tmp_path / "x.safetensors", ts, {"format": "diffq", "n": "3"})
    back = load_file(str(path))
    assert set(back) == set(ts)
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(_bits(back[k]), _bits(t)), k
    tensors, meta = read_safetensors_with_metadata(path)
    assert meta == {"format": "diffq", "n": "3"} and set(tensors) == set(ts)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tensors_of_64_byte_sizes_are_aligned_views_of_the_file(tmp_path):
    """No copy for them (a standalone checkpoint loads at about its own size); the others are copied."""
    ts = _tensors()
    path = write_safetensors(tmp_path / "x.safetensors", ts)
    raw = load_file(str(path))
    sized = [k for k, t in ts.items() if t.numel() and (t.numel() * t.element_size()) % ALIGNMENT == 0]
    assert sorted(sized) == ["codes", "strided", "w", "w16"]
    assert all(raw[k].data_ptr() % ALIGNMENT == 0 for k in sized)
    got = read_safetensors(path)
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in got.values() if t.numel())
    assert all(aligned(raw[k]) is raw[k] for k in sized)  # kept as views of the file: no copy
    assert any(aligned(raw[k]) is not raw[k] for k in ts if k not in sized)  # the small rest: copied
    assert all(torch.equal(_bits(got[k]), _bits(t)) for k, t in ts.items())


def test_files_of_other_writers_are_aligned_on_read(tmp_path):
    """safetensors' own writer puts the data at 8 + header bytes: most tensors come back misaligned."""
    ts = {k: t.contiguous() for k, t in _tensors().items()}
    save_file(ts, str(tmp_path / "y.safetensors"))
    assert any(t.data_ptr() % ALIGNMENT for t in load_file(str(tmp_path / "y.safetensors")).values() if t.numel())
    got = read_safetensors(tmp_path / "y.safetensors")
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in got.values() if t.numel())
    assert all(torch.equal(_bits(got[k]), _bits(t)) for k, t in ts.items())


def test_what_safetensors_cannot_store_is_refused_before_writing(tmp_path):
    target = tmp_path / "z.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(DiffqError, match="complex64"):
        write_safetensors(target, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(DiffqError, match="metadata"):
        write_safetensors(target, {"a": torch.zeros(2)}, {"k": 1})
    assert target.read_bytes() == b"previous"


def test_module_tensors_are_aligned_in_place_and_shared_ones_stay_shared():
    buf = torch.empty(4 * 64 + 8, dtype=torch.uint8)
    def at(offset, shape):  # a float32 tensor at a chosen misalignment, like a memory-map view
        n = torch.Size(shape).numel()
        return buf[offset:offset + 4 * n].view(torch.float32).view(shape)

    lin = nn.Linear(8, 4)
    lin.weight.data = at(4, (4, 8)).copy_(torch.randn(4, 8))
    lin.bias.data = torch.randn(4)  # torch's own memory: left as it is
    shared = at(136, (2, 3)).copy_(torch.randn(2, 3))
    a, b = nn.Module(), nn.Module()
    a.register_buffer("s", shared)
    b.register_buffer("s", shared)
    root = nn.ModuleDict({"lin": lin, "a": a, "b": b})
    param, bias_ptr, before = lin.weight, lin.bias.data_ptr(), lin.weight.detach().clone()
    assert lin.weight.data_ptr() % ALIGNMENT and shared.data_ptr() % ALIGNMENT
    assert align_module_tensors(root) == 2
    assert lin.weight is param and torch.equal(lin.weight, before) and lin.weight.data_ptr() % ALIGNMENT == 0
    assert lin.bias.data_ptr() == bias_ptr
    assert a.s is b.s and a.s.data_ptr() % ALIGNMENT == 0 and torch.equal(a.s, shared)
