"""Fault helpers shared by ``tests/test_reliability.py`` (small N) and the fault campaign
(``python -m benchmarks.fault_campaign``, large N), so both run the same code.

Faults:

* **kill/resume**: a calibration (``tiny_pipeline("sd")``, several prompts, ``batch_size=1``,
  ``checkpoint=``) runs in a child process that gets SIGKILL at a uniformly random time within an
  uninterrupted run's duration; after every kill the checkpoint must be absent or loadable, and a
  resumed run must produce statistics bit-identical to an uninterrupted run's. Children are forked
  from one long-lived worker process (``python -m tests.faults --worker``, started with
  ``OMP_NUM_THREADS=1``) that has already imported torch/diffusers and built the pipeline, so a trial
  costs about a second instead of a cold start.
* **corruption**: random byte changes, truncations and appended garbage on a saved checkpoint of a
  quantized tiny SD; every load must raise ``CheckpointError`` unless the change left the content
  identical (e.g. JSON whitespace), in which case the loaded model must equal the original.
* **fuzz** (hypothesis strategies below): ``Recipe.from_dict``, ``load_recipe_files``,
  ``BitPlan.from_dict/load`` and ``diffq.cli.main`` argv; any input must give a result, a
  ``DiffqError`` or exit code 0/1/2.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# calibration used by the kill/resume trials: several prompts, one per batch, so a kill can land
# before, between or in the middle of checkpoint writes
CAL_PROMPTS = ["the digit 0", "the digit 1", "the digit 2", "the digit 3", "the digit 4", "the digit 5"]
CAL_KW = {"num_inference_steps": 3, "batch_size": 1, "seed": 7, "progress": False}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DIFFQ_NO_PROGRESS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# ============================================================================ kill / resume
def _worker() -> int:
    """Fork server: read ``run <json>`` / ``reap <pid>`` / ``quit`` lines on stdin.

    ``run`` forks a child that writes ``marker`` (just before calibrating), calibrates with
    ``checkpoint`` and saves the result to ``out``; the worker answers ``pid N``. ``reap`` waits for
    that child and answers ``exit CODE`` (negative: killed by that signal). Children are reaped only
    on request, so a pid the controller kills can never have been reused by another process.
    """
    import torch

    torch.set_num_threads(1)
    from diffq.calibration import calibrate
    from diffq.pipelines.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd == "run":
            req = json.loads(arg)
            pid = os.fork()
            if pid == 0:  # child
                code = 0
                try:
                    Path(req["marker"]).write_text("started")
                    stats = calibrate(pipe, CAL_PROMPTS, checkpoint=req.get("checkpoint"), **CAL_KW)
                    if req.get("out"):
                        stats.save(req["out"])
                except BaseException:  # noqa: BLE001 - report anything, the controller decides
                    traceback.print_exc()
                    code = 3
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd == "reap":
            _, status = os.waitpid(int(arg), 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(f"exit {code}", flush=True)
    return 0


class CalibrationWorker:
    """Controller side of :func:`_worker` (a subprocess with OMP_NUM_THREADS=1)."""

    def __init__(self, wait: bool = True) -> None:
        """Start the worker; with ``wait=False`` its start-up (imports, pipeline) overlaps the caller's
        work until :meth:`wait_ready`."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults", "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, text=True, env=child_env(), cwd=str(ROOT),
        )
        self.ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"calibration worker did not start (got {line!r})")
        self.ready = True

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, marker: Path, checkpoint: Path | None, out: Path | None) -> int:
        req = {"marker": str(marker), "checkpoint": None if checkpoint is None else str(checkpoint),
               "out": None if out is None else str(out)}
        ans = self._ask("run " + json.dumps(req))
        if not ans.startswith("pid "):
            raise RuntimeError(f"worker answered {ans!r}")
        return int(ans.split()[1])

    def reap(self, pid: int) -> int:
        ans = self._ask(f"reap {pid}")
        if not ans.startswith("exit "):
            raise RuntimeError(f"worker answered {ans!r}")
        return int(ans.split()[1])

    def run(self, marker: Path, checkpoint: Path | None, out: Path | None, kill_after: float | None = None,
            timeout: float = 120.0) -> tuple[int, float]:
        """One child; SIGKILL it ``kill_after`` seconds after it started calibrating (None: let it finish).
        Returns (exit code, seconds from marker to kill or exit)."""
        marker.unlink(missing_ok=True)
        pid = self.start(marker, checkpoint, out)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                self.reap(pid)
                raise RuntimeError("calibration child never started")
            time.sleep(0.002)
        t0 = time.monotonic()
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # a zombie if it already finished: harmless, pid not reused
        code = self.reap(pid)
        return code, time.monotonic() - t0

    def close(self) -> None:
        if not self.ready:  # still importing: nothing to finish
            self.proc.kill()
            self.proc.wait()
            return
        with contextlib.suppress(Exception):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stats_equal(a, b) -> str | None:
    """None if two CalibrationStats hold bit-identical statistics, else what differs."""
    import torch

    if list(a.layers) != list(b.layers):
        return "different layer sets"
    if a.step_buckets != b.step_buckets or a.num_steps != b.num_steps:
        return "different step buckets"
    if {k: tuple(v) for k, v in a.splits.items()} != {k: tuple(v) for k, v in b.splits.items()}:
        return "different splits"
    for n in a.layers:
        for f in a.layers[n].FIELDS:
            x, y = getattr(a.layers[n], f), getattr(b.layers[n], f)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return f"layer {n} field {f} differs"
    return None


