#!/usr/bin/env bash
# gpu_check.sh: one-shot GPU check of diffq's Triton kernels on one NVIDIA H100/H200 (or A100), <= 8 min.
#
#   bash benchmarks/gpu_check.sh            (from the repo root; OUT=/some/dir to choose the output folder)
#
# Steps, each under its own timeout inside one 8-minute budget (BUDGET seconds, default 470; a step
# is skipped when too little time is left):
#   0. environment: import diffq from this checkout without installing anything (a symlinked
#      package root on PYTHONPATH: the GPU machine has no network); torch/triton/pytest/diffusers
#      must be on the image (missing ones skip the steps that need them).
#   1. compiled kernel tests: pytest -m cuda tests/test_kernels.py tests/test_fp4_kernels.py (conftest sets
#      TRITON_INTERPRET=0 for -m cuda; the tests assert that the kernels were compiled).
#   2. kernel table at FLUX (batch 1) and SDXL (batch 2 = CFG) layer shapes: bf16 torch.matmul,
#      torch._int_mm (int8 GEMM only), torch._scaled_mm FP8 row-wise (GEMM only), and every diffq
#      kernel as a layer (activation quantization + GEMM) and split (quantizer alone, GEMM alone);
#      CUDA-graph replay timing (GPU time) and eager timing (as called, host overhead included).
#   3. a FLUX-width slice end to end: benchmarks.e2e_step's FLUX config at full width and tokens
#      (3072, 4096 + 512), 1 double + 2 single blocks (E2E_LAYERS=a,b for more).
# Output under $OUT: env.json, steps.jsonl, cuda_tests.xml, bench.json, e2e_flux_slice.json,
# summary.md (the tables), gpu_check.log. At most 8 files.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-470}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export OUT
LOG="$OUT/gpu_check.log"
: >"$LOG"
: >"$OUT/steps.jsonl"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
run_step() {  # run_step NAME MAX_SECONDS MIN_SECONDS cmd...
  local name=$1 max=$2 min=$3; shift 3
  local l; l=$(left)
  local t=$((l - 5 < max ? l - 5 : max))
  if [ "$t" -lt "$min" ]; then
    say "SKIP $name (only ${l}s left)"
    echo "{\"step\": \"$name\", \"skipped\": true}" >>"$OUT/steps.jsonl"
    return 0
  fi
  say "START $name (timeout ${t}s)"
  local s; s=$(date +%s)
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "END $name rc=$rc in $(($(date +%s) - s))s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"secs\": $(($(date +%s) - s))}" >>"$OUT/steps.jsonl"
}

