"""Standalone checkpoints: ``diffq.save`` writes the whole quantized denoiser and its config, and
``diffq.load_pipeline`` rebuilds it on meta without the full-precision denoiser, bit for bit, for
every family; delta checkpoints still load with ``diffq.load``; meta weights, dtype changes and
damaged standalone fields get errors that say so."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import diffq
from diffq.checkpoint import MANIFEST_FILE, TENSORS_FILE, manifest_digest
from diffq.errors import CheckpointError
from diffq.modules import quantized_modules
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline
from diffq.quantization.state import quant_state
from diffq.tensor_file import ALIGNMENT

PRESET = {"sd": "w4a4-svd", "sdxl": "w8a8-static", "pixart": "w4a8", "sd3": "w4a4-svd", "flux": "w4a4-svd",
          "dit": "w4a8"}


def _quantized(family):
    base = tiny_pipeline(family)
    pipe = copy.deepcopy(base)
    stats = diffq.calibrate(pipe, [0] if family == "dit" else ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    diffq.quantize(pipe, PRESET[family], calibration=stats, progress=False)
    return base, pipe


def _images(pipe, family, like=None):
    if like is not None and hasattr(like, "default_sample_size"):  # the tiny FLUX fixture's instance setting
        pipe.default_sample_size = like.default_sample_size
    kw = {**tiny_call_kwargs(family), "num_inference_steps": 2}
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_standalone_round_trip_on_meta_is_bit_identical(tmp_path, family):
    base, pipe = _quantized(family)
    out = _images(pipe, family)
    diffq.save(pipe, tmp_path)
    q = diffq.load_pipeline(tmp_path, base)
    den, base_den = adapter_for(q).denoiser(q), adapter_for(base).denoiser(base)
    assert den is not base_den and quant_state(base_den) is None  # the base's denoiser is neither used nor touched
    base_ptrs = {t.untyped_storage().data_ptr() for t in base_den.state_dict().values()}
    assert not base_ptrs & {t.untyped_storage().data_ptr() for t in [*den.parameters(), *den.buffers()]}
    assert quant_state(den).recipe == quant_state(adapter_for(pipe).denoiser(pipe)).recipe
    assert set(quantized_modules(den)) == set(quantized_modules(adapter_for(pipe).denoiser(pipe)))
    # torch's alignment, or CPU kernels may round differently from the saved model (diffq.tensor_file)
    assert not [n for n, t in [*den.named_parameters(), *den.named_buffers()] if t.data_ptr() % ALIGNMENT]
    assert torch.equal(_images(q, family, like=base), out)


def test_load_pipeline_from_a_folder_without_the_denoiser(tmp_path):
    """base as a folder whose denoiser weights were deleted: nothing of the full-precision denoiser is read."""
    base, pipe = _quantized("sd")
    out = _images(pipe, "sd")
    diffq.save(pipe, tmp_path / "ck")
    base.save_pretrained(tmp_path / "base")
    shutil.rmtree(tmp_path / "base" / "unet")
    q = diffq.load_pipeline(tmp_path / "ck", base=str(tmp_path / "base"))
    q.set_progress_bar_config(disable=True)
    assert torch.equal(_images(q, "sd"), out)


def test_delta_checkpoint_still_loads_and_is_refused_by_load_pipeline(tmp_path):
    base, pipe = _quantized("flux")
    out = _images(pipe, "flux")
    diffq.save(pipe, tmp_path, standalone=False)
    assert "dense" not in json.loads((tmp_path / MANIFEST_FILE).read_text())
    with pytest.raises(CheckpointError, match="delta checkpoint.*diffq.load"):
        diffq.load_pipeline(tmp_path, base)
    assert torch.equal(_images(diffq.load(tmp_path, copy.deepcopy(base)), "flux", like=base), out)


def test_standalone_checkpoint_also_loads_onto_the_base(tmp_path):
    base, pipe = _quantized("sd3")
    out = _images(pipe, "sd3")
    diffq.save(pipe, tmp_path)
    assert torch.equal(_images(diffq.load(tmp_path, copy.deepcopy(base)), "sd3"), out)


def test_meta_denoiser_gets_a_clear_error_not_a_fingerprint_crash():
    from diffusers import FluxTransformer2DModel

    pipe = tiny_pipeline("flux")
    with torch.device("meta"):
        meta = FluxTransformer2DModel.from_config(pipe.transformer.config)
    pipe.transformer = meta
    with pytest.raises(CheckpointError, match="meta device.*load_pipeline"):
        diffq.quantize(pipe, "w8a8", progress=False)


def test_dtype_change_is_reported_as_a_dtype_change(tmp_path):
    base, pipe = _quantized("sd")
    diffq.save(pipe, tmp_path)
    half = copy.deepcopy(base).to(torch.bfloat16)
    with pytest.raises(CheckpointError, match="quantized from a float32 model.*bfloat16.*torch_dtype=torch.float32"):
        diffq.load(tmp_path, half)
    with pytest.raises(CheckpointError, match="different base model"):
        diffq.load(tmp_path, tiny_pipeline("sd", seed=1))


def _rewrite_manifest(folder, edit):
    path = folder / MANIFEST_FILE
    m = json.loads(path.read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["truncated", "dense_shape", "missing_dense", "config", "class"])
def test_damaged_standalone_checkpoint_is_refused(tmp_path, case):
    base, pipe = _quantized("dit")
    diffq.save(pipe, tmp_path)
    name = next(iter(json.loads((tmp_path / MANIFEST_FILE).read_text())["dense"]))
    if case == "truncated":
        f = tmp_path / TENSORS_FILE
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        match = "checksum"
    elif case == "dense_shape":
        _rewrite_manifest(tmp_path, lambda m: m["dense"][name].update(shape=[3, 3]))
        match = "manifest says"
    elif case == "missing_dense":
        _rewrite_manifest(tmp_path, lambda m: m["dense"].pop(name))
        match = "unset"
    elif case == "config":
        _rewrite_manifest(tmp_path, lambda m: m["denoiser_config"].update(num_layers=7))
        match = "lacks|unset|built from"
    else:
        _rewrite_manifest(tmp_path, lambda m: m.update(denoiser_class="os"))
        match = "not a diffusers model class"
    with pytest.raises(CheckpointError, match=match):
        diffq.load_pipeline(tmp_path, base)


def test_weight_only_4bit_resample_convs_are_close_and_round_trip(tmp_path):
    """What SD1.5's and SDXL's wide resample convs get under ``w4a4-svd`` (4-bit weights + branch,
    16-bit activations; the tiny fixture's narrow ones take int8 unless ``weight_only`` forces 4 bits):
    each conv stays close to its dense layer, and a standalone round trip is bit-identical."""
    base = tiny_pipeline("sd")
    pipe = copy.deepcopy(base)
    stats = diffq.calibrate(pipe, ["a cat"], num_inference_steps=2, progress=False, reservoir=16)
    recipe = diffq.get_preset("w4a4-svd").with_overrides({"weight_only": "int4:g64"})
    diffq.quantize(pipe, recipe, calibration=stats, progress=False)
    a = adapter_for(pipe)
    res = {n: m for n, m in quantized_modules(a.denoiser(pipe)).items() if a.role_of(n) == "resample"}
    assert res and all(m.wspec.bits == 4 and m.rank > 0 and m.act is None and m.smooth is None for m in res.values())
    dense = adapter_for(base).denoiser(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in res.items():
            x = torch.randn(2, m.in_channels, 8, 8, generator=g)
            ref = dense.get_submodule(name)(x)
            # int4 g64 on these random weights: about 9% relative error (int8 would be well under 1%)
            assert (m(x) - ref).norm() / ref.norm() < 0.12, name
    out = _images(pipe, "sd")
    diffq.save(pipe, tmp_path)
    q = diffq.load_pipeline(tmp_path, base)
    assert torch.equal(_images(q, "sd", like=base), out)
