"""Static prediction table of the Triton kernels: compile for sm_90 and sm_80 on the CPU, read
registers, spills, shared memory, the MMA instruction, whether the wgmma loop is asynchronous and
the main loop's instruction budget per k-step (see :mod:`diffq.kernels.aot` for the model).

These are **predictions from compiled code, not measurements**: no GPU runs anything here.

    python -m benchmarks.kernel_static [--caps 90,80] [--json-dir benchmarks/results] [--before REV]
    python -m benchmarks.kernel_static --fp4 --caps 100,120,90,89,80 [--json-dir benchmarks/results]

Rows: every GEMM kind at its default tile for the FLUX.1 single-block QKV shape (4608 tokens x
3072 -> 3072, group 64, rank 32) and for an SDXL shape (8192 tokens x 640 -> 640: 64x64 latent,
CFG batch 2), the int4 kinds also at group 128, and the activation kernels at FLUX widths.
``--fp4``: the NVFP4 / MXFP4 kernels on sm_100 (B200), sm_120 (RTX 50xx) and the emulated
sm_90 / sm_89 / sm_80 routes, with the PTX MMA instruction (``kernel_static_fp4.json``).
``--before REV`` also compiles the kernels of git revision REV (default tiles of that revision's
tables) with the same model and prints them side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter cannot compile

SDXL_SHAPE = (8192, 640, 640)
COLUMNS = ("kernel", "tile", "regs", "spill", "smem KB", "CTAs/SM", "MMA", "async", "loop instr/k-step",
           "issue/MMA", "bound/MMA", "I2F-type cvt/k-step")  # fmt: skip


def builds(cap: int):
    """(label, Build) rows for one target."""
    from diffq.kernels import aot
    from diffq.kernels import autotune as at

    fam = {90: "hopper", 89: "ada", 80: "ampere"}[cap]
    rows = []
    for shape_name, (m, k, n) in (("flux", aot.FLUX_SHAPE), ("sdxl", SDXL_SHAPE)):
        for kind in at.KINDS:
            if kind == "fp8" and cap < 89:
                continue
            groups = (64, 128) if kind in at.INT4_KINDS and shape_name == "flux" else (64,)
            for g in groups:
                tile = at.pick_tile(kind, fam, at.m_bucket(m), n, k, g if kind in at.INT4_KINDS else None)
                b = aot.build_gemm(kind, cap, tile, group=g)
                rows.append((f"{shape_name} {b.name}", b))
    for kk in (3072, 15360):
        rows.append((f"flux act_rows int8 K={kk}", aot.build_act_rows(cap, kk, "int8")))
    rows.append(("flux act_groups (w4a4 input, lr32)", aot.build_act_groups(cap, 2 if cap >= 89 else 1)))
    return rows


def fp4_builds(cap: int):
    """(label, Build) rows of the FP4 kernels on one target: the NVFP4 / MXFP4 GEMM at its default
    FLUX tile (formats the target supports; SDXL shapes pick the same tiles), the activation
    kernels at FLUX width."""
    from diffq.kernels import aot
    from diffq.kernels.fp4_dispatch import FP4_FAMILY_CAP, FP4_MIN_CAPABILITY, pick_fp4_tile

    family = {v: k for k, v in FP4_FAMILY_CAP.items()}[cap]
    m, _, n = aot.FLUX_SHAPE
    rows = []
    for fmt in ("nvfp4", "mxfp4"):
        if (cap // 10, cap % 10) >= FP4_MIN_CAPABILITY[fmt]:
            rows.append((f"flux {fmt}", aot.build_fp4_gemm(fmt, cap, pick_fp4_tile(family, m, n))))
    if cap >= 100:
        rows += [("flux fp4_amax (NVFP4 tensor abs-max)", aot.build_fp4_amax(cap)),
                 ("flux fp4_act nvfp4 (codes + scales + lr32 down)", aot.build_fp4_act(cap, "nvfp4")),
                 ("flux fp4_act mxfp4 (codes + scales + lr32 down)", aot.build_fp4_act(cap, "mxfp4"))]  # fmt: skip
    return rows


FP4_COLUMNS = ("kernel", "target", "tile", "regs", "spill", "smem KB", "CTAs/SM", "SASS MMA", "PTX MMA", "loop instr/k-step",
               "issue/MMA", "bound/MMA")  # fmt: skip


def fp4_markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(FP4_COLUMNS) + " |", "|" + "---|" * len(FP4_COLUMNS)]
    fmt = lambda v: "-" if v is None else f"{v}"
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['kernel']} | sm_{r['cap']} | {r['tile']} | compile error: {r['error'][-80:]} |")
            continue
        ptx = [p for p in r["ptx_mma"] if "block_scale" in p] or r["ptx_mma"]
        ptx_s = ", ".join(f"`{p}`" for p in ptx) or "-"
        out.append(
            f"| {r['kernel']} | sm_{r['cap']} | {r['tile']} | {r['regs']} | {r['spill']} | {r['smem_kb']} | "
            f"{fmt(r['ctas_per_sm'])} | {r['mma'] or '-'} | {ptx_s} | {fmt(r['loop_instr_per_kstep'])} | "
            f"{fmt(r['issue_ratio'])} | {fmt(r['bound_ratio'])} |"
        )
    return "\n".join(out)


def run_fp4(caps: list[int], processes: int, json_dir: str | None, argv: list[str]) -> None:
    """Compile the FP4 rows for every cap and print / write them (kernel_static_fp4.json)."""
    import triton

    from diffq.io import write_json_atomic
    from diffq.kernels import aot

    labelled = [(label, b, cap) for cap in caps for label, b in fp4_builds(cap)]
    reps = aot.compile_many([(b, cap) for _, b, cap in labelled], processes=processes)
    rows = [dict(row_of(label, r), ptx_mma=r.ptx_mma, trap_only=r.trap_only) for (label, _, _), r in zip(labelled, reps)]
    print(f"**FP4 kernels (static prediction from compiled SASS, triton {triton.__version__})**\n")
    print(fp4_markdown(rows))
    if json_dir:
        path = Path(json_dir) / "kernel_static_fp4.json"
        payload = {
            "meta": {
                "what": "static prediction from compiled code (no GPU ran): see diffq.kernels.aot for the model",
                "targets": [f"sm_{c}" for c in caps], "triton": triton.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["python -m benchmarks.kernel_static", *argv]), "flux_shape": aot.FLUX_SHAPE,
                "rank": aot.RANK, "mma_rate_mac_per_clk_per_sm": {c: aot.MMA_RATE[c] for c in caps},
            },
            "rows": rows,
        }  # fmt: skip
        write_json_atomic(path, payload)
        print(f"wrote {path}")


def _conversions(rep) -> int:
    ops = rep.loop_ops or {}
    return sum(ops.get(o, 0) for o in ("I2F", "I2FP", "F2I", "F2F", "F2FP", "I2I"))


def row_of(label: str, rep) -> dict:
    ks = rep.loop_k_steps or 0
    return {
        "kernel": label, "tile": rep.tile, "cap": rep.cap, "ok": rep.ok, "error": rep.error[-300:],
        "regs": rep.regs, "spill": (rep.spill_stores or 0) + (rep.spill_loads or 0), "smem_kb": round((rep.shared or 0) / 1024, 1),
        "ctas_per_sm": rep.ctas_per_sm, "mma": rep.mma, "mma_unit": rep.mma_unit, "wgmma_async": rep.wgmma_async,
        "wgmma_a_regs": rep.wgmma_a_regs, "imprecise_acc": rep.imprecise_acc,
        "loop_instr_per_kstep": round(rep.loop_instr / ks, 1) if rep.loop_instr and ks else None,
        "issue_ratio": rep.issue_ratio, "bound_ratio": rep.bound_ratio,
        "conversions_per_kstep": round(_conversions(rep) / ks, 1) if ks else None,
        "mma_clk": rep.mma_clk, "issue_clk": rep.issue_clk, "xu_clk": rep.xu_clk, "alu_clk": rep.alu_clk,
        "fp32_clk": rep.fp32_clk, "loop_ops": rep.loop_ops,
    }  # fmt: skip


def markdown(rows: list[dict], title: str) -> str:
    out = [f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['kernel']} | {r['tile']} | compile error: {r['error'][-80:]} |")
            continue
        asyn = "-" if r["wgmma_async"] is None else ("yes" if r["wgmma_async"] else "no")
        fmt = lambda v: "-" if v is None else f"{v}"
        out.append(
            f"| {r['kernel']} | {r['tile']} | {r['regs']} | {r['spill']} | {r['smem_kb']} | {fmt(r['ctas_per_sm'])} | "
            f"{r['mma'].split('.')[0] + ('.' + r['mma'].split('.')[1] if r['mma'] else '') if r['mma'] else '-'} | "
            f"{asyn} | {fmt(r['loop_instr_per_kstep'])} | {fmt(r['issue_ratio'])} | {fmt(r['bound_ratio'])} | "
            f"{fmt(r['conversions_per_kstep'])} |"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- before: an older revision

_BEFORE = r'''
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
from diffq.kernels import aot_new as aot, autotune as at
from diffq.kernels import w4a16, row_scaled, w4a8, w4a4_lowrank
I = lambda *ns: {n: "i32" for n in ns}
FAM = {90: "hopper", 80: "ampere"}
out = []
for cap in [int(c) for c in sys.argv[1].split(",")]:
    def tile(kind):
        return at.candidate_tiles(kind, FAM[cap], 4608, 3072, 3072, 64 if kind in ("w4a16", "w4a8", "w4a4") else None)[0]
    def mk(name, fn, types, consts, kind, mma):
        t = tile(kind)
        return aot.Build(name, fn.__name__, fn, types, {**consts, **t.meta()}, t.num_warps, t.num_stages,
                         f"{t.block_m}x{t.block_n}x{t.block_k}-w{t.num_warps}s{t.num_stages}", mma, t.block_m * t.block_n * t.block_k)
    jobs = [mk("w4a16", w4a16._w4a16_kernel, {"x_ptr": "*bf16", "w_ptr": "*u8", "ws_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*bf16",
                **I("M","N","K","M_BUCKET","stride_xm","stride_wn","stride_sn","stride_ym")}, {"G": 64, "HAS_BIAS": False, "F32_DOT": False}, "w4a16", "16bit")]
    for kind in ("w8a8", "fp8"):
        if kind == "fp8" and cap < 89:
            continue
        q = "*fp8e4nv" if kind == "fp8" else "*i8"
        jobs.append(mk(kind, row_scaled._row_scaled_kernel, {"x_ptr": q, "xs_ptr": "*fp32", "w_ptr": q, "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
                    **I("M","N","K","M_BUCKET","stride_xm","stride_wn","stride_ym")}, {"INT_ACC": kind == "w8a8", "HAS_BIAS": False, "EVEN_K": True}, kind, "8bit"))
    jobs.append(mk("w4a8", w4a8._w4a8_kernel, {"x_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*bf16",
                **I("M","N","K","M_BUCKET","stride_xm","stride_wn","stride_sn","stride_ym")}, {"G": 64, "HAS_BIAS": False}, "w4a8", "8bit"))
    jobs.append(mk("w4a4", w4a4_lowrank._w4a4_kernel, {"x_ptr": "*u8", "xs_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp16", "d_ptr": "*fp32", "l2_ptr": "*bf16",
                "b_ptr": "*fp16", "y_ptr": "*bf16", **I("M","N","K","R","M_BUCKET","stride_xm","stride_xsm","stride_wn","stride_sn","stride_dm","stride_l2r","stride_ym")},
                {"G": 64, "HAS_LR": True, "LR_F32": False, "R_PAD": 32, "HAS_BIAS": False}, "w4a4", "8bit"))
    for r in aot.compile_many([(b, cap) for b in jobs], processes=2):
        out.append(r)
print(json.dumps([dict(r.to_dict(), _loop_k_steps=r.loop_k_steps) for r in out]))
'''


def before(rev: str, caps: list[int]) -> list[dict]:
    """Compile the default FLUX tiles of git revision ``rev``'s kernels (the layout of commit 485e0c9:
    w4a16 / row_scaled / w4a8 / w4a4_lowrank with an M_BUCKET argument) with today's model."""
    from diffq.kernels import aot

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="diffq-before-"))
    try:
        arch = subprocess.run(["git", "-C", str(repo), "archive", rev, "diffq", "kernels"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=arch.stdout, check=True)
        shutil.copy(aot.__file__, tmp / "kernels" / "aot_new.py")
        script = tmp / "before.py"
        script.write_text(_BEFORE)
        env = {**os.environ, "DIFFQ_ROOT": str(tmp), "TRITON_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(tmp)}
        env.pop("TRITON_INTERPRET", None)
        res = subprocess.run([sys.executable, str(script), ",".join(map(str, caps))], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        reps = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for d in reps:
        rep = aot.Report(**{k: v for k, v in d.items() if k in aot.Report.__dataclass_fields__})
        rows.append(row_of(f"flux {d['name']} sm_{d['cap']} ({rev})", rep))
    return rows


def main(argv: list[str] | None = None) -> None:
    from diffq.io import write_json_atomic
    from diffq.kernels import aot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="90,80")
    ap.add_argument("--json-dir", default=None, help="write kernel_static_sm<cap>.json here")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--before", default=None, help="also compile this git revision's kernels (e.g. 485e0c9)")
    ap.add_argument("--fp4", action="store_true", help="only the FP4 kernels (caps 100,120,90,89,80 allowed)")
    a = ap.parse_args(argv)
    caps = [int(c) for c in a.caps.split(",")]
    if a.fp4:
        run_fp4(caps, a.processes, a.json_dir, list(argv if argv is not None else sys.argv[1:]))
        return
    import triton

    for cap in caps:
        rows_b = builds(cap)
        reps = aot.compile_many([(b, cap) for _, b in rows_b], processes=a.processes)
        rows = [row_of(label, r) for (label, _), r in zip(rows_b, reps)]
        print(markdown(rows, f"sm_{cap} (static prediction from compiled SASS, triton {triton.__version__})"))
        print()
        if a.json_dir:
            path = Path(a.json_dir) / f"kernel_static_sm{cap}.json"
            payload = {
                "meta": {
                    "what": "static prediction from compiled code (no GPU ran): see diffq.kernels.aot for the model",
                    "target": f"sm_{cap}", "triton": triton.__version__,
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "command": " ".join(["python", "benchmarks/kernel_static.py", *(argv or sys.argv[1:])]),
                    "flux_shape": aot.FLUX_SHAPE, "sdxl_shape": SDXL_SHAPE, "group": aot.GROUP, "rank": aot.RANK,
                    "mma_rate_mac_per_clk_per_sm": aot.MMA_RATE[cap],
                },
                "rows": rows,
            }  # fmt: skip
            write_json_atomic(path, payload)
            print(f"wrote {path}")
    if a.before:
        rows = before(a.before, caps)
        print(markdown(rows, f"revision {a.before}, default FLUX tiles (static prediction, same model)"))
        if a.json_dir:
            path = Path(a.json_dir) / "kernel_static_before.json"
            write_json_atomic(path, {"meta": {"revision": a.before, "what": "static prediction, same model"}, "rows": rows})
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
