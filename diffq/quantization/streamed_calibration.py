"""Calibration of a denoiser whose weights are not in memory: one block's dense weights at a time.

``diffq.calibrate_streamed(pipe, prompts, dense_source="diffusion_pytorch_model.safetensors", ...)``
runs :func:`diffq.calibrate` on a pipeline whose denoiser was built on ``meta`` (e.g.
``with torch.device("meta"): FluxTransformer2DModel.from_config(cfg)``). The layers outside the
numbered blocks (embedders, final norm and projection: a few percent of the weights) are read from the
file once; each block of a ``ModuleList`` (``transformer_blocks.3``, ``down_blocks.1``...) is read
just before the block runs and put back on ``meta`` right after, at every denoiser call. Peak weight
memory is therefore the non-block layers plus one dense block, instead of the whole model, at the
cost of reading each block from the file (from the page cache after the first step) once per call.
The statistics are those of an in-memory run, bit for bit (``tests/test_streaming.py``), so the
block-streamed quantization (``diffq.quantize(..., dense_source=..., work_dir=...)``) can follow
without the model ever being materialised. When it returns, the denoiser is on ``meta`` again.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from torch import nn

from diffq.calibration import CalibrationStats, calibrate
from diffq.errors import CalibrationError
from diffq.pipelines.adapters import adapter_for
from diffq.quantization.standalone import assign_dense, meta_tensors
from diffq.quantization.streaming import DenseSource, release_dense, trim_heap


def stream_blocks(denoiser: nn.Module) -> list[str]:
    """Names of the blocks that are streamed: the children of the denoiser's ``ModuleList`` s that are
    not inside another block, in module order."""
    blocks: list[str] = []
    for name, mod in denoiser.named_modules():
        if isinstance(mod, nn.ModuleList) and not any(name.startswith(b + ".") for b in blocks):
            blocks += [f"{name}.{i}" for i in range(len(mod))]
    return blocks


def _release(block: nn.Module) -> None:
    """A block's dense tensors back on meta, and the freed heap returned to the system (glibc keeps
    freed blocks of this size otherwise, and every call reads every block again)."""
    release_dense(list(block.modules()))
    trim_heap()


@contextmanager
def streamed_weights(denoiser: nn.Module, source: DenseSource):
    """Inside: the non-block tensors are loaded, each block's are loaded for its forward only."""
    blocks = stream_blocks(denoiser)
    inside = tuple(b + "." for b in blocks)
    resident = [n for n in meta_tensors(denoiser) if not n.startswith(inside)]
    assign_dense(denoiser, source.read(resident))
    handles = []
    for b in blocks:
        mod = denoiser.get_submodule(b)
        handles.append(mod.register_forward_pre_hook(lambda m, args, b=b: source.materialise(denoiser, b)))
        handles.append(mod.register_forward_hook(lambda m, args, out: _release(m)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        release_dense(list(denoiser.modules()))


def calibrate_streamed(pipe, prompts: Sequence[str], *, dense_source, **kwargs) -> CalibrationStats:
    """:func:`diffq.calibrate` (same arguments) for a pipeline whose denoiser is on ``meta``, reading
    its weights block by block from ``dense_source``, the denoiser's safetensors file (see the module
    docstring). Statistics equal an in-memory run's; the run id uses the file's fingerprint, which is
    the in-memory model's. CalibrationError if the denoiser has weights in memory (use
    :func:`diffq.calibrate`), CheckpointError if the file is not this model's."""
    denoiser = adapter_for(pipe).denoiser(pipe)
    if not meta_tensors(denoiser):
        raise CalibrationError("the denoiser's weights are in memory: use diffq.calibrate; calibrate_streamed is "
                               "for a denoiser built on meta, with its weights in dense_source")
    source = DenseSource(dense_source)
    fingerprint = source.fingerprint(denoiser)
    with streamed_weights(denoiser, source):
        return calibrate(pipe, prompts, weights_id=fingerprint, **kwargs)
