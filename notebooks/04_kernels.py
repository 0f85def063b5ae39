# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Low-bit GEMM kernels
#
# Quantized layers only get faster when the matrix multiply reads the packed low-bit weights
# directly. diffq ships Triton kernels for W4A16 (weight-only int4), W8A8, W4A8, W4A4 with the
# SVDQuant low-rank branch, and FP8, each with a torch **reference** path that computes the same
# numbers with plain torch ops (dequantize, then matmul).
#
# * On a **CUDA GPU** `backend="auto"` runs the Triton kernels; this notebook then times them against
#   a bf16 `torch.matmul` at the layer shapes of real denoisers.
# * On a **CPU** (as here) `auto` falls back to the reference path and the baseline is an fp32
#   matmul. The W8A8 reference runs torch's int8 GEMM and is genuinely faster than fp32; the int4
#   and FP8 references dequantize the weight first and are *slower* than the dense matmul: they exist
#   to define the numbers the GPU kernels must reproduce, not for speed. The notebook also checks
#   that the reference and (under `TRITON_INTERPRET=1`) the Triton kernels agree.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here runs from shipped assets

import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

diffusers_logging.disable_progress_bar()      # no "Loading pipeline components" bars
transformers_logging.disable_progress_bar()
torch.manual_seed(0)

# %%
import statistics
import time

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

import diffq.kernels as K
from diffq.formats import QuantSpec, dequantize, pack_int4, quantize

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
GROUP, RANK = 64, 32
KINDS = ["w4a16", "w8a8", "w4a8", "w4a4", "fp8"]
why = {k: K.triton_unavailable_reason(k, DEVICE, GROUP) for k in KINDS}
pd.DataFrame({"Triton kernel": ["runs here" if w is None else w for w in why.values()]}, index=KINDS)

# %% [markdown]
# ## Layer shapes
#
# (model, layer, tokens, in features K, out features N) at each model's native resolution, batch 1.
# On the CPU the token count is cut to 128 so the sweep takes seconds; on a GPU the real counts are
# used. `benchmarks/kernels.py` sweeps 30 shapes of SD1.5, SDXL, PixArt-Σ and FLUX.1.

# %%
SHAPES = [
    ("sd15", "attn qkv/out 32x32", 1024, 640, 640),
    ("sd15", "ff geglu in 16x16", 256, 1280, 10240),
    ("sdxl", "attn qkv/out 32x32", 1024, 1280, 1280),
    ("pixart", "ff out", 4096, 4608, 1152),
    ("flux", "double img qkv/out", 4096, 3072, 3072),
]
CPU_TOKENS = 128

def layer_weights(k, n):
    """Packed weights of one random [n, k] layer in every format the kernels take."""
    w = torch.randn(n, k) * 0.02
    q4 = quantize(w, QuantSpec("int4", "group", GROUP, "fp16"))
    q8 = quantize(w, QuantSpec("int8", "channel"))
    qf = quantize(w, QuantSpec("fp8_e4m3", "channel"))
    to = lambda t: t.to(DEVICE)
    return {
        "dense": to(w.to(DTYPE)),
        "int4": (to(pack_int4(q4.codes)), to(q4.scale_stored)),
        "int8": (to(q8.codes), to(q8.scale.float())),
        "fp8": (to(qf.codes), to(qf.scale.float())),
        "lowrank": (to(torch.randn(k, RANK, dtype=DTYPE) * 0.02), to(torch.randn(RANK, n, dtype=DTYPE) * 0.02)),
        "dequant": {"w4": dequantize(q4), "w8": dequantize(q8), "fp8": dequantize(qf)},
    }

def kernels(x, W):
    (p4, s4), (c8, s8), (cf, sf), (l1, l2) = W["int4"], W["int8"], W["fp8"], W["lowrank"]
    return {
        "w4a16": lambda: K.w4a16_linear(x, p4, s4, GROUP),
        "w8a8": lambda: K.w8a8_linear(x, c8, s8),
        "w4a8": lambda: K.w4a8_linear(x, p4, s4, GROUP),
        "w4a4": lambda: K.w4a4_linear(x, p4, s4, GROUP),
        "w4a4+lr32": lambda: K.w4a4_linear(x, p4, s4, GROUP, lr_down=l1, lr_up=l2),
        "fp8": lambda: K.fp8_linear(x, cf, sf),
    }

def bench(fn, reps=3):
    """Median milliseconds of fn() (CUDA: triton's do_bench with L2 flushes)."""
    if ON_GPU:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

# %% [markdown]
# ## Timing table
#
# `vs base` = baseline time / kernel time (> 1 is faster). `weight MiB` is what the kernel reads for
# the weights (codes + scales; the low-rank factors for `w4a4+lr32`): that ratio, not FLOPs, sets the
# speed-up of the memory-bound small-batch layers on a GPU.

# %%
def weight_bytes(kind, W):
    (p4, s4), (c8, s8), (cf, sf), (l1, l2) = W["int4"], W["int8"], W["fp8"], W["lowrank"]
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)
    return {"base": nb(W["dense"]), "w4a16": nb(p4, s4), "w8a8": nb(c8, s8), "w4a8": nb(p4, s4),
            "w4a4": nb(p4, s4), "w4a4+lr32": nb(p4, s4, l1, l2), "fp8": nb(cf, sf)}[kind]

