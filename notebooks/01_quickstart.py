# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Quickstart: calibrate, quantize with two presets, compare
#
# This notebook walks through the whole diffq loop on **digits-sd**, a small but real
# `StableDiffusionPipeline` shipped with diffq (32×32 handwritten digits, trained on MNIST), so it
# runs offline on a laptop CPU in about a minute:
#
# 1. load a pipeline,
# 2. calibrate: record per-timestep activation statistics on a few prompts,
# 3. quantize fresh copies with two presets,
# 4. generate the same prompts with the same seeds and compare images, metrics and sizes.
#
# The same code works for a hub model on a GPU; see the cell *Using a real model*.

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
import diffq
from diffq.eval import clip_score_digits, image_grid, load_prompts, psnr, ssim
from diffq.generation import generate
from diffq.pipelines.demo_models import demo_pipeline, digit_class_from_prompt, digits_clip

N_PROMPTS = 8          # images per configuration
STEPS = 10             # denoising steps
GUIDANCE = 3.0         # classifier-free guidance scale
PRESETS_TO_COMPARE = ["w8a8-static", "w4a8"]   # any of diffq.PRESETS
EVAL_SEEDS = [100 + i for i in range(N_PROMPTS)]  # calibration uses seeds 0.., evaluation others

from diffq.quantization.presets import DESCRIPTIONS

for name in PRESETS_TO_COMPARE:
    print(f"{name:12s} {DESCRIPTIONS[name]}")
print("full recipe:", diffq.get_preset(PRESETS_TO_COMPARE[0]))

# %% [markdown]
# ## Load a pipeline
#
# `load_pipe()` returns a fresh full-precision pipeline; quantization works in place, so every
# preset gets its own copy. For the demo model loading takes well under a second.
#
# ### Using a real model
#
# On a GPU machine with the weights in the Hugging Face cache, set `HUB_MODEL`, e.g.
# `"stabilityai/stable-diffusion-xl-base-1.0"` or `"black-forest-labs/FLUX.1-dev"`, and a prompt
# file (one prompt per line). Everything below is unchanged; use more prompts (≥ 64 for
# calibration), ~28 steps, and the model's own guidance scale (FLUX.1-dev: 3.5). The CLIP-score cell
# then needs a real CLIP model (`diffq.eval.ClipScorer.from_pretrained(path)`) instead of digits-clip.

# %%
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

# %% [markdown]
# ## Calibrate
#
# `diffq.calibrate` runs the real pipeline (scheduler, classifier-free guidance batch) with hooks on
# every quantizable layer and keeps, per layer and per denoising step, the channel-wise abs-max and a
# histogram of activations. Presets with static activation ranges (`w8a8-static`) or smoothing
# (`w4a4-svd`) need it; dynamic presets ignore it. GPTQ rounding (`w4a8`, `w4a16`, `w4a4-svd`) and
# the per-layer smoothing search also need real input rows: `reservoir=N` keeps a uniform sample of
# N rows per layer and step. The statistics can be saved with `stats.save("calib.safetensors")` and
# reused for every recipe.

# %%
stats = diffq.calibrate(fp_pipe, prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, reservoir=64,
                        progress=False)
print(f"{len(stats.layers)} layers, {len(stats.observed_steps())} steps recorded; timesteps {stats.step_buckets}")

# %% [markdown]
# ## Full-precision reference and quantized pipelines

# %%
gen = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}
images = {"fp32": generate(fp_pipe, prompts, EVAL_SEEDS, **gen)}
summaries = {}
for name in PRESETS_TO_COMPARE:
    pipe = load_pipe()
    summaries[name] = diffq.quantize(pipe, name, calibration=stats, progress=False)
    images[name] = generate(pipe, prompts, EVAL_SEEDS, **gen)
    del pipe
{k: tuple(v.shape) for k, v in images.items()}

# %% [markdown]
# Rows are prompts, columns configurations; every column uses the same initial noise.

# %%
cols = list(images)
image_grid([[images[c][i] for c in cols] for i in range(len(prompts))], row_labels=prompts, col_labels=cols)

# %% [markdown]
# ## Metric table
#
# * **PSNR / SSIM** against the full-precision image of the same prompt and seed (paired: how much
#   quantization changed the picture);
# * **CLIP score** under digits-clip (text–image alignment, 0–100) and **digit accuracy** (does
#   digits-clip read the digit the prompt asked for);
# * **FID** against the 1,000 held-out real digits, in digits-clip features. With 8 images FID is
#   strongly biased upwards; only compare it between columns of this table.

# %%
import pandas as pd

from diffq.eval import fid_from_features
from diffq.pipelines.demo_models import heldout_digits

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

# %% [markdown]
# ## Sizes
#
# `diffq.quantize` returns a `QuantSummary`: per layer the format and bytes before/after, and the
# size ratio of the whole denoiser (all parameters and buffers, including the layers its skip rules
# keep in 16 bits: embeddings, normalisation modulation, first/last conv).

# %%
sizes = pd.DataFrame([
    {"config": name, "layers quantized": f"{len(s.quantized)}/{len(s.layers)}",
     "denoiser MiB": s.denoiser_bytes_after / 2**20, "x smaller": s.size_ratio,
     "quantized layers KiB": s.packed_bytes / 1024}
    for name, s in summaries.items()
]).set_index("config")
first = next(iter(summaries.values()))
print(f"full-precision denoiser: {first.denoiser_bytes_before / 2**20:.2f} MiB")
sizes.round(2)

# %%
print(summaries[PRESETS_TO_COMPARE[-1]].table(max_rows=12))

# %% [markdown]
# ## Next
#
# * `02_timestep_activations.ipynb`: why static activation ranges are grouped by timestep;
# * `03_mixed_precision.ipynb`: per-layer sensitivity and a bit plan under a size budget;
# * `04_kernels.ipynb`: the packed low-bit GEMM kernels and their speed;
# * `diffq.save(pipe, "out/")` writes the quantized pipeline; `diffq eval` on the command line runs
#   the full FID / CLIP-score comparison over hundreds of prompts.
