"""Write the comparison notebooks in ``notebooks/`` (outputs stripped) from the cell sources below.

Why a generator: notebooks are JSON, so hand edits produce noisy diffs and stray outputs; keeping
the cells here as plain Python strings makes review easy and guarantees the committed files carry
no outputs or execution counts. Run ``python scripts/make_notebooks.py`` after editing a cell;
``tests/test_notebooks.py`` executes every notebook.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "notebooks"

# Shared first code cell: offline, quiet, deterministic. Sizes are small so each notebook runs on a
# 2-core CPU in about a minute; raise them for a real comparison.
SETUP = """\
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
"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ------------------------------------------------------------------------------------ 01 quickstart
NB01 = [
    md("""
# 01 · Quickstart: calibrate, quantize with two presets, compare

This notebook walks through the whole diffq loop on **digits-sd**, a small but real
`StableDiffusionPipeline` shipped with diffq (32×32 handwritten digits, trained on MNIST), so it
runs offline on a laptop CPU in about a minute:

1. load a pipeline,
2. calibrate: record per-timestep activation statistics on a few prompts,
3. quantize fresh copies with two presets,
4. generate the same prompts with the same seeds and compare images, metrics and sizes.

The same code works for a hub model on a GPU; see the cell *Using a real model*.
"""),
    code(SETUP),
    code("""
import diffq
from diffq.eval import clip_score_digits, load_prompts, psnr, ssim, image_grid
from diffq.generation import generate
from diffq.pipelines.demo import demo_pipeline, digit_class_from_prompt, digits_clip

N_PROMPTS = 8          # images per configuration
STEPS = 10             # denoising steps
GUIDANCE = 3.0         # classifier-free guidance scale
PRESETS_TO_COMPARE = ["w8a8-static", "w4a8"]   # any of diffq.PRESETS
EVAL_SEEDS = [100 + i for i in range(N_PROMPTS)]  # calibration uses seeds 0.., evaluation others

from diffq.presets import DESCRIPTIONS

for name in PRESETS_TO_COMPARE:
    print(f"{name:12s} {DESCRIPTIONS[name]}")
print("full recipe:", diffq.get_preset(PRESETS_TO_COMPARE[0]))
"""),
    md("""
## Load a pipeline

`load_pipe()` returns a fresh full-precision pipeline; quantization works in place, so every
preset gets its own copy. For the demo model loading takes well under a second.

### Using a real model

On a GPU machine with the weights in the Hugging Face cache, set `HUB_MODEL`, e.g.
`"stabilityai/stable-diffusion-xl-base-1.0"` or `"black-forest-labs/FLUX.1-dev"`, and a prompt
file (one prompt per line). Everything below is unchanged; use more prompts (≥ 64 for
calibration), ~28 steps, and the model's own guidance scale (FLUX.1-dev: 3.5). The CLIP-score cell
then needs a real CLIP model (`diffq.eval.ClipScorer.from_pretrained(path)`) instead of digits-clip.
"""),
    code("""
HUB_MODEL = None       # e.g. "stabilityai/stable-diffusion-xl-base-1.0" (GPU + weights in the HF cache)
PROMPT_SOURCE = "digits"  # a built-in set or a .txt/.csv/.jsonl file of prompts

if HUB_MODEL:
    from diffusers import DiffusionPipeline

    def load_pipe():
        pipe = DiffusionPipeline.from_pretrained(HUB_MODEL, torch_dtype=torch.bfloat16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe
else:
    def load_pipe():
        pipe = demo_pipeline("digits-sd")
        pipe.set_progress_bar_config(disable=True)
        return pipe

prompts = list(load_prompts(PROMPT_SOURCE))[:N_PROMPTS]
fp_pipe = load_pipe()
print(type(fp_pipe).__name__, "denoiser:", type(fp_pipe.unet if hasattr(fp_pipe, "unet") else fp_pipe.transformer).__name__)
print(prompts)
"""),
    md("""
## Calibrate

`diffq.calibrate` runs the real pipeline (scheduler, classifier-free guidance batch) with hooks on
every quantizable layer and keeps, per layer and per denoising step, the channel-wise abs-max and a
histogram of activations. Presets with static activation ranges (`w8a8-static`) or smoothing
(`w4a4-svd`) need it; dynamic presets ignore it. The statistics can be saved with
`stats.save("calib.safetensors")` and reused for every recipe.
"""),
    code("""
stats = diffq.calibrate(fp_pipe, prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, progress=False)
print(f"{len(stats.layers)} layers, {len(stats.observed_steps())} steps recorded; timesteps {stats.step_buckets}")
"""),
    md("## Full-precision reference and quantized pipelines"),
    code("""
gen = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
images = {"fp32": generate(fp_pipe, prompts, EVAL_SEEDS, **gen)}
summaries = {}
for name in PRESETS_TO_COMPARE:
    pipe = load_pipe()
    summaries[name] = diffq.quantize(pipe, name, calibration=stats, progress=False)
    images[name] = generate(pipe, prompts, EVAL_SEEDS, **gen)
    del pipe
{k: tuple(v.shape) for k, v in images.items()}
"""),
    md("Rows are prompts, columns configurations; every column uses the same initial noise."),
    code("""
cols = list(images)
image_grid([[images[c][i] for c in cols] for i in range(len(prompts))], row_labels=prompts, col_labels=cols)
"""),
    md("""
## Metric table

* **PSNR / SSIM** against the full-precision image of the same prompt and seed (paired: how much
  quantization changed the picture);
* **CLIP score** under digits-clip (text–image alignment, 0–100) and **digit accuracy** (does
  digits-clip read the digit the prompt asked for);
* **FID** against the 1,000 held-out real digits, in digits-clip features. With 8 images FID is
  strongly biased upwards; only compare it between columns of this table.
"""),
    code("""
import pandas as pd
from diffq.eval import fid_from_features
from diffq.pipelines.demo import heldout_digits

clip = digits_clip()
real_feats = clip.image_features(heldout_digits().images)
target = torch.tensor([digit_class_from_prompt(p) for p in prompts])
ref = images["fp32"]
rows = []
for name, imgs in images.items():
    rows.append({
        "config": name,
        "PSNR dB": float(psnr(imgs, ref).mean()),  # inf for the reference itself
        "SSIM": float(ssim(imgs, ref).mean()),
        "CLIP score": float(clip_score_digits(clip, imgs, prompts).mean()),
        "digit acc": float((clip.classify(imgs) == target).float().mean()),
        "FID (digits-clip)": fid_from_features(real_feats, clip.image_features(imgs)),
    })
metrics = pd.DataFrame(rows).set_index("config")
metrics.round(3)
"""),
    md("""
## Sizes

`diffq.quantize` returns a `QuantSummary`: per layer the format and bytes before/after, and the
size ratio of the whole denoiser (all parameters and buffers, including the layers its skip rules
keep in 16 bits: embeddings, normalisation modulation, first/last conv).
"""),
    code("""
sizes = pd.DataFrame([
    {"config": name, "layers quantized": f"{len(s.quantized)}/{len(s.layers)}",
     "denoiser MiB": s.denoiser_bytes_after / 2**20, "x smaller": s.size_ratio,
     "quantized layers KiB": s.packed_bytes / 1024}
    for name, s in summaries.items()
]).set_index("config")
first = next(iter(summaries.values()))
print(f"full-precision denoiser: {first.denoiser_bytes_before / 2**20:.2f} MiB")
sizes.round(2)
"""),
    code("""
print(summaries[PRESETS_TO_COMPARE[-1]].table(max_rows=12))
"""),
    md("""
## Next

* `02_timestep_activations.ipynb`: why static activation ranges are grouped by timestep;
* `03_mixed_precision.ipynb`: per-layer sensitivity and a bit plan under a size budget;
* `04_kernels.ipynb`: the packed low-bit GEMM kernels and their speed;
* `diffq.save(pipe, "out/")` writes the quantized pipeline; `diffq eval` on the command line runs
  the full FID / CLIP-score comparison over hundreds of prompts.
"""),
]

