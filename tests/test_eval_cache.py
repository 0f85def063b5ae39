"""Generation cache: keys, atomic writes, completeness checks, resume after a SIGKILL mid-run.

The subprocess test runs the real command (``python -m diffq.apps.generate`` on the tiny SD
pipeline), kills it with SIGKILL while it is writing images, resumes it, and checks that no stored
image was lost or regenerated and that nothing incomplete was ever counted as stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffq.apps.generate import generate_sharded, make_jobs
from diffq.errors import CheckpointError
from diffq.eval import GenerationCache, GenerationJob, cache_key, generate_cached, shard_jobs
from diffq.eval.cache import is_complete_png
from diffq.eval.features import EvalInputError

REPO = Path(__file__).resolve().parents[1]


def _jobs(n: int, **kw) -> list[GenerationJob]:
    base = {"model": "m", "recipe": "fp", "steps": 4, "guidance": None, "height": 8, "width": 8} | kw
    return [GenerationJob(prompt=f"p{i % 3}", seed=i, **base) for i in range(n)]


def _fake_image(job: GenerationJob) -> torch.Tensor:
    g = torch.Generator().manual_seed(job.seed * 7919 + len(job.prompt))
    return torch.rand(3, job.height, job.width, generator=g)


class Recorder:
    """A generate_fn that remembers every job it was asked for."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, batch: list[GenerationJob]) -> torch.Tensor:
        self.calls.append([j.key for j in batch])
        return torch.stack([_fake_image(j) for j in batch])

    @property
    def keys(self) -> list[str]:
        return [k for c in self.calls for k in c]


# ------------------------------------------------------------------------------------------ keys


def test_key_changes_with_every_field_and_ignores_number_types():
    j = GenerationJob("m", "fp", "a cat", 1, 20, 3.0, 32, 32)
    assert j.key == cache_key("m", "fp", "a cat", 1, 20, 3.0, 32, 32)
    assert j.key == GenerationJob("m", "fp", "a cat", 1, 20, 3, 32, 32).key  # 3 == 3.0
    variants = [("m2", "fp", "a cat", 1, 20, 3.0, 32, 32), ("m", "w8a8", "a cat", 1, 20, 3.0, 32, 32),
                ("m", "fp", "a dog", 1, 20, 3.0, 32, 32), ("m", "fp", "a cat", 2, 20, 3.0, 32, 32),
                ("m", "fp", "a cat", 1, 21, 3.0, 32, 32), ("m", "fp", "a cat", 1, 20, None, 32, 32),
                ("m", "fp", "a cat", 1, 20, 3.0, 64, 32), ("m", "fp", "a cat", 1, 20, 3.0, 32, 64)]
    keys = {GenerationJob(*v).key for v in variants}
    assert len(keys) == len(variants) and j.key not in keys


# ------------------------------------------------------------------------------ store / complete


def test_put_get_round_trip_is_exact_at_8_bits_and_stores_the_job(tmp_path):
    cache = GenerationCache(tmp_path)
    job = _jobs(1)[0]
    img = _fake_image(job)
    path = cache.put(job.key, img, job)
    assert path == cache.path(job.key) and is_complete_png(path)
    back = cache.get(job.key)
    assert back.shape == (3, 8, 8)
    assert torch.equal(back, (img * 255).round() / 255)
    assert cache.job_of(job.key) == json.loads(job.canonical_json())
    assert cache.keys() == [job.key] and cache.verify() == []
    assert cache.get(_jobs(2)[1].key) is None
    with pytest.raises(EvalInputError, match="hex digest"):
        cache.path("../etc/passwd")


