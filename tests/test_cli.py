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
    # w4a8 rounds with GPTQ: the CLI calibrates first (with input rows), here on 2 steps to stay quick
    assert main(["quantize", "--model", "tiny-sd", "--preset", "w4a8", "--set", "rank=4", "--quiet", "--steps", "2",
                 "--out", str(out), "--json"]) == 0
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