# ------------------------------------------------------------------------ 02 timestep activations
NB02 = [
    md("""
# 02 · Activations across denoising steps

A diffusion denoiser is called once per step with a different noise level, and the input
statistics of a layer can change by an order of magnitude between the first (pure noise) and the
last (almost clean) step. A single static activation range must cover the largest step, which
wastes grid resolution at the others. diffq groups contiguous steps whose ranges are close and
gives each group its own range (looked up from the timestep at inference).

This notebook calibrates digits-sd, finds the layers whose ranges vary most over the trajectory,
and measures what per-timestep ranges buy, first as expected quantization error, then end to end.
"""),
    code(SETUP),
    code("""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import diffq
from diffq.calibration import grouping_mse, step_groups, timestep_act_ranges
from diffq.eval import load_prompts, psnr, ssim
from diffq.generation import generate
from diffq.pipelines.demo import demo_pipeline
from diffq.pipelines.roles import role_of

N_PROMPTS, STEPS, GUIDANCE = 8, 10, 3.0
TOP = 6   # layers to plot

pipe = demo_pipeline("digits-sd")
pipe.set_progress_bar_config(disable=True)
prompts = list(load_prompts("digits"))[:N_PROMPTS]
stats = diffq.calibrate(pipe, prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, progress=False)
steps = stats.observed_steps()
timesteps = np.array([stats.step_buckets[s] for s in steps])
print(f"{len(stats.layers)} layers x {len(steps)} steps; timesteps (0..1000 scale): {timesteps.tolist()}")
"""),
    md("""
## Which layers vary most?

For each layer, `LayerStats.amax()` is the per-step abs-max of its input. The spread is the ratio of
the largest to the smallest per-step range: a spread of 4 means one static range wastes two bits at
the quietest step. The time-embedding projections usually top the list (their input *is* the
timestep embedding), but the presets keep role `embed` in 16 bits, so the plots below use the
layers that are actually quantized.
"""),
    code("""
skip_roles = diffq.get_preset("w8a8-static").skip_roles   # roles the presets keep in 16 bits
rows = []
for name, st in stats.layers.items():
    r = st.amax()[steps].double()
    rows.append({"layer": name, "role": role_of(name), "quantized": role_of(name) not in skip_roles,
                 "spread max/min": float(r.max() / r.min().clamp_min(1e-12)),
                 "range first step": float(r[0]), "range last step": float(r[-1]),
                 "wasted bits (1 range)": float(torch.log2(r.max() / r.clamp_min(1e-12)).mean())})
spread = pd.DataFrame(rows).sort_values("spread max/min", ascending=False).set_index("layer")
top = list(spread[spread["quantized"]].index[:TOP])
spread.head(14).round(2)
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
for name in top:
    st = stats.layers[name]
    axes[0].plot(timesteps, st.amax()[steps].numpy(), "o-", ms=3, label=name.replace("transformer_blocks.0.", "tb0."))
    std = st.var()[steps].sqrt().numpy()
    axes[1].plot(timesteps, std, "o-", ms=3)
for ax, title in zip(axes, ["abs-max of the layer input", "standard deviation of the layer input"]):
    ax.set_xlabel("timestep (1000 = pure noise)")
    ax.invert_xaxis()  # denoising runs left to right
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"the {TOP} layers whose input range varies most across the {len(steps)} steps")
fig.tight_layout()
"""),
    md("""
The whole picture: every layer's per-step range divided by its largest one (1 = the step that sets a
single static range). Dark cells are steps where one static range would be too wide.
"""),
    code("""
names = list(spread.index)
rel = np.stack([(stats.layers[n].amax()[steps] / stats.layers[n].amax()[steps].max()).numpy() for n in names])
fig, ax = plt.subplots(figsize=(8, 10))
im = ax.imshow(np.log2(rel), aspect="auto", cmap="viridis", vmin=-3, vmax=0)
ax.set_xticks(range(len(steps)), timesteps, rotation=90)
ax.set_yticks(range(0, len(names), 5), [names[i][-40:] for i in range(0, len(names), 5)], fontsize=6)
ax.set_xlabel("timestep")
fig.colorbar(im, ax=ax, label="log2(range at step / max range)")
ax.set_title("per-step input range, layers sorted by spread")
fig.tight_layout()
"""),
    md("""
## What per-timestep ranges change

`timestep_act_ranges(stats, layer, qmax=..., groups=G)` returns the static range of each timestep
group and the timestep → group table that the quantized layer uses at inference. `groups=1` is a
single range; `groups=None` lets diffq merge adjacent steps while their ranges differ by less than
25 % (the default of `w8a8-static`). Below: the per-step range of the most varying layer and the
range each grouping would use.
"""),
    code("""
name = top[0]
st = stats.layers[name]
per_step = st.amax()[steps].numpy()
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(timesteps, per_step, "ko-", label="observed range per step")
for groups, style in [(1, "--"), (2, "-."), (None, "-")]:
    amax, table = timestep_act_ranges(stats, name, qmax=127, groups=groups)
    _, ids = step_groups(stats, name, groups, 0.25)
    ax.step(timesteps, amax[ids, 0].numpy(), style, where="mid",
            label=f"{'auto' if groups is None else groups} group(s): {amax.shape[0]} range(s)")
ax.invert_xaxis()
ax.set_yscale("log")
ax.set_xlabel("timestep")
ax.set_title(name, fontsize=9)
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
"""),
    md("""
Expected activation MSE (from the calibration histograms, min-max ranges) of the top layers at 8
and 4 bits, for one range, 2 groups, the automatic grouping and one range per step. Values are
relative to one range (1.0); lower is better.
"""),
    code("""
rows = []
for name in top:
    for bits in (8, 4):
        base = grouping_mse(stats, name, bits, 1)
        row = {"layer": name, "bits": bits}
        for label, g in [("1 range", 1), ("2 groups", 2), ("auto", None), ("per step", len(steps))]:
            row[label] = grouping_mse(stats, name, bits, g) / max(base, 1e-30)
        row["auto #groups"] = max(step_groups(stats, name, None, 0.25)[1]) + 1
        rows.append(row)
pd.DataFrame(rows).set_index(["layer", "bits"]).round(3)
"""),
    md("""
## End to end

The `w8a8-static` preset with one range per layer (`timestep_groups=1`) against the same preset
with automatic timestep groups (the preset's default); the images are compared with the
full-precision ones (same seeds).
Activations are also tried at 6 bits, where the grid is coarse enough for the difference to show.
"""),
    code("""
seeds = [100 + i for i in range(N_PROMPTS)]
gen = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
ref = generate(pipe, prompts, seeds, **gen)
variants = {
    "a8, 1 range": {"preset": "w8a8-static", "timestep_groups": 1},
    "a8, timestep groups": {"preset": "w8a8-static"},
    "a6, 1 range": {"preset": "w8a8-static", "act": "int6:tensor", "timestep_groups": 1},
    "a6, timestep groups": {"preset": "w8a8-static", "act": "int6:tensor"},
}
rows = []
for label, recipe in variants.items():
    q = demo_pipeline("digits-sd")
    q.set_progress_bar_config(disable=True)
    diffq.quantize(q, recipe, calibration=stats, progress=False)
    imgs = generate(q, prompts, seeds, **gen)
    rows.append({"variant": label, "PSNR dB": float(psnr(imgs, ref).mean()), "SSIM": float(ssim(imgs, ref).mean())})
pd.DataFrame(rows).set_index("variant").round(3)
"""),
    md("""
Timestep groups cost one range per group per layer (a few bytes) and one table lookup per step;
the calibration statistics are reused, nothing is re-run, so both variants are cheap to compare.
Whether groups pay off end to end depends on the model: narrower ranges help the steps with small
activations, but each group's range is clipped from fewer samples, and errors made at early steps
are partly corrected by later ones. Lower expected MSE per layer (the table above) is necessary,
not sufficient; always check images, as here, before choosing `timestep_groups`.
"""),
]