rows = []
for model, layer, tokens, k, n in SHAPES:
    m = tokens if ON_GPU else min(tokens, CPU_TOKENS)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    W = layer_weights(k, n)
    base_ms = bench(lambda x=x, W=W: torch.matmul(x, W["dense"].t()))
    times = {f"{str(DTYPE)[6:]} matmul": base_ms, **{name: bench(fn) for name, fn in kernels(x, W).items()}}
    for name, ms in times.items():
        rows.append({"model": model, "layer": layer, "MxKxN": f"{m}x{k}x{n}", "kernel": name, "ms": ms,
                     "TFLOP/s": 2 * m * k * n / (ms * 1e-3) / 1e12, "vs base": base_ms / ms,
                     "weight MiB": weight_bytes("base" if "matmul" in name else name, W) / 2**20})
timing = pd.DataFrame(rows)
print("backend:", "Triton on " + torch.cuda.get_device_name(0) if ON_GPU else "torch reference on the CPU")
timing.round(3)

# %%
colour = {k: f"C{i}" for i, k in enumerate(timing["kernel"].unique())}  # same colour per kernel in both panels
pivot = timing.pivot_table(index=["model", "layer"], columns="kernel", values="vs base", sort=False)
pivot = pivot.drop(columns=[c for c in pivot.columns if "matmul" in c])
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
pivot.plot.bar(ax=axes[0], rot=30, color=[colour[c] for c in pivot.columns])
axes[0].axhline(1.0, color="k", lw=0.8)
axes[0].set_ylabel("speed vs baseline matmul (>1 = faster)")
axes[0].set_title("Triton kernels" if ON_GPU else "torch reference path on the CPU")
wb = timing.pivot_table(index=["model", "layer"], columns="kernel", values="weight MiB", sort=False)
wb.plot.bar(ax=axes[1], rot=30, logy=True, color=[colour[c] for c in wb.columns])
axes[1].set_ylabel("weight bytes read (MiB, log)")
axes[1].set_title("weight traffic per format")
for ax in axes:
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
fig.tight_layout()

# %% [markdown]
# ## Do the paths agree?
#
# Each kernel's output against an fp32 matmul of the dequantized weight with the input quantized the
# same way would be exact up to summation order; here, more simply, the relative error against the
# **unquantized** layer shows what each format costs in accuracy on random data. When Triton can
# run (a GPU, or the CPU interpreter with `TRITON_INTERPRET=1` set before the first import), the
# Triton output is also compared with the reference on a small shape: the integer kernels are
# bit-exact, floating ones agree to rounding.

# %%
torch.manual_seed(1)
m, k, n = 16, 128, 64
x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
W = layer_weights(k, n)
exact = x.float() @ W["dense"].float().t()
rows = []
for name, fn in kernels(x, W).items():
    y = fn()
    row = {"kernel": name, "rel. error vs unquantized": float((y.float() - exact).norm() / exact.norm())}
    kind = name.split("+")[0]
    if why[kind] is None:
        (p4, s4), (c8, s8), (cf, sf), (l1, l2) = W["int4"], W["int8"], W["fp8"], W["lowrank"]
        args = {"w4a16": (K.w4a16_linear, (x, p4, s4, GROUP), {}), "w8a8": (K.w8a8_linear, (x, c8, s8), {}),
                "w4a8": (K.w4a8_linear, (x, p4, s4, GROUP), {}), "fp8": (K.fp8_linear, (x, cf, sf), {}),
                "w4a4": (K.w4a4_linear, (x, p4, s4, GROUP), {"lr_down": l1, "lr_up": l2} if "lr" in name else {})}
        f, a, kw = args[kind]
        yt = f(*a, **kw, backend="triton").float()
        yr = f(*a, **kw, backend="reference").float()
        row["max |triton - reference| / max |y|"] = float((yt - yr).abs().max() / yr.abs().max())
    rows.append(row)
pd.DataFrame(rows).set_index("kernel")

# %% [markdown]
# ## What a GPU run adds
#
# * the Triton path for every kernel (int8 / FP8 tensor-core MMA, int4 unpacking in registers,
#   activation quantization fused into one pass over the input, the low-rank branch of W4A4 in the
#   GEMM epilogue) and `torch._scaled_mm` for FP8 on Hopper/Ada;
# * real token counts (4,096 image tokens at 1024 px), where the ratio of weight bytes above turns
#   into speed for the memory-bound layers and the 8-bit MMA rate into speed for the large ones;
# * end-to-end denoiser step times: `python -m benchmarks.e2e_step`; the full kernel sweep with
#   bytes moved and GB/s: `python -m benchmarks.kernels --json kernels_gpu.json`.
#
# If a GPU sweep was saved in the repository, it is shown below.

# %%
import json
from pathlib import Path

found = sorted(Path("..", "benchmarks", "results").glob("kernels_*.json"))
for path in found:
    data = json.loads(path.read_text())
    print(f"{path.name}: {data['meta']['device']}, baseline {data['meta']['baseline']}, {len(data['rows'])} rows")
    saved = pd.DataFrame(data["rows"])
    display(saved.pivot_table(index=["model", "layer", "batch"], columns="kernel", values="speedup", sort=False).round(2))
if not found:
    print("no saved kernel benchmark results next to this notebook")
