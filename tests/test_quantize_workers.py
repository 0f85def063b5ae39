"""Layers quantized at once on CPU threads (``diffq.quantize(workers=N)``): the same result as one at a
time on one intra-op thread, the caller's thread setting restored, errors raised in the caller."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import diffq
from diffq.errors import QuantizationError
from diffq.modules import quantized_modules
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pipeline
from diffq.quantization import build as build_mod
from diffq.quantization.build import shared_input_sets
from diffq.quantization.selection import choose_layers
from diffq.quantization.workers import ordered_map


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for family in ("flux", "sd"):
        pipe = tiny_pipeline(family)
        kw = {} if family == "flux" else {"height": 32, "width": 32}
        out[family] = pipe, diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16, **kw)
    return out


def _buffers(root) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": t for n, m in quantized_modules(root).items() for b, t in m.named_buffers()}


def _quantized(pipe, stats, preset: str, threads: int, **kw):
    q = copy.deepcopy(pipe)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = diffq.quantize(q, preset, calibration=stats, progress=False, **kw)
        assert torch.get_num_threads() == threads  # restored after the workers
    finally:
        torch.set_num_threads(before)
    return q, summary


@pytest.mark.parametrize("family,preset", [("flux", "w4a4-svd"), ("sd", "w4a8")])
def test_workers_equal_one_layer_at_a_time_on_one_thread(calibrated, family, preset):
    pipe, stats = calibrated[family]
    ref, _ = _quantized(pipe, stats, preset, threads=1)
    got, summary = _quantized(pipe, stats, preset, threads=2, workers=3)
    a, b = _buffers(ref.unet if family == "sd" else ref.transformer), _buffers(
        got.unet if family == "sd" else got.transformer)
    assert len(a) > 20 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert summary.layers  # the summary lists the layers built on the workers
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}
    ia = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    ib = got(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ia, ib)


def test_the_sd_case_has_shared_smoothings(calibrated):
    """The w4a8 case above covers smoothings shared by q/k/v, which the workers find before the layers."""
    pipe, _ = calibrated["sd"]
    choices = choose_layers(pipe.unet, diffq.get_preset("w4a8"), None)
    assert len(shared_input_sets(pipe.unet, choices)) >= 2


def test_worker_error_is_raised_in_the_caller_and_threads_restored(calibrated, monkeypatch):
    pipe, stats = calibrated["flux"]
    original = build_mod.build_layer

    def failing(choice, *a, **kw):
        if choice.name.endswith("proj_mlp"):
            raise QuantizationError(f"boom in {choice.name}")
        return original(choice, *a, **kw)

    monkeypatch.setattr(build_mod, "build_layer", failing)
    q = copy.deepcopy(pipe)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(QuantizationError, match="boom in single_transformer_blocks"):
            diffq.quantize(q, "w4a4-svd", calibration=stats, progress=False, workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_workers_are_refused_before_anything_runs(calibrated, bad):
    pipe, stats = calibrated["flux"]
    q = copy.deepcopy(pipe)
    with pytest.raises(QuantizationError, match="workers must be a positive integer"):
        diffq.quantize(q, "w4a4-svd", calibration=stats, progress=False, workers=bad)
    assert not quantized_modules(q.transformer)


def test_ordered_map_keeps_order_and_runs_on_several_threads():
    seen = set()
    barrier = threading.Barrier(2, timeout=10)  # deadlocks (times out) unless two items run at once

    def fn(i):
        seen.add(threading.current_thread().name)
        if i < 2:
            barrier.wait()
        assert torch.get_num_threads() == 1
        return i * i

    assert list(ordered_map(fn, range(6), 2)) == [i * i for i in range(6)]
    assert len(seen) == 2
    assert list(ordered_map(lambda i: -i, range(3), 1)) == [0, -1, -2]


def test_block_streamed_quantization_with_workers_equals_serial(calibrated, tmp_path):
    pipe, stats = calibrated["flux"]
    ref, _ = _quantized(pipe, stats, "w4a4-svd", threads=1)
    got, _ = _quantized(pipe, stats, "w4a4-svd", threads=2, workers=2, work_dir=tmp_path / "blocks")
    a, b = _buffers(ref.transformer), _buffers(got.transformer)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "blocks").glob("block-*.safetensors"))) >= 3