# ---------------------------------------------------------------- 0. environment
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
TMPD=$(mktemp -d)
if ! "$PY" -c "import diffq.kernels" >/dev/null 2>&1; then
  # the package-dir mapping of pyproject.toml as symlinks: diffq/ + kernels -> diffq.kernels, ...
  mkdir -p "$TMPD/root/diffq"
  for f in "$REPO"/diffq/*; do ln -s "$f" "$TMPD/root/diffq/$(basename "$f")"; done
  ln -s "$REPO/kernels" "$TMPD/root/diffq/kernels"
  ln -s "$REPO/eval" "$TMPD/root/diffq/eval"
  ln -s "$REPO/pipelines" "$TMPD/root/diffq/pipelines"
  export PYTHONPATH="$TMPD/root:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 DIFFQ_NO_PROGRESS=1 TRITON_CACHE_DIR="$TMPD/triton-cache"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess, torch, triton
ok = torch.cuda.is_available()
info = {"torch": torch.__version__, "triton": triton.__version__, "cuda_available": ok, "torch_cuda": torch.version.cuda}
if ok:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,
                mem_gb=round(p.total_memory / 2**30, 1))
for mod in ("pytest", "diffusers", "diffq.kernels"):
    try:
        __import__(mod)
        info[f"has_{mod}"] = True
    except Exception as e:  # noqa: BLE001
        info[f"has_{mod}"] = f"{type(e).__name__}: {e}"[:200]
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # noqa: BLE001
    info["nvidia_smi"] = repr(e)
print("ENV", json.dumps(info))
json.dump(info, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
EOF
DRY=${GPUCHECK_DRY:-0}  # 1: CPU self-test of the benchmark harness only (interpreter, tiny shapes)
if [ "$DRY" != 1 ]; then
  "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { say "no GPU, stopping"; exit 3; }
fi

# ---------------------------------------------------------------- 1. compiled kernel tests
if [ "$DRY" = 1 ]; then
  say "SKIP cuda_tests (dry run)"
elif "$PY" -c "import pytest" >/dev/null 2>&1; then
  run_step cuda_tests 170 40 "$PY" -m pytest -m cuda tests/test_kernels.py tests/test_fp4_kernels.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml"
else
  say "SKIP cuda_tests (pytest not installed on this image)"
fi

# ---------------------------------------------------------------- 2. kernel table
cat >"$TMPD/bench.py" <<'EOF'
import json, os, time
DRY = os.environ.get("GPUCHECK_DRY") == "1"  # CPU self-test of this harness (interpreter, tiny shapes)
os.environ["TRITON_INTERPRET"] = "1" if DRY else "0"
import torch
from triton.testing import do_bench, do_bench_cudagraph
import diffq.kernels as K
from diffq.formats import pack_int4
from diffq.kernels import launchers

OUT, G, R = os.environ["OUT"], 64, 32
FLUX = [("flux", "double img qkv/out", 4096, 3072, 3072), ("flux", "double img ff in", 4096, 3072, 12288),
        ("flux", "double img ff out", 4096, 12288, 3072), ("flux", "double txt qkv", 512, 3072, 3072),
        ("flux", "single qkv", 4608, 3072, 3072), ("flux", "single proj_mlp", 4608, 3072, 12288),
        ("flux", "single proj_out", 4608, 15360, 3072)]
SDXL = [("sdxl", "attn qkv/out 64x64", 8192, 640, 640), ("sdxl", "ff geglu in 64x64", 8192, 640, 5120),
        ("sdxl", "ff out 64x64", 8192, 2560, 640), ("sdxl", "attn qkv/out 32x32", 2048, 1280, 1280),
        ("sdxl", "ff geglu in 32x32", 2048, 1280, 10240), ("sdxl", "cross-attn k/v (text)", 154, 2048, 1280)]
dev, dt = ("cpu" if DRY else "cuda"), torch.bfloat16
if DRY:
    FLUX, SDXL = [("flux", "dry", 48, 192, 96)], [("sdxl", "dry", 20, 128, 64)]
torch.manual_seed(0)


def bench(fn):
    """(graph ms, eager ms): graph = GPU time of the launches (CUDA-graph replay), eager = as called."""
    if DRY:
        t = time.perf_counter(); fn(); return None, (time.perf_counter() - t) * 1e3
    try:
        fn(); torch.cuda.synchronize()
        eager = float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    except Exception as e:  # noqa: BLE001
        print(f"    FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None, None
    try:
        graph = float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as e:  # noqa: BLE001
        print(f"    graph timing failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        graph = None
    return graph, eager


rows = []
for model, layer, m, k, n in FLUX + SDXL:
    t0 = time.time()
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt)
    q4 = pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, device=dev))
    s4 = torch.rand(n, k // G, device=dev, dtype=torch.float16) * 0.01
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    s8 = torch.rand(n, 1, device=dev) * 0.01
    f8 = torch.randn(n, k, device=dev).clamp(-448, 448).to(torch.float8_e4m3fn)
    l1 = torch.randn(k, R, device=dev, dtype=dt) * 0.02
    l2 = torch.randn(R, n, device=dev, dtype=dt) * 0.02
    plans = {
        "w4a16": K.plan_for("w4a16", q4, s4, G), "w8a8": K.plan_for("w8a8", q8, s8),
        "w4a8": K.plan_for("w4a8", q4, s4, G), "w4a4_lr": K.plan_for("w4a4", q4, s4, G, lr_down=l1, lr_up=l2),
    }
    if not DRY and K.triton_unavailable_reason("fp8", dev) is None:
        plans["fp8"] = K.plan_for("fp8", f8, s8)
    xq8, xs8 = launchers.quantize_rows(x, fmt="int8")
    fns = {"bf16": lambda: torch.matmul(x, w.t())}
    if not DRY:
        fns["int_mm(gemm)"] = lambda: torch._int_mm(xq8, q8.t())
    if "fp8" in plans:
        xf8, xsf = launchers.quantize_rows(x, fmt="fp8")
        fns["scaled_mm_fp8(gemm)"] = lambda: torch._scaled_mm(xf8, f8.t(), scale_a=xsf, scale_b=s8.reshape(1, -1),
                                                             out_dtype=dt)
    for name, plan in plans.items():
        inputs = launchers.QUANT[plan.kind](plan, x)
        fns[name] = (lambda p=plan: p.run(x))
        if plan.kind != "w4a16":
            fns[f"{name}(quant)"] = (lambda p=plan: launchers.QUANT[p.kind](p, x))
        fns[f"{name}(gemm)"] = (lambda p=plan, i=inputs: launchers.GEMM[p.kind](p, i, dt))
    # correctness spot check of every layer against the reference math (relative max error)
    errs = {}
    refs = {"w4a16": lambda: K.w4a16_linear(x, q4, s4, G, backend="reference"),
            "w8a8": lambda: K.w8a8_linear(x, q8, s8, backend="reference"),
            "w4a8": lambda: K.w4a8_linear(x, q4, s4, G, backend="reference"),
            "w4a4_lr": lambda: K.w4a4_linear(x, q4, s4, G, lr_down=l1, lr_up=l2, backend="reference"),
            "fp8": lambda: K.fp8_linear(x, f8, s8, backend="reference")}
    for name, plan in plans.items():
        if m * n * k <= 4608 * 3072 * 3072:
            want = refs[name]().float()
            errs[name] = float((plan.run(x).float() - want).abs().max() / want.abs().max())
    graph, eager = {}, {}
    for name, fn in fns.items():
        graph[name], eager[name] = bench(fn)
    flop = 2 * m * n * k
    sp = lambda d: {kk: (round(d["bf16"] / v, 3) if (v and d.get("bf16")) else None) for kk, v in d.items()}
    row = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "ms_graph": graph, "ms_eager": eager,
           "tflops_graph": {kk: (round(flop / (v * 1e-3) / 1e12, 1) if v else None) for kk, v in graph.items()},
           "speedup_vs_bf16_graph": sp(graph), "speedup_vs_bf16_eager": sp(eager), "rel_err": errs,
           "routes": {name: K.dispatch.route_name(p) for name, p in plans.items()}, "secs": round(time.time() - t0, 1)}
    rows.append(row)
    g = row["speedup_vs_bf16_graph"]
    print(f"{model} {layer:24s} {m}x{k}x{n}: bf16 {graph.get('bf16')} ms  " +
          "  ".join(f"{kk}={g[kk]:.2f}x" for kk in fns if kk != "bf16" and g.get(kk)) + f"  [{row['secs']}s]", flush=True)
    json.dump({"device": "cpu-dry" if DRY else torch.cuda.get_device_name(0), "rows": rows},
              open(os.path.join(OUT, "bench.json"), "w"), indent=1)
    del x, w, q4, s4, q8, s8, f8, l1, l2, plans, fns
    if not DRY:
        torch.cuda.empty_cache()

cols = ["int_mm(gemm)", "scaled_mm_fp8(gemm)", "w8a8", "w8a8(gemm)", "fp8", "fp8(gemm)", "w4a8", "w4a8(gemm)",
        "w4a4_lr", "w4a4_lr(gemm)", "w4a16"]
kind = "eager" if DRY else "graph"
lines = [f"speed-up vs bf16 torch.matmul (>1 = faster), {kind} time; bf16 column in ms; quantizer columns in us",
         "", "| shape | bf16 ms | " + " | ".join(cols) + " | q_w8a8 us | q_w4a4 us |", "|" + "---|" * (len(cols) + 4)]
for r in rows:
    ms, s = r[f"ms_{kind}"], r[f"speedup_vs_bf16_{kind}"]
    f = lambda v: "-" if v is None else f"{v:.2f}"
    qi, qw = ms.get("w8a8(quant)"), ms.get("w4a4_lr(quant)")
    lines.append(f"| {r['model']} {r['layer']} {r['M']}x{r['K']}x{r['N']} | {f(ms.get('bf16'))} | " +
                 " | ".join(f(s.get(c)) for c in cols) + f" | {f(qi and qi * 1e3)} | {f(qw and qw * 1e3)} |")
open(os.path.join(OUT, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
run_step bench_table 240 60 "$PY" "$TMPD/bench.py"
if [ "$DRY" = 1 ]; then say "dry run done"; rm -rf "$TMPD"; exit 0; fi

# ---------------------------------------------------------------- 3. FLUX-width e2e slice
if "$PY" -c "import diffusers" >/dev/null 2>&1; then
  cat >"$TMPD/e2e.py" <<'EOF'
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.getcwd())  # the repo root: benchmarks is a package (python -m benchmarks.<name>)
from benchmarks import e2e_step
nd, ns = (int(v) for v in os.environ.get("E2E_LAYERS", "1,2").split(","))
e2e_step.FLUX_DIT = {**e2e_step.FLUX_DIT, "num_layers": nd, "num_single_layers": ns}
e2e_step.main(["--model", "flux", "--presets", os.environ.get("E2E_PRESETS", "w8a8,fp8,w4a8,w4a16,w4a4-svd"),
               "--reps", "5", "--json", os.path.join(os.environ["OUT"], "e2e_flux_slice.json")])
EOF
  run_step e2e_flux_slice 160 50 "$PY" "$TMPD/e2e.py"
else
  say "SKIP e2e_flux_slice (diffusers not installed on this image)"
fi

say "done in $(($(date +%s) - T0))s; outputs:"
ls -la "$OUT" | tee -a "$LOG"
rm -rf "$TMPD"
