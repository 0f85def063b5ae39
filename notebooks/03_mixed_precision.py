# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Mixed precision: sensitivity, bit plans, quality vs size
#
# Not every layer tolerates 4 bits equally. diffq measures each unit's **sensitivity** by quantizing
# it alone and regenerating a few images, with two separate metrics:
#
# * **quality**: 1 − SSIM against the full-precision images (noise, blur, broken strokes);
# * **alignment**: the drop of the CLIP score (here digits-clip): the picture stays clean but stops
#   matching the prompt.
#
# Each metric is normalised over the units on its own, then every unit is judged by the sum of both
# (`diffq.mixed.table.CONDITIONING_JUDGES` restricts alignment to cross-attention and
# conditioning layers, MixDQ-style). An integer
# program (`diffq.allocate`) then picks one format per unit with the least total sensitivity under a
# size budget. The plan is applied with the `mixed` recipe.
#
# Sizes are tiny so that it runs on a CPU in about a minute: 4 prompts, 6 steps and one unit per
# block for the sensitivity analysis (about 40 short generations).

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
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

import diffq
from diffq.eval import clip_score_digits, digits_scorer, image_distance, load_prompts, ssim
from diffq.generation import generate
from diffq.mixed.allocate import uniform_plan
from diffq.mixed.plots import plot_plan, plot_sensitivity
from diffq.pipelines.demo_models import demo_pipeline, digits_clip

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

# %% [markdown]
# ## Sensitivity
#
# `groups="block"` makes one unit per ResNet / transformer block (about 20 units here instead of
# 119 layers); on a large model `"block_role"` keeps cross-attention apart from the rest of its block.
# `cache_dir` makes the analysis resumable: an interrupted run continues where it stopped.

# %%
# w4a8 rounds its weights with GPTQ, which needs real layer inputs: calibrate with a reservoir
# (on prompts of their own, not the evaluation prompts)
stats = diffq.calibrate(fp_pipe, prompts[-8:], num_inference_steps=STEPS, guidance_scale=GUIDANCE, reservoir=64,
                        seed=10_000, progress=False)
table = diffq.sensitivity(
    fp_pipe, prompts=sens_prompts, candidates=CANDIDATES, groups="block", calibration=stats,
    quality=image_distance("ssim"),                 # quality: 1 - SSIM against the FP images
    scorer=digits_scorer(digits_clip()).per_image,  # alignment: digits-clip's CLIP score
    num_inference_steps=STEPS, guidance_scale=GUIDANCE, cache_dir=work / "sensitivity", progress=False,
)
print(f"{len(table.units)} units, {table.meta['evaluations']} generations in {table.meta['seconds']:.0f} s")
print(table.table())

# %%
display(Image(filename=str(plot_sensitivity(table, work / "sensitivity.png"))))

# %% [markdown]
# The two metrics disagree on which units matter: each point is one unit at `w4a8`. Units far above
# the diagonal would be under-protected by a quality-only analysis.

# %%
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
display(fig)  # explicit: diffq.mixed.plots switched matplotlib to the Agg backend above
plt.close(fig)

# %% [markdown]
# ## Bit plans under two budgets
#
# Budgets are in stored bits per weight over the analysed layers (scales and biases included). The
# tight budget is what uniform `w4a8` costs, the loose one lies halfway to uniform `w8a8`; the
# allocator must fit under each.

# %%
den = fp_pipe.unet
uniform = {p: uniform_plan(table, den, p) for p in CANDIDATES}
tight = uniform["w4a8"].realised["avg_bits"]
loose = (tight + uniform["w8a8"].realised["avg_bits"]) / 2
plans = {f"mixed @{b:.2f}": diffq.allocate(table, budget=b) for b in (tight, loose)}
for name, plan in plans.items():
    print(f"== {name}")
    print(plan.summary(), end="\n\n")

# %%
for name, plan in plans.items():
    display(Image(filename=str(plot_plan(plan, table, work / f"plan_{name.split('@')[1]}.png"))))

# %% [markdown]
# ## Quality vs size: uniform vs mixed
#
# Every configuration generates the same 8 prompts on seeds never used for the sensitivity
# analysis; quality is 1 − SSIM and the CLIP-score drop against the full-precision images. Mixed
# plans are also solved for two more budgets to trace the curve.

# %%
clip = digits_clip()
seeds = [1000 + i for i in range(len(eval_prompts))]
gen = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
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
        diffq.quantize(pipe, name.split()[1], calibration=stats, progress=False)
    else:
        diffq.quantize(pipe, "mixed", plan=plan, calibration=stats, progress=False)
    imgs = generate(pipe, eval_prompts, seeds, **gen)
    rows.append({"config": name, "kind": name.split()[0], "avg bits": plan.realised["avg_bits"],
                 "1 - SSIM": 1 - float(ssim(imgs, ref).mean()),
                 "CLIP drop": ref_clip - float(clip_score_digits(clip, imgs, eval_prompts).mean())})
results = pd.DataFrame(rows).sort_values("avg bits").set_index("config")
results.round(4)

# %%
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

# %% [markdown]
# With 8 images the points are noisy; `benchmarks/mixed_precision.py` runs the same comparison on
# 500 held-out images, with a 3-bit candidate and a quality-only plan beside the decoupled one.
# To use a plan: `plan.save("plan.json")`, then
# `diffq.quantize(pipe, "mixed", plan=diffq.BitPlan.load("plan.json"))` or
# `diffq quantize --preset mixed --set bit_plan=plan.json` on the command line.
