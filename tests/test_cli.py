"""The command line: help, exit codes, one-line errors, JSON output, quantize -> inspect."""

import json
import subprocess
import sys

import pytest

from diffq.cli import main


def test_help_and_presets(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "diffq demo" in capsys.readouterr().out
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "w4a4-svd" in data and data["w8a8"]["recipe"]["weight"]["dtype"] == "int8"


def test_misuse_exit_codes(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quantize"])  # missing --out
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffq: error:") and "--out" in err and err.count("\n") == 1
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffq: error:") and "Traceback" not in err and err.count("\n") == 1
    assert main(["quantize", "--model", "tiny-sd", "--preset", "w3a3", "--out", str(tmp_path / "x")]) == 1
    assert "unknown preset" in capsys.readouterr().err


def test_quantize_then_inspect(tmp_path, capsys):
    out = tmp_path / "ck"
    # w4a8 rounds with GPTQ: the CLI calibrates first (with input rows), here on 2 steps to stay quick;
    # two layers at a time (--workers)
    assert main(["quantize", "--model", "tiny-sd", "--preset", "w4a8", "--set", "rank=4", "--quiet", "--steps", "2",
                 "--workers", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size_ratio"] > 1
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"]["name"] == "w4a8" and info["layers"]
    assert info["bytes"] == summary["packed_bytes"]


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffq.cli", "inspect", str(tmp_path), "--debug"],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize(("argv", "needle"), [
    (["calibrate", "--model", "tiny-sd", "--steps", "0", "--out", "s.safetensors"], "--steps: 0 must be >= 1"),
    (["calibrate", "--model", "tiny-sd", "--num-prompts", "-3", "--out", "s.safetensors"], "--num-prompts: -3"),
    (["bench", "--model", "tiny-sd", "--repeats", "0"], "--repeats"),
    (["quantize", "--model", "tiny-sd", "--preset", "mixed", "--out", "ck"], "--plan PLAN.json"),
])
def test_command_line_misuse_exits_2_and_names_the_option(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize(("model", "needle"), [
    ("./missing_folder", "model folder './missing_folder' does not exist"),
    ("digits-xyz", "tiny-<family>"),
    ("tiny-xyz", "sd, sdxl, pixart, sd3, flux, dit"),
])
def test_bad_model_names_say_what_models_are(model, needle, capsys, tmp_path):
    assert main(["quantize", "--model", model, "--out", str(tmp_path / "ck")]) == 1
    err = capsys.readouterr().err
    assert needle in err and "huggingface-cli" not in err, err


def test_folder_without_model_index_is_named(capsys, tmp_path):
    (tmp_path / "notapipe").mkdir()
    assert main(["quantize", "--model", str(tmp_path / "notapipe"), "--out", str(tmp_path / "ck")]) == 1
    assert "no model_index.json" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_fails_before_loading_any_model(capsys, tmp_path, monkeypatch):
    import diffq.apps.models

    def never(*a, **k):
        raise AssertionError("the pipeline was loaded before the checkpoint was checked")

    monkeypatch.setattr(diffq.apps.models, "load_model", never)
    assert main(["eval", "--model", "tiny-sd", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "not a diffq checkpoint" in capsys.readouterr().err


def test_unknown_recipe_field_suggests_the_close_one(capsys, tmp_path):
    assert main(["quantize", "--model", "tiny-sd", "--set", "rnk=16", "--out", str(tmp_path / "ck")]) == 1
    assert "did you mean 'rank'?" in capsys.readouterr().err


def test_calibrate_steps_are_the_steps_asked_for(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["calibrate", "--model", "tiny-sd", "--steps", "3", "--num-prompts", "1", "--quiet",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