def kill_resume_trials(n: int, workdir: Path, rng: random.Random, log=print,
                       worker: CalibrationWorker | None = None) -> dict:
    """``n`` trials: start a checkpointed calibration, SIGKILL it at a random time, check the file,
    resume to completion, compare with an uninterrupted run. Returns counts. ``worker`` (closed here)
    may be started early by the caller so its start-up overlaps other work."""
    from diffq.calibration import CalibrationStats
    from diffq.errors import DiffqError

    workdir.mkdir(parents=True, exist_ok=True)
    worker = worker or CalibrationWorker(wait=False)
    worker.wait_ready()
    counts = {"trials": n, "killed": 0, "finished_before_kill": 0, "resumed_identical": 0,
              "killed_and_resumed_identical": 0,
              "checkpoint_absent_after_kill": 0, "checkpoint_loadable_after_kill": 0,
              "checkpoint_unloadable_after_kill": 0, "resume_mismatch": 0, "failures": []}
    try:
        marker = workdir / "started"
        ref_path = workdir / "reference.safetensors"
        code, duration = worker.run(marker, None, ref_path)
        if code != 0:
            raise RuntimeError(f"uninterrupted reference calibration failed (exit {code})")
        ref = CalibrationStats.load(ref_path)
        counts["uninterrupted_seconds"] = round(duration, 3)
        for i in range(n):
            ck = workdir / f"trial{i}.safetensors"
            out = workdir / f"trial{i}.result.safetensors"
            when = rng.uniform(0.0, duration)
            kill_code, _ = worker.run(marker, ck, None, kill_after=when)
            code = kill_code
            if code == -signal.SIGKILL:
                counts["killed"] += 1
            elif code == 0:
                counts["finished_before_kill"] += 1
            else:
                counts["failures"].append(f"trial {i}: child exited {code} before the kill")
                continue
            done_before = None
            if not ck.exists():
                counts["checkpoint_absent_after_kill"] += 1
            else:
                try:
                    done_before = CalibrationStats.load(ck).meta.get("done")
                    counts["checkpoint_loadable_after_kill"] += 1
                except DiffqError as e:
                    counts["checkpoint_unloadable_after_kill"] += 1
                    counts["failures"].append(f"trial {i}: checkpoint unloadable after kill at {when:.3f}s: {e}")
                    continue
            code, _ = worker.run(marker, ck, out)
            if code != 0:
                counts["failures"].append(f"trial {i}: resume exited {code}")
                continue
            diff = stats_equal(CalibrationStats.load(out), ref)
            if diff is None:
                counts["resumed_identical"] += 1
                counts["killed_and_resumed_identical"] += kill_code == -signal.SIGKILL
            else:
                counts["resume_mismatch"] += 1
                counts["failures"].append(f"trial {i}: resumed stats differ ({diff}); kill at {when:.3f}s, "
                                          f"{done_before} prompts done before")
            log(f"kill/resume trial {i + 1}/{n}: SIGKILL at {when:.2f}s (exit {kill_code}), "
                f"{done_before} of {len(CAL_PROMPTS)} prompts checkpointed, "
                f"{'identical' if diff is None else diff}")
            for p in (ck, out):
                p.unlink(missing_ok=True)
    finally:
        worker.close()
    # killed writers' temp files that the resumed runs did not clean up (expected 0)
    counts["temp_files_left"] = len(list(workdir.glob(".*.tmp")))
    return counts


