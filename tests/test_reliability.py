"""Reliability and safety: safe loading only, clear errors for bad input, faults survived.

The fault helpers live in ``tests/faults.py`` (``python -m benchmarks.fault_campaign`` runs them with
large N); here they run with small N: 3 SIGKILLed calibrations resumed, 20 corrupted checkpoints, a few hundred fuzzed
inputs per parser.
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffq
from diffq.errors import (
    CalibrationError,
    CheckpointError,
    DiffqError,
    FormatError,
    QuantizationError,
    RecipeError,
    ShapeError,
)
from diffq.modules import quantized_modules
from diffq.pipelines.testing import tiny_pipeline
from diffq.quantization.apply import is_quantized
from tests import faults as fc

ROOT = Path(__file__).resolve().parents[1]

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def worker():
    """The calibration fork server, started first so its imports overlap the in-process tests."""
    w = fc.CalibrationWorker(wait=False)
    yield w
    w.close()


@pytest.fixture(scope="module", autouse=True)
def _start_worker_early(worker):
    yield


@pytest.fixture(scope="module")
def sd():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sd):
    """(pristine base pipeline, checkpoint folder of its w4a8 quantization)."""
    base, folder = fc.make_checkpoint(tmp_path_factory.mktemp("ckpt") / "w4a8")
    return base, folder


# ================================================================================ 1. safe loading
SCANNED = ["diffq", "eval", "pipelines", "kernels", "scripts", "benchmarks"]
PICKLE_USE = re.compile(r"\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import|\bpickle\.(loads?|Unpickler)"
                        r"|allow_pickle\s*=\s*True")
TORCH_LOAD = re.compile(r"torch\.load\(")
REMOTE_CODE = re.compile(r"trust_remote_code\s*=\s*True")


def _sources(folders):
    for f in folders:
        yield from sorted((ROOT / f).rglob("*.py"))


def test_no_pickle_unsafe_torch_load_or_remote_code_in_source():
    bad = []
    for path in _sources(SCANNED):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            if PICKLE_USE.search(line) or REMOTE_CODE.search(line):
                bad.append(where)
            if TORCH_LOAD.search(line) and "weights_only=True" not in line:
                bad.append(where)
    assert not bad, "unsafe loading in the source tree:\n" + "\n".join(bad)


NON_ATOMIC = re.compile(r"(?<![\w.])open\([^)]*['\"][wax]b?\+?['\"]|\.write_text\(|\.write_bytes\(|json\.dump\(|torch\.save\("
                        r"|np\.save|\.to_csv\(")
NEEDS_TMP = re.compile(r"\.savefig\(|save_file\(|\.save\(\s*f\b|Image\.fromarray\(.*\)\.save\(|image\.save\(|grid\.save\(")


def test_library_writes_go_through_atomic_helpers():
    """diffq's packages write files only via diffq.io (temp name + fsync + os.replace)."""
    bad = []
    for path in _sources(["diffq", "eval", "pipelines", "kernels"]):
        if path == ROOT / "diffq" / "io.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if NON_ATOMIC.search(line) or (NEEDS_TMP.search(line) and "tmp" not in line and "(f," not in line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "direct writes to final paths:\n" + "\n".join(bad)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    from diffq.io import atomic_path, remove_stale_temps, write_text_atomic

    target = write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    (tmp_path / ".a.json.x1.tmp").write_text("left by SIGKILL")
    (tmp_path / ".b.json.x1.tmp").write_text("another file's")
    assert remove_stale_temps(target) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.x1.tmp", "a.json"]


# ================================================================================ 2. validation
def test_group_size_not_dividing_falls_back_as_documented(sd):
    from diffq.formats import QuantSpec, quantize
    from diffq.quantization.selection import choose_layers, fit_group

    g64 = QuantSpec("int4", "group", 64)
    assert fit_group(g64, 40).group_size == 8  # halved 64 -> 32 -> 16 -> 8
    assert fit_group(g64, 20) is None  # no group >= 8 divides 20: one scale per row
    with pytest.raises(FormatError, match="does not divide"):
        quantize(torch.randn(4, 40), g64)  # the low-level API refuses instead of guessing
    from diffq.quantization.presets import get_preset
    from diffq.quantization.recipe import Recipe

    fitted = [ch for ch in choose_layers(sd.unet, get_preset("w4a8")) if ch.skip is None]
    assert fitted and all(ch.weight.granularity != "group" or ch.module.in_features % ch.weight.group_size == 0
                          if isinstance(ch.module, torch.nn.Linear) else True for ch in fitted)
    assert "halved" in Recipe.__doc__


def test_rank_larger_than_layer_is_capped_or_refused(sd):
    from diffq.methods.lowrank import effective_rank, lowrank_split

    assert effective_rank(4096, 32, 64) == 8
    with pytest.raises(ShapeError, match="rank"):
        lowrank_split(torch.randn(8, 16), 9)
    with pytest.raises(RecipeError, match="rank"):
        diffq.quantization.recipe.Recipe(rank=5000)
    pipe = copy.deepcopy(sd)
    only_first_block = [r"^(?!down_blocks\.0\.)"]  # keeps the test fast
    diffq.quantize(pipe, {"preset": "w4a16", "rounding": "rtn", "smooth_alpha": None, "smooth_search": False, "rank": 4096, "skip_patterns": only_first_block}, progress=False)
    from diffq.modules import quantized_modules

    # lr_down [K, r], lr_up [r, N] with K = in_features x kernel area
    shapes = [(m.lr_down.shape[1], m.lr_down.shape[0], m.lr_up.shape[1])
              for m in quantized_modules(pipe.unet).values() if m.lr_down is not None]
    assert shapes and all(r == min(k, n) // 4 for r, k, n in shapes)


def test_calibration_from_another_pipeline_is_refused(sd):
    stats = diffq.calibrate(sd, ["a"], num_inference_steps=2, progress=False)
    other = tiny_pipeline("sdxl")
    with pytest.raises(CalibrationError, match="different model.*re-run diffq.calibrate"):
        diffq.quantize(other, "w8a8-static", calibration=stats, progress=False)


def test_calibration_checkpoint_of_another_run_is_not_overwritten(sd, tmp_path):
    ck = tmp_path / "cal.safetensors"
    diffq.calibrate(sd, ["a"], num_inference_steps=2, progress=False, checkpoint=ck)
    before = ck.read_bytes()
    with pytest.raises(CalibrationError, match="different calibration run.*another checkpoint path"):
        diffq.calibrate(sd, ["b"], num_inference_steps=2, progress=False, checkpoint=ck)
    assert ck.read_bytes() == before
    again = diffq.calibrate(sd, ["a"], num_inference_steps=2, progress=False, checkpoint=ck)
    assert again.meta["done"] == 1  # same run: resumed (nothing left to do)


def test_bit_plan_for_other_layers_is_refused(sd):
    pipe = copy.deepcopy(sd)
    with pytest.raises(RecipeError, match="does not have.*another model"):
        diffq.quantize(pipe, "mixed", plan={"down_blocks.9.attn.to_q": "w8a8"}, progress=False)
    assert not is_quantized(pipe)


@pytest.mark.parametrize("call", ["calibrate", "quantize", "generate", "prompt_list"])
def test_empty_prompt_lists(sd, call):
    from diffq.eval.prompts import prompt_list
    from diffq.generation import generate

    with pytest.raises(DiffqError, match="prompt"):
        if call == "calibrate":
            diffq.calibrate(sd, [], num_inference_steps=2)
        elif call == "quantize":
            diffq.quantize(copy.deepcopy(sd), "w8a8-static", prompts=[], progress=False)
        elif call == "generate":
            generate(sd, [], num_inference_steps=2)
        else:
            prompt_list("digits", 0)


@pytest.mark.parametrize("bad", [{"weight": "int9"}, {"weight": "int1"}, {"weight": {"dtype": "int16"}},
                                 {"act": "fp6"}, {"weight": "int4:g0"}, {"weight": {"dtype": "int4", "granularity":
                                                                                      "group", "group_size": -8}}])
def test_bits_out_of_range(bad):
    with pytest.raises(RecipeError) as e:
        diffq.quantization.recipe.Recipe.from_dict(bad)
    assert "use one of" in str(e.value) or "positive integer" in str(e.value)


def test_unknown_preset_and_family():
    from diffq.errors import UnsupportedModelError
    from diffq.quantization.presets import get_preset

    with pytest.raises(RecipeError, match="presets: w8a8"):
        get_preset("w3a3")
    with pytest.raises(RecipeError):
        get_preset(["w8a8"])
    with pytest.raises(UnsupportedModelError, match="valid families"):
        tiny_pipeline("sd4")


# ================================================================================ 3b. corrupted files
def test_random_corruptions_are_refused(tmp_path):
    counts = fc.corruption_trials(20, tmp_path, random.Random(1), log=lambda *a: None)
    assert counts["failures"] == []
    assert counts["wrong_exception"] == 0 and counts["silently_loaded"] == 0
    assert counts["refused"] + counts["benign_loaded_identical"] == 20
    assert counts["refused"] >= 15


def _copy(folder: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    return dst


def _resign(folder: Path, edit) -> None:
    from diffq.checkpoint import MANIFEST_FILE, manifest_digest

    m = json.loads((folder / MANIFEST_FILE).read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (folder / MANIFEST_FILE).write_text(json.dumps(m))


def _first_tensor(m: dict) -> dict:
    layer = next(iter(m["layers"].values()))
    return layer["tensors"]["qweight"]


@pytest.mark.parametrize("case", ["truncated_tensors", "empty_tensors", "truncated_manifest", "no_manifest",
                                  "shape_mismatch", "dtype_mismatch", "swapped_tensors", "edited_manifest",
                                  "other_base_model"])
def test_damaged_checkpoints_are_refused(saved, tmp_path, case):
    from safetensors.torch import load_file, save_file

    from diffq.checkpoint import MANIFEST_FILE, TENSORS_FILE, _sha256

    base, src = saved
    ck = _copy(src, tmp_path / "ck")
    tensors, manifest = ck / TENSORS_FILE, ck / MANIFEST_FILE
    expect = "checksum|corrupted|truncated"
    if case == "truncated_tensors":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif case == "empty_tensors":
        tensors.write_bytes(b"")
    elif case == "truncated_manifest":
        manifest.write_bytes(manifest.read_bytes()[:-40])
    elif case == "no_manifest":
        manifest.unlink()
        expect = "not a diffq checkpoint"
    elif case == "shape_mismatch":
        _resign(ck, lambda m: _first_tensor(m).update(shape=[s + 1 for s in _first_tensor(m)["shape"]]))
        expect = "manifest says.*inconsistent"
    elif case == "dtype_mismatch":
        _resign(ck, lambda m: _first_tensor(m).update(dtype="float16"))
        expect = "manifest says.*inconsistent"
    elif case == "swapped_tensors":  # a valid safetensors file with the right names, other dtypes
        t = {k: (v.float() if v.dtype == torch.uint8 else v) for k, v in load_file(tensors).items()}
        save_file(t, str(tensors))
        _resign(ck, lambda m: m.update(tensors_sha256=_sha256(tensors)))
        expect = "manifest says.*inconsistent"
    elif case == "edited_manifest":  # valid JSON, plausible value, not re-signed
        m = json.loads(manifest.read_text())
        next(iter(m["layers"].values()))["in_features"] += 1
        manifest.write_text(json.dumps(m, indent=2))
        expect = "own checksum"
    elif case == "other_base_model":
        base = tiny_pipeline("sd", seed=1)
        expect = "different base model"
    pipe = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=expect):
        diffq.load(ck, pipe)
    assert not is_quantized(pipe)
    assert not quantized_modules(pipe.unet), "a refused load must not leave swapped layers behind"


def test_intact_checkpoint_still_loads(saved):
    base, src = saved
    pipe = diffq.load(src, copy.deepcopy(base))
    assert is_quantized(pipe) and quantized_modules(pipe.unet)


# ================================================================================ 3c. fuzzing
def _no_crash(fn, x):
    try:
        fn(x)
    except DiffqError:
        pass


@FUZZ
@given(fc.recipe_dicts() | fc._json_values())
def test_fuzz_recipe_from_dict(d):
    _no_crash(diffq.quantization.recipe.Recipe.from_dict, d)


@FUZZ
@given(fc.file_payloads(fc.recipe_dicts()))
def test_fuzz_recipe_files(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("r") / "recipe.yaml"
    p.write_bytes(data)
    _no_crash(lambda q: diffq.load_recipe_files([q]), p)


@FUZZ
@given(st.lists(st.text(max_size=16) | st.sampled_from(["rank=8", "weight.group_size=7", "weight.dtype=int3",
                                                        "weight=null", "act.granularity=block"]), max_size=4))
def test_fuzz_recipe_overrides(items):
    _no_crash(diffq.quantization.recipe.Recipe().with_overrides, items)


@FUZZ
@given(fc.bitplan_dicts())
def test_fuzz_bitplan_dict(d):
    from diffq.mixed.plan import BitPlan

    _no_crash(lambda x: BitPlan.from_dict(x).summary(), d)


@FUZZ
@given(fc.file_payloads(fc.bitplan_dicts()))
def test_fuzz_bitplan_file(tmp_path_factory, data):
    from diffq.mixed.plan import BitPlan

    p = tmp_path_factory.mktemp("p") / "plan.json"
    p.write_bytes(data)
    _no_crash(lambda q: BitPlan.load(q).summary(), p)


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    fc.prepare_cli_files(d)
    return d


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_cli_argv(cli_dir, monkeypatch, data):
    """Any argv: exit 0/1/2 (or the stubbed model loading is reached), one-line errors, no traceback."""
    fc._stub_heavy(monkeypatch.setattr)
    monkeypatch.chdir(cli_dir)
    argv = data.draw(fc.cli_argvs(cli_dir))
    code, err = fc.run_cli(argv)
    fc.check_cli_result(argv, code, err)


def test_cli_errors_are_one_line(cli_dir, monkeypatch, capsys):
    from diffq.cli import main

    monkeypatch.chdir(cli_dir)
    bad_yaml = cli_dir / "broken.yaml"
    bad_yaml.write_text("rank: [1,\n  2\nweight: {")
    assert main(["quantize", "--out", "x", "--show-recipe", "--recipe", str(bad_yaml)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffq: error: recipe file")
    with pytest.raises(SystemExit) as exit_info:  # a count below 1 is command-line misuse: exit 2
        main(["calibrate", "--out", "x", "--num-prompts", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-prompts" in err
    assert main(["inspect", str(cli_dir / "ckpt")]) == 1
    assert "misses field" in capsys.readouterr().err


# ================================================================================ 5. numerical faults
def test_check_finite_names_layer_and_step(sd):
    from diffq.generation import generate
    from diffq.modules import quantized_modules
    from diffq.numerics import check_finite
    from diffq.quantization.state import quant_state

    pipe = copy.deepcopy(sd)
    diffq.quantize(pipe, "w8a8", progress=False)
    name, mod = next((n, m) for n, m in quantized_modules(pipe.unet).items() if m.bias is not None)
    tracker = quant_state(pipe.unet).tracker
    start = tracker.calls

    def poison(m, args):  # from the second denoiser call on, this layer's bias is NaN
        if tracker.calls - start >= 2:
            m.bias.fill_(float("nan"))

    h = mod.register_forward_pre_hook(poison)
    with check_finite(pipe), pytest.raises(QuantizationError) as e:
        generate(pipe, ["a"], num_inference_steps=3)
    h.remove()
    msg = str(e.value)
    assert f"denoiser/{name}" in msg and "step 1" in msg and "input was finite" in msg and "NaN" in msg


def test_check_finite_blames_upstream_and_env_switch(sd, monkeypatch):
    from diffq.generation import generate
    from diffq.modules import quantized_modules
    from diffq.quantization.state import quant_state

    monkeypatch.setenv("DIFFQ_CHECK_FINITE", "1")
    pipe = copy.deepcopy(sd)
    diffq.quantize(pipe, "w8a8", progress=False)
    assert quant_state(pipe.unet).finite_check.handles
    name, mod = list(quantized_modules(pipe.unet).items())[3]
    mod.register_forward_pre_hook(lambda m, args: (args[0] * float("inf"),) + tuple(args[1:]), prepend=True)
    with pytest.raises(QuantizationError, match=f"'denoiser/{re.escape(name)}'.*step 0.*already non-finite"):
        generate(pipe, ["a"], num_inference_steps=2)
    monkeypatch.delenv("DIFFQ_CHECK_FINITE")
    clean = copy.deepcopy(sd)
    diffq.quantize(clean, "w8a8", progress=False)
    assert quant_state(clean.unet).finite_check is None


def test_scales_are_never_zero_or_denormal():
    from diffq.formats import QuantSpec, quantize
    from diffq.formats.core import SCALE_MIN

    for x in (torch.zeros(4, 16), torch.full((4, 16), 1e-44)):
        q = quantize(x, QuantSpec("int8", "channel"))
        assert float(q.scale.min()) >= SCALE_MIN and torch.isfinite(q.codes.float()).all()
        q4 = quantize(x, QuantSpec("fp4_e2m1", "group", 16, "e4m3"))
        assert float(q4.scale.min()) > 0 and torch.isfinite(q4.scale).all()
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), QuantSpec("int8", "channel"))


# ================================================================================ 3a. kill and resume
def test_killed_calibrations_resume_with_nothing_lost(worker, tmp_path):
    """SIGKILL a checkpointed calibration at a random time, 3 times; every resume matches an
    uninterrupted run bit for bit and the checkpoint is always absent or loadable."""
    counts = fc.kill_resume_trials(3, tmp_path, random.Random(0), log=lambda *a: None, worker=worker)
    assert counts["failures"] == []
    assert counts["killed"] + counts["finished_before_kill"] == 3 and counts["killed"] >= 1
    assert counts["resumed_identical"] == 3
    assert counts["checkpoint_unloadable_after_kill"] == 0
    assert counts["temp_files_left"] == 0


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os

    from diffq.io import write_text_atomic

    mask = os.umask(0o022)
    try:
        out = write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (os.stat(out).st_mode & 0o777) == 0o644
