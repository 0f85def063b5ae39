"""Fault campaign: kill calibration runs, corrupt checkpoints, fuzz parsers and the CLI; count what happens.

Why: diffq's promises (nothing half-written, interrupted runs resume with nothing lost, damaged files
refused, bad input answered with one clear error) are only worth what they survive. This runs the
faults of ``tests/test_reliability.py`` (helpers in ``tests/faults.py``) with large N and writes the
counts to ``benchmarks/results/reliability.json``::

    python -m benchmarks.fault_campaign --kills 20 --corruptions 500 --fuzz 2000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.faults import child_env, corruption_trials, fuzz_all, kill_resume_trials

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"


# ============================================================================ campaign
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--corruptions", type=int, default=500)
    ap.add_argument("--fuzz", type=int, default=2000, help="hypothesis examples per fuzz target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    for k, v in child_env().items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(1)
    from diffq.io import write_json_atomic

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    report: dict = {"seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="diffq-faults-") as tmp:
        tmp = Path(tmp)
        t = time.monotonic()
        report["kill_resume"] = kill_resume_trials(args.kills, tmp / "kill", rng)
        report["kill_resume"]["seconds"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        report["corruption"] = corruption_trials(args.corruptions, tmp / "corrupt", rng)
        report["corruption"]["seconds"] = round(time.monotonic() - t, 1)
        report["fuzz"] = fuzz_all(args.fuzz, tmp / "fuzz")
    kr, co, fz = report["kill_resume"], report["corruption"], report["fuzz"]
    crashes = sum(c["crashes"] for c in fz.values()) + co["wrong_exception"] + co["silently_loaded"] + \
        kr["resume_mismatch"] + kr["checkpoint_unloadable_after_kill"] + len(kr["failures"])
    report["summary"] = {
        "runs_killed_and_resumed_identical": kr["killed_and_resumed_identical"],
        "runs_killed": kr["killed"],
        "corrupted_files_refused": co["refused"],
        "corruptions_tried": co["trials"],
        "inputs_fuzzed": sum(c["inputs"] for c in fz.values()),
        "crashes_found": crashes,
        "seconds": round(time.monotonic() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(args.out, report)
    s = report["summary"]
    print(f"kill/resume: {kr['killed']} of {kr['trials']} runs killed by SIGKILL ({kr['finished_before_kill']} "
          f"finished first); {kr['killed_and_resumed_identical']} killed runs and {kr['resumed_identical']} runs in all "
          f"resumed with bit-identical statistics; checkpoint after kill: "
          f"{kr['checkpoint_loadable_after_kill']} loadable, {kr['checkpoint_absent_after_kill']} absent, "
          f"{kr['checkpoint_unloadable_after_kill']} unloadable")
    print(f"corruption: {co['refused']} of {co['trials']} corrupted checkpoints refused with CheckpointError, "
          f"{co['benign_loaded_identical']} content-preserving changes loaded identically, "
          f"{co['silently_loaded']} loaded silently, {co['wrong_exception']} other exceptions")
    for name, c in fz.items():
        print(f"fuzz {name}: {c['inputs']} inputs, {c['accepted']} accepted, {c['diffq_errors']} DiffqError, "
              f"{c['crashes']} crashes")
    print(f"inputs fuzzed: {s['inputs_fuzzed']}; crashes found: {crashes}; {s['seconds']} s -> {args.out}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