# ------------------------------------------------------------------------------ 03 mixed precision
NB03 = [
    md("""
# 03 · Mixed precision: sensitivity, bit plans, quality vs size

Not every layer tolerates 4 bits equally. diffq measures each unit's **sensitivity** by quantizing
it alone and regenerating a few images, with two separate metrics:

* **quality**: 1 − SSIM against the full-precision images (noise, blur, broken strokes);
* **alignment**: the drop of the CLIP score (here digits-clip): the picture stays clean but stops
  matching the prompt.

Each metric is normalised over the units on its own, then every unit is judged by the sum of both
(`diffq.sensitivity_analysis.CONDITIONING_JUDGES` restricts alignment to cross-attention and
conditioning layers, MixDQ-style). An integer
program (`diffq.allocate`) then picks one format per unit with the least total sensitivity under a
size budget. The plan is applied with the `mixed` recipe.

Sizes are tiny so that it runs on a CPU in about a minute: 4 prompts, 6 steps and one unit per
block for the sensitivity analysis (about 40 short generations).
"""),
    code(SETUP),
    code("""
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

import diffq
from diffq.allocation import uniform_plan
from diffq.eval import clip_score_digits, load_prompts, ssim
from diffq.generation import generate
from diffq.pipelines.demo import demo_pipeline, digits_clip
from diffq.sensitivity_analysis import sensitivity
from diffq.sensitivity_plots import plot_plan, plot_sensitivity

SENS_PROMPTS, EVAL_PROMPTS, STEPS, GUIDANCE = 4, 8, 6, 3.0
CANDIDATES = ("w8a8", "w4a8")   # plus "fp16" (keep dense), always available
work = Path(tempfile.mkdtemp(prefix="diffq_nb03_"))

def load_pipe():
    pipe = demo_pipeline("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe

fp_pipe = load_pipe()
prompts = list(load_prompts("digits"))
sens_prompts = [prompts[i] for i in (0, 3, 5, 8)][:SENS_PROMPTS]
eval_prompts = prompts[:EVAL_PROMPTS]
"""),
    md("""
## Sensitivity

`groups="block"` makes one unit per ResNet / transformer block (about 20 units here instead of
119 layers); on a large model `"block_role"` keeps cross-attention apart from the rest of its block.
`cache_dir` makes the analysis resumable: an interrupted run continues where it stopped.
"""),
    code("""
table = sensitivity(
    fp_pipe, prompts=sens_prompts, candidates=CANDIDATES, groups="block", scorer="digits",
    num_inference_steps=STEPS, guidance_scale=GUIDANCE, cache_dir=work / "sensitivity", progress=False,
)
print(f"{len(table.units)} units, {table.meta['evaluations']} generations in {table.meta['seconds']:.0f} s")
print(table.table())
"""),
    code("""
display(Image(filename=str(plot_sensitivity(table, work / "sensitivity.png"))))
"""),
    md("""
The two metrics disagree on which units matter: each point is one unit at `w4a8`. Units far above
the diagonal would be under-protected by a quality-only analysis.
"""),
    code("""
q, a = table.normalised("quality"), table.normalised("alignment")
fig, ax = plt.subplots(figsize=(6, 4.5))
for u in table.units:
    conditioning = any(table.roles[n] in ("cross_attn", "adanorm") for n in table.members[u])
    ax.scatter(q[u]["w4a8"], a[u]["w4a8"], c="tab:orange" if conditioning else "tab:blue", s=25)
    if max(q[u]["w4a8"], a[u]["w4a8"]) > 1.0:
        ax.annotate(u, (q[u]["w4a8"], a[u]["w4a8"]), fontsize=6)
lim = max(max(q[u]["w4a8"], a[u]["w4a8"]) for u in table.units) * 1.05
ax.plot([0, lim], [0, lim], "k:", lw=0.8)
ax.scatter([], [], c="tab:orange", label="unit with cross-attention / adaLN layers")
ax.scatter([], [], c="tab:blue", label="other units")
ax.set_xlabel("quality sensitivity (normalised)")
ax.set_ylabel("alignment sensitivity (normalised)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
display(fig)  # explicit: diffq.sensitivity_plots switched matplotlib to the Agg backend above
plt.close(fig)
"""),
    md("""
## Bit plans under two budgets

Budgets are in stored bits per weight over the analysed layers (scales and biases included). The
tight budget is what uniform `w4a8` costs, the loose one lies halfway to uniform `w8a8`; the
allocator must fit under each.
"""),
    code("""
den = fp_pipe.unet
uniform = {p: uniform_plan(table, den, p) for p in CANDIDATES}
tight = uniform["w4a8"].realised["avg_bits"]
loose = (tight + uniform["w8a8"].realised["avg_bits"]) / 2
plans = {f"mixed @{b:.2f}": diffq.allocate(table, budget=b) for b in (tight, loose)}
for name, plan in plans.items():
    print(f"== {name}")
    print(plan.summary(), end="\\n\\n")
"""),
    code("""
for name, plan in plans.items():
    display(Image(filename=str(plot_plan(plan, table, work / f"plan_{name.split('@')[1]}.png"))))
"""),
    md("""
## Quality vs size: uniform vs mixed

Every configuration generates the same 8 prompts on seeds never used for the sensitivity
analysis; quality is 1 − SSIM and the CLIP-score drop against the full-precision images. Mixed
plans are also solved for two more budgets to trace the curve.
"""),
    code("""
clip = digits_clip()
seeds = [1000 + i for i in range(len(eval_prompts))]
gen = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
ref = generate(fp_pipe, eval_prompts, seeds, **gen)
ref_clip = float(clip_score_digits(clip, ref, eval_prompts).mean())

curve = dict(plans)
w8 = uniform["w8a8"].realised["avg_bits"]
for b in (tight + 0.25 * (w8 - tight), tight + 0.75 * (w8 - tight)):
    curve[f"mixed @{b:.2f}"] = diffq.allocate(table, budget=b)

rows = []
for name, plan in [*((f"uniform {p}", uniform[p]) for p in CANDIDATES), *curve.items()]:
    pipe = load_pipe()
    if name.startswith("uniform"):
        diffq.quantize(pipe, name.split()[1], progress=False)
    else:
        diffq.quantize(pipe, "mixed", plan=plan, progress=False)
    imgs = generate(pipe, eval_prompts, seeds, **gen)
    rows.append({"config": name, "kind": name.split()[0], "avg bits": plan.realised["avg_bits"],
                 "1 - SSIM": 1 - float(ssim(imgs, ref).mean()),
                 "CLIP drop": ref_clip - float(clip_score_digits(clip, imgs, eval_prompts).mean())})
results = pd.DataFrame(rows).sort_values("avg bits").set_index("config")
results.round(4)
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, col in zip(axes, ["1 - SSIM", "CLIP drop"]):
    for kind, style in [("uniform", "s--"), ("mixed", "o-")]:
        part = results[results["kind"] == kind].sort_values("avg bits")
        ax.plot(part["avg bits"], part[col], style, label=kind)
    ax.set_xlabel("stored bits per weight (analysed layers)")
    ax.set_ylabel(col + " vs full precision (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle(f"quality vs size on digits-sd ({len(eval_prompts)} images, {STEPS} steps)")
fig.tight_layout()
display(fig)
plt.close(fig)
"""),
    md("""
With 8 images the points are noisy; `benchmarks/mixed_precision.py` runs the same comparison on
500 held-out images, with a 3-bit candidate and a quality-only plan beside the decoupled one.
To use a plan: `plan.save("plan.json")`, then
`diffq.quantize(pipe, "mixed", plan=diffq.BitPlan.load("plan.json"))` or
`diffq quantize --preset mixed --set bit_plan=plan.json` on the command line.
"""),
]

