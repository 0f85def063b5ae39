"""Data-parallel generation under ``accelerate launch``: two CPU processes (gloo) fill one cache.

This is the documented command (see ``diffq.apps.generate``) with ``--multi_gpu``, which is
accelerate's torchrun launcher; without CUDA the processes join over gloo on the CPU.  (``--cpu
--num_processes 2`` would start one process unless MPI is installed.)  A config file written here
keeps the user's own accelerate config out of the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffq.eval import GenerationCache

REPO = Path(__file__).resolve().parents[1]

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
dynamo_config: {}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_shard_disjoint_and_complete(tmp_path):
    pytest.importorskip("accelerate")
    from diffq.apps.generate import checkpoint_recipe_id, make_jobs
    from diffq.eval.prompts import prompt_list

    n = 11  # odd: shards of 6 and 5
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(ACCELERATE_CONFIG)
    cache = GenerationCache(tmp_path / "cache")
    out = tmp_path / "rec"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "diffq.cli", "generate", "--model", "tiny-sd", "--steps", "2", "--prompts", "digits",
           "--num-prompts", str(n), "--batch-size", "4", "--cache", str(cache.root), "--out", str(out),
           "--json", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "DIFFQ_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
                        "HF_HOME": str(tmp_path / "hf")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    res = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-4000:]

    jobs = make_jobs("tiny-sd", checkpoint_recipe_id(None), prompt_list("digits", n), steps=2)
    keys = [j.key for j in jobs]
    reports = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]  # really two processes
    records = [json.loads((out / f"shard-{i:03d}-of-002.json").read_text()) for i in range(2)]
    assert [r["keys"] for r in records] == [r["keys"] for r in reports]
    shard0, shard1 = (set(r["keys"]) for r in records)
    assert not shard0 & shard1                       # disjoint
    assert shard0 | shard1 == set(keys)              # complete
    assert (len(shard0), len(shard1)) == (6, 5)
    assert records[0]["keys"] == keys[0::2] and records[1]["keys"] == keys[1::2]
    assert [r["generated"] for r in records] == [6, 5]
    assert reports[0]["complete"] is True
    assert [j["key"] for j in json.loads((out / "jobs.json").read_text())["jobs"]] == keys
    assert cache.missing(keys) == [] and cache.verify() == [] and sorted(cache.keys()) == sorted(keys)
    assert cache.load(keys).shape == (n, 3, 32, 32)
