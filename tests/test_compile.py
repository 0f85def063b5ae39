"""torch.compile on quantized denoisers: no graph breaks (``torch._dynamo.explain``), compiled == eager,
no recompile when the timestep changes and at most one per new resolution.

The quantized forward has no host syncs (the timestep group is a tensor lookup) and no data-dependent
branches (finite checks only with DIFFQ_CHECK_FINITE). Tracing on CPU is slow, so the default run traces
one preset per family (six different code paths) and compiles with ``aot_eager``; the full
family x preset matrix and a whole-denoiser inductor build are ``-m slow``. Inductor runs here on a
single quantized layer with a static per-timestep activation range.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import diffq
from diffq.calibration import calibrate
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

PRESETS = [p for p in diffq.PRESETS if p != "mixed"]
#: one preset per family for the default run, each exercising a different path (static per-timestep
#: lookup, smoothing + low-rank branch, NVFP4, int4 groups, int4 activations, 3-bit packing); the
#: full family x preset matrix is -m slow
DEFAULT = [("sd", "w8a8-static"), ("sdxl", "w4a4-svd"), ("pixart", "fp4"), ("sd3", "w4a8"), ("flux", "w4a4"),
           ("dit", "w3a8")]


def _quantized(family: str, preset: str):
    pipe = tiny_pipeline(family)
    prompts = [0] if family == "dit" else ["a cat"]
    stats = calibrate(pipe, prompts, num_inference_steps=2, progress=False, reservoir=16)
    diffq.quantize(pipe, preset, calibration=stats, progress=False)
    return pipe


def _denoiser_calls(pipe, family: str, **call) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every denoiser call of a short pipeline run."""
    den = adapter_for(pipe).denoiser(pipe)
    calls = []
    h = den.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**{**tiny_call_kwargs(family), "num_inference_steps": 2, **call})
    finally:
        h.remove()
    return calls


def _explain(den: nn.Module, args, kwargs):
    torch._dynamo.reset()
    with torch.no_grad():  # through a lambda, so the denoiser's pre-hooks are traced with its forward
        return torch._dynamo.explain(lambda *a, **k: den(*a, **k))(*args, **kwargs)


def _check_no_graph_breaks(family: str, preset: str) -> None:
    pipe = _quantized(family, preset)
    args, kwargs = _denoiser_calls(pipe, family)[0]
    ex = _explain(adapter_for(pipe).denoiser(pipe), args, kwargs)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [r.reason for r in ex.break_reasons][:3]


@pytest.mark.parametrize(("family", "preset"), DEFAULT, ids=[f"{f}-{p}" for f, p in DEFAULT])
def test_quantized_denoiser_traces_without_graph_breaks(family, preset):
    _check_no_graph_breaks(family, preset)


def test_default_set_covers_every_family():
    assert {f for f, _ in DEFAULT} == set(TINY_FAMILIES) and len({p for _, p in DEFAULT}) == len(DEFAULT)


class _Counter:
    """A dynamo backend that counts (re)compilations and runs the graph as traced."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_compiled_matches_eager_and_recompiles_only_for_new_resolutions():
    """fullgraph compile of a static-range recipe (the timestep lookup is in the graph): every step of a
    run reuses its compilation (a new timestep is data), and each new resolution adds at most one
    (the third, non-square one recompiles for diffusers' own square-grid position-embedding guard)."""
    pipe = _quantized("pixart", "w8a8-static")
    den = pipe.transformer
    runs = [_denoiser_calls(pipe, "pixart"), _denoiser_calls(pipe, "pixart", height=48, width=48),
            _denoiser_calls(pipe, "pixart", height=64, width=32)]
    counter = _Counter()
    torch._dynamo.reset()
    compiled = torch.compile(den, fullgraph=True, backend=counter)
    after_first, after_run = [], []
    with torch.no_grad():
        for calls in runs:
            assert len(calls) >= 2, "several steps (timesteps) per resolution"
            for i, (args, kwargs) in enumerate(calls):
                eager = den(*args, **kwargs)[0]
                out = compiled(*args, **kwargs)[0]
                assert (out - eager).abs().max() <= 1e-5 * eager.abs().max()
                if i == 0:
                    after_first.append(counter.compiles)
            after_run.append(counter.compiles)
    assert after_first == after_run, "no recompile from one step to the next"
    assert after_run[0] >= 1 and all(b - a <= 1 for a, b in itertools.pairwise(after_run)), after_run


def test_inductor_compiles_a_static_quantized_layer_and_follows_the_timestep():
    from torch._dynamo.utils import counters

    from diffq.formats import QuantSpec, quantize
    from diffq.modules import ActQuantizer, QuantLinear, TimestepTracker

    torch.manual_seed(0)
    w = torch.randn(48, 64)
    table = torch.zeros(1001, dtype=torch.int16)
    table[500:] = 1  # two timestep groups with different ranges
    act = ActQuantizer(QuantSpec("int8", "tensor"), amax=torch.tensor([[2.0], [0.5]]), bucket_to_group=table)
    tracker = TimestepTracker()
    act.tracker = tracker
    layer = QuantLinear(quantize(w, QuantSpec("int4", "group", 32, "fp16")), act=act, bias=torch.randn(48))
    def step(x, t):
        tracker.set_timestep(t)
        return layer(x)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x = torch.randn(4, 64)
    outs = {}
    with torch.no_grad():
        for t in (900.0, 100.0, 700.0, 300.0):
            tt = torch.tensor(t)
            eager = step(x, tt)
            outs[t] = compiled(x, tt)
            assert torch.allclose(outs[t], eager, rtol=1e-5, atol=1e-5), t
    assert counters["stats"]["unique_graphs"] == 1, "a new timestep is data, not a recompile"
    assert not torch.allclose(outs[900.0], outs[100.0]), "the two groups' ranges give different outputs"
    assert torch.equal(outs[900.0], outs[700.0]) and torch.equal(outs[100.0], outs[300.0])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_fixture_and_preset_traces_without_graph_breaks(family, preset):
    _check_no_graph_breaks(family, preset)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "preset"), [("dit", "w4a4-svd"), ("flux", "fp4")])
def test_inductor_denoiser_matches_eager(family, preset):
    pipe = _quantized(family, preset)
    den = adapter_for(pipe).denoiser(pipe)
    args, kwargs = _denoiser_calls(pipe, family)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        eager = den(*args, **kwargs)[0]
        out = torch.compile(den, fullgraph=True, backend="inductor")(*args, **kwargs)[0]
    assert (out - eager).norm() / eager.norm() < 1e-4
