# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Activations across denoising steps
#
# A diffusion denoiser is called once per step with a different noise level, and the input
# statistics of a layer can change by an order of magnitude between the first (pure noise) and the
# last (almost clean) step. A single static activation range must cover the largest step, which
# wastes grid resolution at the others. diffq groups contiguous steps whose ranges are close and
# gives each group its own range (looked up from the timestep at inference).
#
# This notebook calibrates digits-sd, finds the layers whose ranges vary most over the trajectory,
# and measures what per-timestep ranges buy, first as expected quantization error, then end to end.

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
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import diffq
from diffq.calibration import grouping_mse, step_groups, timestep_act_ranges
from diffq.eval import load_prompts, psnr, ssim
from diffq.generation import generate
from diffq.pipelines.demo_models import demo_pipeline
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

# %% [markdown]
# ## Which layers vary most?
#
# For each layer, `LayerStats.amax()` is the per-step abs-max of its input. The spread is the ratio of
# the largest to the smallest per-step range: a spread of 4 means one static range wastes two bits at
# the quietest step. The time-embedding projections usually top the list (their input *is* the
# timestep embedding), but the presets keep role `embed` in 16 bits, so the plots below use the
# layers that are actually quantized.

# %%
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

# %%
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

# %% [markdown]
# The whole picture: every layer's per-step range divided by its largest one (1 = the step that sets a
# single static range). Dark cells are steps where one static range would be too wide.

# %%
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

# %% [markdown]
# ## What per-timestep ranges change
#
# `timestep_act_ranges(stats, layer, qmax=..., groups=G)` returns the static range of each timestep
# group and the timestep → group table that the quantized layer uses at inference. `groups=1` is a
# single range; `groups=None` lets diffq merge adjacent steps while their ranges differ by less than
# 25 % (the default of `w8a8-static`). Below: the per-step range of the most varying layer and the
# range each grouping would use.

# %%
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

# %% [markdown]
# Expected activation MSE (from the calibration histograms, min-max ranges) of the top layers at 8
# and 4 bits, for one range, 2 groups, the automatic grouping and one range per step. Values are
# relative to one range (1.0); lower is better.

# %%
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

# %% [markdown]
# ## End to end
#
# The `w8a8-static` preset with one range per layer (`timestep_groups=1`) against the same preset
# with automatic timestep groups (the preset's default); the images are compared with the
# full-precision ones (same seeds).
# Activations are also tried at 6 bits, where the grid is coarse enough for the difference to show.

# %%
seeds = [100 + i for i in range(N_PROMPTS)]
gen = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
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

# %% [markdown]
# Timestep groups cost one range per group per layer (a few bytes) and one table lookup per step;
# the calibration statistics are reused, nothing is re-run, so both variants are cheap to compare.
# Whether groups pay off end to end depends on the model: narrower ranges help the steps with small
# activations, but each group's range is clipped from fewer samples, and errors made at early steps
# are partly corrected by later ones. Lower expected MSE per layer (the table above) is necessary,
# not sufficient; always check images, as here, before choosing `timestep_groups`.
