"""Resolve a model name from the command line or a notebook to a pipeline.

``digits-sd`` / ``digits-dit``: the small models shipped with diffq (offline).
``tiny-<family>``: random tiny pipelines for tests (sd, sdxl, pixart, sd3, flux, dit).
Anything else: a local folder or a hub id for ``DiffusionPipeline.from_pretrained`` (cached
weights only when HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

import torch

from diffq.errors import MissingWeightsError


def load_model(name: str, *, dtype: torch.dtype | None = None, device: str | None = None):
    if name.startswith("digits-"):
        from diffq.pipelines.demo_models import demo_pipeline

        pipe = demo_pipeline(name)
    elif name.startswith("tiny-"):
        from diffq.pipelines.testing import tiny_pipeline

        pipe = tiny_pipeline(name[len("tiny-"):])
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(
                name, dtype=dtype or torch.bfloat16,
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.path.isdir(name),
            )
        except (OSError, ValueError) as e:
            raise MissingWeightsError(
                f"cannot load pipeline {name!r} offline ({e.__class__.__name__}). Give a local folder with "
                f"model_index.json, or download it once with `huggingface-cli download {name}` on a machine "
                f"with internet and point HF_HOME at that cache"
            ) from e
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
