"""Block-streamed quantization: a run killed mid-way resumes at the next block and ends identical to
an uninterrupted run; a meta-built denoiser quantized from its safetensors file equals the in-memory
quantization; another run's work_dir is refused."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import diffq
from diffq.errors import CheckpointError
from diffq.modules import quantized_modules
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pipeline
from diffq.quantization import streaming
from diffq.quantization.selection import choose_layers
from diffq.quantization.state import quant_state
from tests.faults import ROOT, child_env

FAMILY, PRESET = "flux", "w4a4-svd"


@pytest.fixture(scope="module")
def calibrated():
    pipe = tiny_pipeline(FAMILY)
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    return pipe, stats


def _buffers(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": t for n, m in quantized_modules(pipe.transformer).items() for b, t in m.named_buffers()}


def _same(a, b) -> None:
    ba, bb = _buffers(a), _buffers(b)
    assert ba.keys() == bb.keys()
    assert all(torch.equal(ba[k], bb[k]) and ba[k].dtype == bb[k].dtype for k in ba)
    kw = {**tiny_call_kwargs(FAMILY), "num_inference_steps": 2}
    ia = a(**kw, generator=torch.Generator().manual_seed(0)).images
    ib = b(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ia, ib)


@pytest.fixture(scope="module")
def reference(calibrated):
    pipe, stats = calibrated
    ref = copy.deepcopy(pipe)
    diffq.quantize(ref, PRESET, calibration=stats, progress=False)
    return ref


def test_blocks_of_flux():
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "x_embedder",
             "time_text_embed.timestep_embedder.linear_1"]
    assert [streaming.block_of(n) for n in names] == ["transformer_blocks.0", "single_transformer_blocks.1",
                                                      "x_embedder", "time_text_embed"]


def test_fault_mid_way_resumes_at_the_next_block(calibrated, reference, tmp_path, monkeypatch):
    pipe, stats = calibrated
    real = streaming.install_layers
    calls, fault = [], [True]

    def failing(root, chs, *a, **k):
        calls.append(chs[0].name)
        if len(calls) == 4 and fault and fault.pop():
            raise RuntimeError("injected fault")
        return real(root, chs, *a, **k)

    monkeypatch.setattr(streaming, "install_layers", failing)
    with pytest.raises(RuntimeError, match="injected fault"):
        diffq.quantize(copy.deepcopy(pipe), PRESET, calibration=stats, progress=False, work_dir=tmp_path)
    assert len(list(tmp_path.glob("block-*.safetensors"))) == 3
    calls.clear()
    resumed = copy.deepcopy(pipe)
    diffq.quantize(resumed, PRESET, calibration=stats, progress=False, work_dir=tmp_path)
    n_blocks = len(streaming.group_blocks(choose_layers(pipe.transformer, diffq.get_preset(PRESET))))
    assert n_blocks > 4 and len(calls) == n_blocks - 3  # the finished blocks were restored, not rebuilt
    _same(resumed, reference)


def test_sigkill_mid_way_resumes_identical(calibrated, reference, tmp_path):
    """A child process SIGKILLs itself right after writing its 4th block file; the rerun finishes."""
    pipe, stats = calibrated
    stats.save(tmp_path / "stats.safetensors")
    work = tmp_path / "work"
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's: float results depend on it
        import diffq
        from diffq.calibration import CalibrationStats
        from diffq.pipelines.testing import tiny_pipeline
        from diffq.quantization import streaming
        real, n = streaming._write_block, []
        def write(*a, **k):
            real(*a, **k)
            n.append(1)
            if len(n) == 4:  # after transformer_blocks.0, the first block with quantized layers
                os.kill(os.getpid(), signal.SIGKILL)
        streaming._write_block = write
        stats = CalibrationStats.load({str(tmp_path / "stats.safetensors")!r})
        diffq.quantize(tiny_pipeline({FAMILY!r}), {PRESET!r}, calibration=stats, progress=False, work_dir={str(work)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=child_env(), cwd=ROOT, capture_output=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(list(work.glob("block-*.safetensors"))) == 4
    resumed = copy.deepcopy(pipe)
    diffq.quantize(resumed, PRESET, calibration=stats, progress=False, work_dir=work)
    assert len(streaming.block_seconds(work)) > 2
    _same(resumed, reference)


def _meta_copy_with_file(pipe, tmp_path):
    """(the pipeline with its transformer rebuilt on meta, the transformer's weights in one safetensors file)."""
    from diffusers import FluxTransformer2DModel

    src = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(src))
    meta_pipe = copy.deepcopy(pipe)
    with torch.device("meta"):
        meta_pipe.transformer = FluxTransformer2DModel.from_config(pipe.transformer.config).eval()
    return meta_pipe, src


def test_meta_denoiser_streamed_from_its_file_equals_in_memory(calibrated, reference, tmp_path):
    pipe, stats = calibrated
    meta_pipe, src = _meta_copy_with_file(pipe, tmp_path)
    diffq.quantize(meta_pipe, PRESET, calibration=stats, progress=False, work_dir=tmp_path / "w", dense_source=src)
    assert not streaming.meta_tensors(meta_pipe.transformer)
    assert quant_state(meta_pipe.transformer).base_fingerprint == quant_state(reference.transformer).base_fingerprint
    _same(meta_pipe, reference)



