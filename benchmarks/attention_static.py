"""Static compile figures of the quantized attention kernel, without a GPU: registers, spills,
shared memory and MMA instruction kinds for sm_80 and sm_90 (a *prediction* of how it will run:
nothing here executes on a GPU).

    python -m benchmarks.attention_static --json benchmarks/results/attention_static.json

Each variant is compiled with ``triton.compile`` for ``GPUTarget("cuda", cap, 32)``; ``ptxas -v``
(Triton's bundled one) gives registers / spills, ``cuobjdump -sass`` the machine instructions.
Must run without ``TRITON_INTERPRET`` (the kernels are then ``JITFunction`` objects), so this
module clears it before importing Triton; tests/test_attention.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffq.io import write_json_atomic
from diffq.kernels.attention import PV_MODES, _quant_attn_kernel, head_pad, launch_warps

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
#: SASS opcodes counted (MMA kinds first: IMMA/HMMA/QMMA on sm_80/89 warp MMAs, IGMMA/QGMMA/HGMMA the
#: Hopper warpgroup MMAs; LDL/STL are local-memory spills)
SASS_OPS = ("IMMA", "HMMA", "QMMA", "IGMMA", "QGMMA", "HGMMA", "LDSM", "LDGSTS", "LDL", "STL", "MUFU.EX2", "F2FP")

#: name -> (pv, qk_bits, block, head_dim, dtype, has_mask, per_head)
VARIANTS: dict[str, tuple[str, int, int, int, str, bool, bool]] = {
    "int8-fp8_d128_b64_bf16": ("fp8", 8, 64, 128, "bf16", False, False),  # FLUX / SD3 (head dim 128)
    "int8-fp8_d64_b64_fp16": ("fp8", 8, 64, 64, "fp16", False, False),  # SD1.5-like / PixArt (72 -> 128 pad)
    "int8-fp8_d128_b128_bf16": ("fp8", 8, 128, 128, "bf16", False, False),
    "int8-fp8_d128_b64_mask": ("fp8", 8, 64, 128, "bf16", True, False),  # PixArt cross-attention mask
    "int8-int8_d128_b64_bf16": ("int8", 8, 64, 128, "bf16", False, False),  # the sm_80-native variant
    "int4-fp8_d128_b64_bf16": ("fp8", 4, 64, 128, "bf16", False, False),
    "int8-fp16_d128_b64_bf16": ("fp16", 8, 64, 128, "bf16", False, False),  # SageAttention1-style
    "int8-fp8_d128_head_bf16": ("fp8", 8, 64, 128, "bf16", False, True),
}
QUICK = ("int8-fp8_d128_b64_bf16", "int8-int8_d128_b64_bf16")
_PTR = ("q_ptr", "k_ptr", "v_ptr", "km_ptr", "vs_ptr", "qs_ptr", "ks_ptr", "mask_ptr", "o_ptr")


def _signature(dtype: str) -> dict[str, str]:
    sig = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    sig.update({n: "*fp32" for n in _PTR if n not in sig})
    for name in _quant_attn_kernel.arg_names:
        if name not in sig:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return {n: sig[n] for n in _quant_attn_kernel.arg_names}


def _machine_figures(cc, name: str, cap: int, keep: Path | None) -> dict:
    """ptxas -v registers / spills and SASS opcode counts of a compiled kernel."""
    rec: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d_out = keep or Path(tmp)
        d_out.mkdir(parents=True, exist_ok=True)
        ptx, cubin = d_out / f"{name}-sm{cap}.ptx", d_out / f"{name}-sm{cap}.cubin"
        ptx.write_text(cc.asm["ptx"])
        cubin.write_bytes(cc.asm["cubin"])
        arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
        log = subprocess.run([str(BIN / "ptxas"), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(d_out / "x.cubin")],
                             capture_output=True, text=True, check=False)
        text = log.stdout + log.stderr
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=False).stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    rec["registers"] = int(regs.group(1)) if regs else None
    rec["spill_store_bytes"], rec["spill_load_bytes"] = (int(spill.group(1)), int(spill.group(2))) if spill else (None, None)
    rec["sass"] = {op: len(re.findall(r"\b" + re.escape(op) + r"[\.\s]", sass)) for op in SASS_OPS}
    rec["ptx_mma"] = sorted(set(re.findall(r"\b(wgmma\.mma_async\.[\w\.]+|mma\.sync\.[\w\.]+)", cc.asm["ptx"])))
    rec["mma_kinds"] = [op for op in SASS_OPS[:6] if rec["sass"][op]]
    return rec


def compile_variant(name: str, cap: int, keep: Path | None = None, warps: int | None = None) -> dict:
    """Compile one variant for sm_``cap``; returns its figures (``ok`` False with the error)."""
    pv, bits, block, d, dtype, has_mask, per_head = VARIANTS[name]
    consts = {"QMAX": float(2 ** (bits - 1) - 1), "PV_MODE": PV_MODES[pv], "SMOOTH_K": True, "PER_HEAD": per_head,
              "HAS_MASK": has_mask, "FP8_MMA": cap >= 89, "BLOCK": block, "D_PAD": head_pad(d)}
    sig = _signature(dtype)
    for c in consts:
        sig[c] = "constexpr"
    # what Triton's launcher specialises on at a real launch: pointers, D (64 / 128) and the q/k/v/o
    # strides (multiples of D) are 16-divisible; the mask's strides (N, odd token counts) are not
    div16 = [n for n in _quant_attn_kernel.arg_names if n.endswith("_ptr") or n == "D"
             or (n.startswith("stride_") and not n.startswith("stride_m"))]
    attrs = {(_quant_attn_kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    warps = warps or launch_warps(block)
    rec: dict = {"variant": name, "cap": cap, "pv": pv, "qk_bits": bits, "block": block, "head_dim": d,
                 "dtype": dtype, "mask": has_mask, "per_head": per_head, "num_warps": warps}
    t0 = time.time()
    try:
        src = ASTSource(fn=_quant_attn_kernel, signature=sig, constexprs=consts, attrs=attrs)
        cc = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": 2})
    except Exception as e:  # noqa: BLE001  (a compile failure is a result to report)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], compile_s=round(time.time() - t0, 1))
        return rec
    rec.update(ok=True, compile_s=round(time.time() - t0, 1), shared_bytes=cc.metadata.shared)
    rec.update(_machine_figures(cc, name, cap, keep))
    return rec


def compile_gemm_context(kind: str, cap: int) -> dict:
    """For comparison: the W8A8 / FP8 row-scaled GEMM of the kernels package with the first tile
    its autotuner would try at a FLUX shape (M 4608, K = N 3072). The kernels issue's own
    compile-gate figures are the authority on the GEMMs; this row is context only."""
    try:
        from diffq.kernels.autotune import candidate_tiles
        from diffq.kernels.row_scaled import _row_scaled_kernel as kern
    except ImportError as e:  # the GEMM modules are another issue's and may move
        return {"variant": f"gemm_{kind}", "cap": cap, "ok": False, "error": f"not importable: {e}"}
    tile = candidate_tiles(kind, {80: "ampere", 89: "ada", 90: "hopper"}[cap], 4608, 3072, 3072, None)[0]
    el = "*i8" if kind == "w8a8" else "*fp8e4nv"
    sig = {"x_ptr": el, "xs_ptr": "*fp32", "w_ptr": el, "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16"}
    consts = {"INT_ACC": kind == "w8a8", "HAS_BIAS": False, "EVEN_K": True, **tile.meta()}
    for n in kern.arg_names:
        sig.setdefault(n, "constexpr" if n in consts else "i32")
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]] for n in kern.arg_names if n not in consts}
    rec = {"variant": f"gemm_{kind}_{tile.block_m}x{tile.block_n}x{tile.block_k}", "cap": cap, "pv": "-",
           "num_warps": tile.num_warps}
    try:
        cc = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", cap, 32),
                            options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        return rec
    rec.update(ok=True, shared_bytes=cc.metadata.shared, **_machine_figures(cc, f"gemm_{kind}", cap, None))
    return rec


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default="80,90", help="compute capabilities, comma-separated")
    ap.add_argument("--variants", default="all", help=f"'all', 'quick' ({', '.join(QUICK)}) or names")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--keep", default=None, help="keep PTX/cubin files in this folder")
    ap.add_argument("--warps", type=int, default=None, help="override the launcher's num_warps")
    ap.add_argument("--with-gemm", action="store_true", help="also compile the W8A8 / FP8 GEMMs for comparison")
    a = ap.parse_args(argv)
    names = list(VARIANTS) if a.variants == "all" else list(QUICK) if a.variants == "quick" else a.variants.split(",")
    rows = []
    for cap in (int(c) for c in a.caps.split(",")):
        for name in names:
            rec = compile_variant(name, cap, Path(a.keep) if a.keep else None, a.warps)
            rows.append(rec)
            brief = {k: rec.get(k) for k in ("variant", "cap", "ok", "registers", "spill_store_bytes", "shared_bytes",
                                             "mma_kinds", "compile_s", "error")}
            print(brief, flush=True)
        for kind in ("w8a8", "fp8") if a.with_gemm else ():
            if kind == "fp8" and cap < 89:
                continue
            rows.append(compile_gemm_context(kind, cap))
            print({k: rows[-1].get(k) for k in ("variant", "cap", "ok", "registers", "spill_store_bytes",
                                                 "shared_bytes", "mma_kinds", "error")}, flush=True)
    if a.json:
        write_json_atomic(a.json, {"triton": triton.__version__, "prediction_only": True, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