# ============================================================================ corruption
def make_checkpoint(directory: Path):
    """Quantize a tiny SD (w4a8) and save it; returns (pristine base pipeline, checkpoint folder)."""
    import diffq
    from diffq.pipelines.testing import tiny_pipeline

    base = tiny_pipeline("sd")
    pipe = copy.deepcopy(base)
    diffq.quantize(pipe, {"preset": "w4a8", "rounding": "rtn", "smooth_alpha": None, "smooth_search": False}, progress=False)  # RTN: no calibration needed
    diffq.save(pipe, directory)
    return base, directory


def _quantized_state(pipe) -> dict:
    from diffq.modules import quantized_modules
    from diffq.pipelines.adapters import adapter_for

    den = adapter_for(pipe).denoiser(pipe)
    return {f"{n}.{b}": t.clone() for n, m in quantized_modules(den).items() for b, t in m.named_buffers()
            if t is not None}


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except (ValueError, RecursionError):
        return False


def corrupt_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random fault on a file's bytes: flipped bytes, a truncation, or appended garbage."""
    kind = rng.choices(["flip", "truncate", "append", "zero_run"], weights=[6, 2, 1, 1])[0]
    b = bytearray(data)
    if kind == "flip" or not b:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b)) if b else 0
            if b:
                b[i] = (b[i] + rng.randint(1, 255)) % 256
        return bytes(b), "flip"
    if kind == "truncate":
        return bytes(b[: rng.randrange(len(b))]), "truncate"
    if kind == "append":
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "append"
    i = rng.randrange(len(b))
    n = rng.randint(1, 256)
    b[i:i + n] = bytes(len(b[i:i + n]))
    return bytes(b), "zero_run"


def corruption_trials(n: int, workdir: Path, rng: random.Random, log=print) -> dict:
    """``n`` random corruptions of a saved checkpoint; each load must be refused with CheckpointError
    (or, when the content is unchanged, load the same model). Returns counts."""
    import torch

    import diffq
    from diffq.checkpoint import MANIFEST_FILE, TENSORS_FILE
    from diffq.errors import CheckpointError

    workdir.mkdir(parents=True, exist_ok=True)
    base, src = make_checkpoint(workdir / "pristine")
    originals = {f: (src / f).read_bytes() for f in (TENSORS_FILE, MANIFEST_FILE)}
    expected = _quantized_state(diffq.load(src, copy.deepcopy(base)))
    counts = {"trials": n, "refused": 0, "benign_loaded_identical": 0, "silently_loaded": 0,
              "wrong_exception": 0, "by_kind": {}, "failures": []}
    trial_dir = workdir / "trial"
    pipe = copy.deepcopy(base)  # a refused load leaves it untouched, so it is reused until a load succeeds
    for i in range(n):
        shutil.rmtree(trial_dir, ignore_errors=True)
        shutil.copytree(src, trial_dir)
        target = rng.choices([TENSORS_FILE, MANIFEST_FILE, "missing"], weights=[12, 7, 1])[0]
        if target == "missing":
            victim = rng.choice([TENSORS_FILE, MANIFEST_FILE])
            (trial_dir / victim).unlink()
            kind = f"missing {victim}"
            benign = False
        else:
            data, how = corrupt_bytes(originals[target], rng)
            (trial_dir / target).write_bytes(data)
            kind = f"{how} {target}"
            benign = data == originals[target] or (target == MANIFEST_FILE and _same_json(data, originals[target]))
        counts["by_kind"][kind] = counts["by_kind"].get(kind, 0) + 1
        try:
            diffq.load(trial_dir, pipe)
        except CheckpointError:
            counts["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - exactly what the campaign looks for
            pipe = copy.deepcopy(base)
            counts["wrong_exception"] += 1
            counts["failures"].append(f"trial {i} ({kind}): {type(e).__name__}: {e}")
            log(f"corruption trial {i}: {kind} raised {type(e).__name__}: {e}")
            continue
        got = _quantized_state(pipe)
        pipe = copy.deepcopy(base)
        same = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        if benign and same:
            counts["benign_loaded_identical"] += 1
        else:
            counts["silently_loaded"] += 1
            counts["failures"].append(f"trial {i} ({kind}): loaded without error (identical model: {same})")
    shutil.rmtree(trial_dir, ignore_errors=True)
    return counts


# ============================================================================ fuzzing
def _json_values():
    from hypothesis import strategies as st

    leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
            | st.text(max_size=20) | st.sampled_from(["int4", "int8", "fp8_e4m3", "group", "token", "channel",
                                                    "tensor", "fp16", "e4m3", "minmax", "mse", "w8a8", "fp16"]))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                        max_leaves=12)