def test_streamed_dense_layers_are_released_after_their_block(calibrated, reference, tmp_path, monkeypatch):
    """With dense_source, a block's dense weights live only while the block is quantized: every
    swapped-out layer is back on meta when the call returns (its dtype kept for the summary)."""
    pipe, stats = calibrated
    meta_pipe, src = _meta_copy_with_file(pipe, tmp_path)
    real, seen, materialised = streaming.install_layers, [], []

    def spy(root, chs, *a, **k):
        seen.extend(c for c in chs if c.skip is None)
        materialised.append(all(not p.is_meta for c in chs for p in c.module.parameters()))
        return real(root, chs, *a, **k)

    monkeypatch.setattr(streaming, "install_layers", spy)
    summary = diffq.quantize(meta_pipe, PRESET, calibration=stats, progress=False, work_dir=tmp_path / "w",
                             dense_source=src)
    assert len(seen) > 10 and all(materialised)
    assert all(p.is_meta for c in seen for p in c.module.parameters())
    assert summary == quant_state(reference.transformer).summary
    _same(meta_pipe, reference)

def test_work_dir_of_another_run_is_refused(calibrated, tmp_path):
    pipe, _ = calibrated
    diffq.quantize(copy.deepcopy(pipe), {"preset": "w4a8", "rounding": "rtn", "smooth_alpha": None, "smooth_search": False}, progress=False, work_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another quantization run"):
        diffq.quantize(copy.deepcopy(pipe), "w8a8", progress=False, work_dir=tmp_path)


def test_two_processes_split_the_blocks_and_make_one_checkpoint(calibrated, reference, tmp_path):
    """What ``accelerate launch --num_processes 2`` / ``torchrun`` set up (RANK, WORLD_SIZE), with 2 CPU
    processes on one work_dir: each quantizes every other block, rank 0 saves the checkpoint."""
    pipe, stats = calibrated
    stats.save(tmp_path / "stats.safetensors")
    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's: float results depend on it
        import diffq
        from diffq.calibration import CalibrationStats
        from diffq.pipelines.testing import tiny_pipeline
        stats = CalibrationStats.load({str(tmp_path / "stats.safetensors")!r})
        pipe = tiny_pipeline({FAMILY!r})
        diffq.quantize(pipe, {PRESET!r}, calibration=stats, progress=False, work_dir={str(work)!r})
        if os.environ["RANK"] == "0":
            diffq.save(pipe, {str(ckpt)!r})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**child_env(), "RANK": str(r), "WORLD_SIZE": "2"},
                              cwd=ROOT, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    ranks = [s["rank"] for s in streaming.block_seconds(work).values()]
    assert ranks == [i % 2 for i in range(len(ranks))] and len(ranks) > 4
    loaded = diffq.load_pipeline(ckpt, copy.deepcopy(pipe))
    loaded.default_sample_size = pipe.default_sample_size
    _same(loaded, reference)


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_streamed_calibration_of_a_meta_denoiser_equals_in_memory(family, tmp_path):
    """diffq.calibrate_streamed on a meta-built denoiser (weights read block by block from its file)
    gives the in-memory run's statistics bit for bit, and leaves the denoiser on meta; a denoiser
    whose weights are in memory is sent to diffq.calibrate."""
    from diffq.errors import CalibrationError
    from diffq.quantization.streamed_calibration import stream_blocks

    pipe = tiny_pipeline(family)
    den_name = "transformer" if family == "flux" else "unet"
    den = getattr(pipe, den_name)
    kw = {"num_inference_steps": 2, "progress": False, "reservoir": 8, **({} if family == "flux" else {"height": 32, "width": 32})}
    ref = diffq.calibrate(pipe, ["a cat"], **kw)
    src = tmp_path / "denoiser.safetensors"
    save_file({k: v.contiguous() for k, v in den.state_dict().items()}, str(src))
    meta_pipe = copy.deepcopy(pipe)
    with torch.device("meta"):
        meta_pipe.register_modules(**{den_name: type(den).from_config(den.config).eval()})
    assert stream_blocks(getattr(meta_pipe, den_name))  # blocks exist: not one resident model
    got = diffq.calibrate_streamed(meta_pipe, ["a cat"], dense_source=src, **kw)
    assert streaming.meta_tensors(getattr(meta_pipe, den_name)) and not any(
        not t.is_meta for t in getattr(meta_pipe, den_name).state_dict().values())
    assert got.layers.keys() == ref.layers.keys() and got.num_steps == ref.num_steps
    for name in ref.layers:
        assert torch.equal(got.layers[name].channel_absmax(), ref.layers[name].channel_absmax())
        assert torch.equal(got.reservoirs[name].rows, ref.reservoirs[name].rows)
    with pytest.raises(CalibrationError, match="diffq.calibrate"):
        diffq.calibrate_streamed(pipe, ["a cat"], dense_source=src, **kw)