def test_a_failed_write_leaves_neither_image_nor_temp_file(tmp_path, monkeypatch):
    from PIL import Image

    cache = GenerationCache(tmp_path)
    job = _jobs(1)[0]

    def half_write(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # some bytes reach the temp file, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        cache.put(job.key, _fake_image(job), job)
    assert job.key not in cache and cache.get(job.key) is None
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_incomplete_or_foreign_files_count_as_missing_and_are_regenerated(tmp_path):
    cache = GenerationCache(tmp_path)
    jobs = _jobs(4)
    first = Recorder()
    generate_cached(first, jobs, cache, progress=False)
    # 1: truncated (e.g. a non-atomic copy of the cache folder); 2: another job's image under this key
    p1, p2 = cache.path(jobs[1].key), cache.path(jobs[2].key)
    data = p1.read_bytes()
    p1.write_bytes(data[: len(data) // 2])
    p2.write_bytes(cache.path(jobs[3].key).read_bytes())
    assert not is_complete_png(p1)
    assert cache.missing(j.key for j in jobs) == [jobs[1].key]  # cheap check: truncation
    with pytest.raises(CheckpointError, match="incomplete"):
        cache.get(jobs[1].key)
    with pytest.raises(CheckpointError, match="incomplete"):
        cache.load([j.key for j in jobs])  # never scored
    assert sorted(cache.verify()) == sorted([jobs[1].key, jobs[2].key])  # full audit: both
    assert sorted(cache.verify(remove=True)) == sorted([jobs[1].key, jobs[2].key])
    again = Recorder()
    out = generate_cached(again, jobs, cache, progress=False)
    assert sorted(again.keys) == sorted([jobs[1].key, jobs[2].key])
    assert cache.verify() == []
    ref = torch.stack([(_fake_image(j) * 255).round() / 255 for j in jobs])
    assert torch.equal(out, ref)


def test_generate_cached_runs_only_missing_jobs_once_grouped_by_settings(tmp_path):
    cache = GenerationCache(tmp_path)
    jobs = _jobs(5) + _jobs(3, steps=8) + _jobs(2)  # the last two duplicate the first two
    rec = Recorder()
    out = generate_cached(rec, jobs, cache, progress=False, batch_size=2)
    assert out.shape == (10, 3, 8, 8) and torch.equal(out[8], out[0])
    assert len(rec.keys) == len(set(rec.keys)) == 8
    for call in rec.calls:  # one pipeline call never mixes steps
        assert len(call) <= 2
        assert len({cache.job_of(k)["steps"] for k in call}) == 1
    rec2 = Recorder()
    generate_cached(rec2, jobs + _jobs(6)[5:], cache, progress=False)
    assert rec2.keys == [_jobs(6)[5].key]


def test_clean_temp_removes_only_old_leftovers(tmp_path):
    cache = GenerationCache(tmp_path)
    job = _jobs(1)[0]
    cache.put(job.key, _fake_image(job), job)
    old = cache.path(job.key).parent / f".{job.key}.abc.tmp"
    new = cache.path(job.key).parent / f".{job.key}.def.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cache.clean_temp() == 1
    assert not old.exists() and new.exists() and job.key in cache
    assert cache.keys() == [job.key]


# -------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_job(world):
    jobs = _jobs(20)
    shards = [shard_jobs(jobs, world, i) for i in range(world)]
    keys = [j.key for s in shards for j in s]
    assert sorted(keys) == sorted(j.key for j in jobs) and len(keys) == len(set(keys))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_index_out_of_range_and_plain_process_default():
    jobs = _jobs(5)
    with pytest.raises(EvalInputError, match="out of range"):
        shard_jobs(jobs, 2, 2)
    assert shard_jobs(jobs) == jobs  # not launched: one process holds everything


def test_generate_sharded_with_explicit_shards_writes_records(tmp_path):
    cache = GenerationCache(tmp_path / "cache")
    jobs = make_jobs("m", "fp", ["a", "b", "c"], images_per_prompt=3, steps=2, height=8, width=8)
    assert [j.seed for j in jobs] == list(range(9)) and [j.prompt for j in jobs[:4]] == ["a", "a", "a", "b"]
    reports = [generate_sharded(Recorder(), jobs, cache, out=tmp_path / "rec", num_shards=2, index=i,
                                progress=False) for i in range(2)]
    assert [r.generated for r in reports] == [5, 4] and all(r.cached == 0 for r in reports)
    recs = [json.loads((tmp_path / "rec" / f"shard-{i:03d}-of-002.json").read_text()) for i in range(2)]
    assert sorted(recs[0]["keys"] + recs[1]["keys"]) == sorted(j.key for j in jobs)
    assert cache.missing(j.key for j in jobs) == []
    again = generate_sharded(Recorder(), jobs, cache, out=tmp_path / "rec", num_shards=2, index=0, progress=False)
    assert again.generated == 0 and again.cached == 5


# ------------------------------------------------------------------------------- kill + resume


def _snapshot(cache: GenerationCache) -> dict[str, tuple[int, int, str]]:
    """key -> (inode, mtime_ns, sha256) of every complete image: a rewrite changes the inode."""
    out = {}
    for k in cache.keys():  # noqa: SIM118 - a method, not a dict
        p = cache.path(k)
        st = p.stat()
        out[k] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_sigkill_midway_then_resume_loses_and_recomputes_nothing(tmp_path):
    from diffq.apps.generate import checkpoint_recipe_id
    from diffq.eval.prompts import prompt_list

    n = 24
    cache = GenerationCache(tmp_path / "cache")
    cmd = [sys.executable, "-m", "diffq.cli", "generate", "--model", "tiny-sd", "--steps", "2",
           "--prompts", "digits", "--num-prompts", str(n), "--batch-size", "1", "--cache", str(cache.root),
           "--out", str(tmp_path / "rec"), "--json", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "DIFFQ_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    jobs = make_jobs("tiny-sd", checkpoint_recipe_id(None), prompt_list("digits", n), steps=2)

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while len(cache.keys()) < 3:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no images appeared in 90 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    before = _snapshot(cache)
    assert 3 <= len(before) < n, "the kill should land mid-run"
    assert set(before) <= {j.key for j in jobs}
    assert cache.verify() == []  # every file that exists under a key is a complete, matching PNG
    # Simulate the worst leftovers: an old temp file of a killed writer, and a truncated file under a
    # key (as a non-atomic copy would leave). Neither may be scored; the truncated one is regenerated.
    missing = cache.missing(j.key for j in jobs)
    torn = cache.path(missing[0])
    torn.parent.mkdir(parents=True, exist_ok=True)
    some = next(iter(before))
    torn.write_bytes(cache.path(some).read_bytes()[:60])
    stale = cache.path(some).parent / f".{some}.dead.tmp"
    stale.write_bytes(b"\x89PNG half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert missing[0] not in cache and len(cache.missing(j.key for j in jobs)) == n - len(before)

    res = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["keys"] == [j.key for j in jobs] and report["complete"] is True
    assert report["generated"] == n - len(before) and report["cached"] == len(before)  # nothing recomputed
    after = _snapshot(cache)
    assert set(after) == {j.key for j in jobs}  # nothing lost
    assert {k: after[k] for k in before} == before  # stored images untouched (same inode, time, bytes)
    assert is_complete_png(torn) and not stale.exists()
    assert cache.verify() == []
    assert [p for p in cache.root.rglob("*.tmp")] == []
    assert cache.load([j.key for j in jobs]).shape == (n, 3, 32, 32)
    manifest = json.loads((tmp_path / "rec" / "jobs.json").read_text())
    assert [j["key"] for j in manifest["jobs"]] == [j.key for j in jobs]