def recipe_dicts():
    """Dicts that are mostly recipe-shaped (real field names, format-like values), sometimes not."""
    from dataclasses import fields

    from hypothesis import strategies as st

    from diffq.quantization.recipe import Recipe

    names = [f.name for f in fields(Recipe)]
    spec = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["int2", "int4", "int8", "uint4", "fp8_e4m3", "fp4_e2m1", "int9", "x"]) | _json_values(),
        "granularity": st.sampled_from(["tensor", "channel", "token", "group", "block"]) | _json_values(),
        "group_size": st.integers(-4, 300) | st.none() | _json_values(),
        "scale_dtype": st.sampled_from(["fp32", "fp16", "e4m3", "e8m0", "bf16"]) | _json_values(),
    })
    value = _json_values() | spec | st.sampled_from(["int4:g64", "int8:token", "int4:g0", "fp8_e4m3", "none", "int4:g"])
    keys = st.sampled_from(names + ["preset", "bits", ""]) | st.text(max_size=8)
    return st.dictionaries(keys, value, max_size=8)


def bitplan_dicts():
    from hypothesis import strategies as st

    presets = st.sampled_from(["w8a8", "w4a8", "w4a16", "fp16", "mixed", "bogus", "w4a4-svd"])
    return st.dictionaries(
        st.sampled_from(["assignments", "budget", "budget_kind", "realised", "objective", "units", "roles", "bits",
                         "params", "meta", "format", "extra"]),
        st.dictionaries(st.text(max_size=10), presets | _json_values(), max_size=4) | _json_values(), max_size=6,
    ) | _json_values()


def file_payloads(dict_strategy):
    """Bytes of a file: YAML/JSON dumps of a dict, random text, or random bytes."""
    from hypothesis import strategies as st

    def dump(d, how):
        import yaml

        try:
            return json.dumps(d).encode() if how == "json" else yaml.safe_dump(d).encode()
        except (ValueError, TypeError, yaml.YAMLError, RecursionError):
            return b"{}"

    return (st.tuples(dict_strategy, st.sampled_from(["json", "yaml"])).map(lambda t: dump(*t))
            | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
            | st.binary(max_size=200))


class _Reached(Exception):
    """The CLI got past argument validation to the heavy work (model loading), which fuzzing stubs out."""


def _stub_heavy(monkeypatch_setattr) -> None:
    """Replace model loading and the long-running commands with a marker exception."""
    import diffq.apps.bench
    import diffq.apps.demo
    import diffq.apps.models

    def reached(*a, **k):
        raise _Reached

    monkeypatch_setattr(diffq.apps.models, "load_model", reached)
    monkeypatch_setattr(diffq.apps.bench, "run_bench", reached)
    monkeypatch_setattr(diffq.apps.bench, "evaluate_checkpoint", reached)
    monkeypatch_setattr(diffq.apps.demo, "run_demo", reached)
    with contextlib.suppress(ImportError):
        import diffq.apps.generate as gs

        monkeypatch_setattr(gs, "run", reached)


def cli_argvs(workdir: Path):
    """argv lists built from real commands/flags, plausible and broken values, and random text."""
    from hypothesis import strategies as st

    cmds = st.sampled_from(["presets", "demo", "calibrate", "quantize", "inspect", "eval", "bench", "generate",
                            "bogus", "--help", "--version", ""])
    flags = st.sampled_from(["--json", "--debug", "--quiet", "--model", "--steps", "--guidance", "--preset",
                             "--recipe", "--set", "--plan", "--out", "--prompts", "--num-prompts", "--seed",
                             "--record-steps", "--images-per-prompt", "--calibration", "--show-recipe",
                             "--checkpoint", "--recipes", "--models", "--quick", "--repeats", "-h", "--"])
    values = st.sampled_from([
        "w8a8", "w4a4-svd", "mixed", "nope", "0", "-1", "3", "1e9", "nan", "digits", "tiny-sd", "digits-sd",
        "rank=16", "rank=-1", "weight.group_size=7", "weight.group_size=abc", "act=int4:g64", "weight=none",
        "bits=3", "x=y", "=", "percentile=101", str(workdir / "missing.yaml"), str(workdir / "recipe.yaml"),
        str(workdir / "plan.json"), str(workdir / "bad.json"), str(workdir / "ckpt"), str(workdir),
        str(workdir / "prompts.txt"), str(workdir / "empty.txt"), str(workdir / "out.safetensors"),
    ]) | st.text(max_size=12)
    return st.tuples(cmds, st.lists(flags | values, max_size=8)).map(lambda t: ([t[0]] if t[0] else []) + t[1])


