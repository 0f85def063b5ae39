"""Static compile figures of the quantized attention kernel, without a GPU: registers, spills,
shared memory and MMA instruction kinds per target (a *prediction* of how it will run: nothing
here executes on a GPU).

    python -m benchmarks.attention_static --caps 80,89,90 --with-gemm --json benchmarks/results/attention_static.json

The builds and their analysis are the compile gate's (:mod:`diffq.kernels.aot`:
:data:`~diffq.kernels.aot.ATTENTION_VARIANTS`, :func:`~diffq.kernels.aot.build_attention`,
:func:`~diffq.kernels.aot.compile_build`); the gate itself (``tests/test_kernel_compile.py``)
compiles the two main variants for sm_80 and sm_90. ``--with-gemm`` adds the W8A8 / FP8 GEMM at
its default FLUX tile for comparison. Must run without ``TRITON_INTERPRET`` (it is cleared here).
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

from diffq.io import write_json_atomic
from diffq.kernels import aot


def _gemm_context(kind: str, cap: int):
    from diffq.kernels import autotune as at

    family = {v: k for k, v in at.FAMILY_CAP.items()}[cap]
    m, n, k = aot.FLUX_SHAPE
    tile = at.pick_tile(kind, family, at.m_bucket(m), n, k, None)
    return aot.build_gemm(kind, cap, tile)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default="80,90", help="compute capabilities, comma-separated")
    ap.add_argument("--variants", default="all", help=f"'all', 'gated' ({', '.join(aot.GATED_ATTENTION)}) or names")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--with-gemm", action="store_true", help="also compile the W8A8 / FP8 GEMMs for comparison")
    a = ap.parse_args(argv)
    names = (list(aot.ATTENTION_VARIANTS) if a.variants == "all" else list(aot.GATED_ATTENTION)
             if a.variants == "gated" else a.variants.split(","))
    rows = []
    for cap in (int(c) for c in a.caps.split(",")):
        builds = [aot.build_attention(v, cap) for v in names]
        builds += [_gemm_context(kind, cap) for kind in ("w8a8", "fp8") if a.with_gemm and (kind != "fp8" or cap >= 89)]
        for b in builds:
            r = aot.compile_build(b, cap)
            rows.append(r.to_dict())
            print({k: rows[-1].get(k) for k in ("name", "tile", "cap", "ok", "regs", "spill_stores", "shared",
                                                 "mma_kinds", "error")}, flush=True)
    if a.json:
        import triton

        write_json_atomic(a.json, {"triton": triton.__version__, "prediction_only": True, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