# ------------------------------------------------------------------------------------- 04 kernels
NB04 = [
    md("""
# 04 · Low-bit GEMM kernels

Quantized layers only get faster when the matrix multiply reads the packed low-bit weights
directly. diffq ships Triton kernels for W4A16 (weight-only int4), W8A8, W4A8, W4A4 with the
SVDQuant low-rank branch, and FP8, each with a torch **reference** path that computes the same
numbers with plain torch ops (dequantize, then matmul).

* On a **CUDA GPU** `backend="auto"` runs the Triton kernels; this notebook then times them against
  a bf16 `torch.matmul` at the layer shapes of real denoisers.
* On a **CPU** (as here) `auto` falls back to the reference path and the baseline is an fp32
  matmul. The W8A8 reference runs torch's int8 GEMM and is genuinely faster than fp32; the int4
  and FP8 references dequantize the weight first and are *slower* than the dense matmul: they exist
  to define the numbers the GPU kernels must reproduce, not for speed. The notebook also checks
  that the reference and (under `TRITON_INTERPRET=1`) the Triton kernels agree.
"""),
    code(SETUP),
    code("""
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
"""),
    md("""
## Layer shapes

(model, layer, tokens, in features K, out features N) at each model's native resolution, batch 1.
On the CPU the token count is cut to 128 so the sweep takes seconds; on a GPU the real counts are
used. `benchmarks/kernels.py` sweeps 30 shapes of SD1.5, SDXL, PixArt-Σ and FLUX.1.
"""),
    code("""
SHAPES = [
    ("sd15", "attn qkv/out 32x32", 1024, 640, 640),
    ("sd15", "ff geglu in 16x16", 256, 1280, 10240),
    ("sdxl", "attn qkv/out 32x32", 1024, 1280, 1280),
    ("pixart", "ff out", 4096, 4608, 1152),
    ("flux", "double img qkv/out", 4096, 3072, 3072),
]
CPU_TOKENS = 128

def layer_weights(k, n):
    \"\"\"Packed weights of one random [n, k] layer in every format the kernels take.\"\"\"
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
    \"\"\"Median milliseconds of fn() (CUDA: triton's do_bench with L2 flushes).\"\"\"
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
"""),
    md("""
## Timing table

`vs base` = baseline time / kernel time (> 1 is faster). `weight MiB` is what the kernel reads for
the weights (codes + scales; the low-rank factors for `w4a4+lr32`): that ratio, not FLOPs, sets the
speed-up of the memory-bound small-batch layers on a GPU.
"""),
    code("""
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
    base_ms = bench(lambda: torch.matmul(x, W["dense"].t()))
    times = {f"{str(DTYPE)[6:]} matmul": base_ms, **{name: bench(fn) for name, fn in kernels(x, W).items()}}
    for name, ms in times.items():
        rows.append({"model": model, "layer": layer, "MxKxN": f"{m}x{k}x{n}", "kernel": name, "ms": ms,
                     "TFLOP/s": 2 * m * k * n / (ms * 1e-3) / 1e12, "vs base": base_ms / ms,
                     "weight MiB": weight_bytes("base" if "matmul" in name else name, W) / 2**20})
timing = pd.DataFrame(rows)
print("backend:", "Triton on " + torch.cuda.get_device_name(0) if ON_GPU else "torch reference on the CPU")
timing.round(3)
"""),
    code("""
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
"""),
    md("""
## Do the paths agree?

Each kernel's output against an fp32 matmul of the dequantized weight with the input quantized the
same way would be exact up to summation order; here, more simply, the relative error against the
**unquantized** layer shows what each format costs in accuracy on random data. When Triton can
run (a GPU, or the CPU interpreter with `TRITON_INTERPRET=1` set before the first import), the
Triton output is also compared with the reference on a small shape: the integer kernels are
bit-exact, floating ones agree to rounding.
"""),
    code("""
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
"""),
    md("""
## What a GPU run adds

* the Triton path for every kernel (int8 / FP8 tensor-core MMA, int4 unpacking in registers,
  activation quantization fused into one pass over the input, the low-rank branch of W4A4 in the
  GEMM epilogue) and `torch._scaled_mm` for FP8 on Hopper/Ada;
* real token counts (4,096 image tokens at 1024 px), where the ratio of weight bytes above turns
  into speed for the memory-bound layers and the 8-bit MMA rate into speed for the large ones;
* end-to-end denoiser step times: `python benchmarks/e2e_step.py`; the full kernel sweep with
  bytes moved and GB/s: `python benchmarks/kernels.py --json kernels_gpu.json`.

If a GPU sweep was saved in the repository, it is shown below.
"""),
    code("""
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
"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": NB01,
    "02_timestep_activations.ipynb": NB02,
    "03_mixed_precision.ipynb": NB03,
    "04_kernels.ipynb": NB04,
}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives byte-identical files
    return nb


def write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT), help="folder to write the notebooks to")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        write_atomic(nb, out / name)
        print(f"wrote {out / name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