def prepare_cli_files(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recipe.yaml").write_text("rank: 8\nweight: int4:g32\n")
    (workdir / "plan.json").write_text(json.dumps({"assignments": {"not.a.layer": "w8a8"}}))
    (workdir / "bad.json").write_bytes(b"\xff\xfe{not json")
    (workdir / "prompts.txt").write_text("a cat\n")
    (workdir / "empty.txt").write_text("# nothing\n")
    (workdir / "ckpt").mkdir(exist_ok=True)
    (workdir / "ckpt" / "manifest.json").write_text('{"format": "diffq", "version": 1}')


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """``diffq.cli.main(argv)`` -> (exit code, or 'reached' / 'diffq-error' (with --debug); stderr)."""
    from diffq.cli import main
    from diffq.errors import DiffqError

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except _Reached:
            code = "reached"
        except DiffqError:
            if "--debug" not in argv:
                raise
            code = "diffq-error"
    return code, err.getvalue()


def check_cli_result(argv: list[str], code, stderr: str) -> None:
    """The CLI contract: exit 0/1/2 (or stubbed heavy work reached), errors on one line, no traceback."""
    assert code in (0, 1, 2, "reached", "diffq-error"), f"{argv!r} -> exit {code!r}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if code in (1, 2) and lines:  # (`diffq` alone prints the help on stdout and exits 2)
        assert len(lines) == 1 and lines[0].startswith("diffq: error:"), f"{argv!r} -> stderr {stderr!r}"
    assert "Traceback" not in stderr, f"{argv!r} printed a traceback"


def fuzz_all(examples: int, workdir: Path, log=print) -> dict:
    """Run every fuzz target with ``examples`` hypothesis examples each; returns counts per target."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from diffq.errors import DiffqError
    from diffq.mixed.plan import BitPlan
    from diffq.quantization.recipe import Recipe, load_recipe_files

    prepare_cli_files(workdir)
    cfg = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))
    counts: dict[str, dict] = {}

    def target(name, strategy, fn):
        c = counts[name] = {"inputs": 0, "accepted": 0, "diffq_errors": 0, "crashes": 0, "crash_examples": []}

        @cfg
        @given(strategy)
        def run(x):
            c["inputs"] += 1
            try:
                fn(x)
                c["accepted"] += 1
            except DiffqError:
                c["diffq_errors"] += 1
            except Exception as e:  # noqa: BLE001 - a crash: record and keep fuzzing
                c["crashes"] += 1
                if len(c["crash_examples"]) < 5:
                    c["crash_examples"].append(f"{type(e).__name__}: {e} <- {x!r}"[:400])

        t0 = time.monotonic()
        run()
        c["seconds"] = round(time.monotonic() - t0, 1)
        log(f"fuzz {name}: {c['inputs']} inputs, {c['crashes']} crashes")

    target("Recipe.from_dict", recipe_dicts() | _json_values(), Recipe.from_dict)

    def recipe_file(data: bytes):
        p = workdir / "fuzz_recipe.yaml"
        p.write_bytes(data)
        load_recipe_files([p])

    target("load_recipe_files", file_payloads(recipe_dicts()), recipe_file)

    def overrides(items):
        Recipe().with_overrides(items)

    target("Recipe.with_overrides", st.lists(st.text(max_size=16) | st.sampled_from(
        ["rank=8", "weight.group_size=7", "weight.dtype=int3", "act=int8:token", "weight=null", "x=1"]), max_size=4),
        overrides)
    target("BitPlan.from_dict", bitplan_dicts(), lambda d: BitPlan.from_dict(d).summary())

    def plan_file(data: bytes):
        p = workdir / "fuzz_plan.json"
        p.write_bytes(data)
        BitPlan.load(p).summary()

    target("BitPlan.load", file_payloads(bitplan_dicts()), plan_file)

    patches: list[tuple[object, str, object]] = []

    def setattr_(obj, name, value):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    _stub_heavy(setattr_)
    old_cwd = os.getcwd()
    os.chdir(workdir)
    try:
        def cli(argv):
            code, err = run_cli(argv)
            try:
                check_cli_result(argv, code, err)
            except AssertionError as e:
                raise RuntimeError(str(e)) from None

        target("cli.main", cli_argvs(workdir), cli)
    finally:
        os.chdir(old_cwd)
        for obj, name, value in reversed(patches):
            setattr(obj, name, value)
    return counts




if __name__ == "__main__":  # the fork server: python -m tests.faults --worker
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python -m tests.faults --worker (started by CalibrationWorker)")
    sys.exit(_worker())
