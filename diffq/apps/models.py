"""Resolve a model name from the command line or a notebook to a pipeline.

``digits-sd`` / ``digits-dit``: the small models shipped with diffq (offline).
``tiny-<family>``: random tiny pipelines for tests (sd, sdxl, pixart, sd3, flux, dit).
Anything else: a local folder or a hub id for ``DiffusionPipeline.from_pretrained`` (cached
weights only when HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffq.errors import MissingWeightsError, UnsupportedModelError

#: how a model can be named, for error messages
MODEL_FORMS = ("digits-sd | digits-dit (shipped), tiny-<family> (random test pipelines: sd, sdxl, pixart, sd3, "
               "flux, dit), a local diffusers folder (with model_index.json) or a hub id")


def _looks_like_path(name: str) -> bool:
    """A folder, not a hub id (``org/name``): explicit relative/absolute paths, deeper paths, existing paths."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def check_model_name(name: str) -> None:
    """Refuse a model name that cannot work, before anything is loaded (the CLI calls it first)."""
    if name.startswith("digits-"):
        from diffq.pipelines.demo_models import DEMO_MODELS

        if name not in DEMO_MODELS:
            raise UnsupportedModelError(f"unknown model {name!r}; models are {MODEL_FORMS}")
    elif name.startswith("tiny-"):
        from diffq.pipelines.testing import TINY_FAMILIES

        if name[len("tiny-"):] not in TINY_FAMILIES:
            raise UnsupportedModelError(f"unknown test pipeline {name!r}; use tiny-<family> with family one of "
                                        f"{', '.join(TINY_FAMILIES)}")
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise MissingWeightsError(f"model folder {name!r} does not exist; models are {MODEL_FORMS}")
        if not (path / "model_index.json").is_file():
            raise MissingWeightsError(f"{name!r} is not a diffusers pipeline folder (it has no model_index.json); "
                                      f"save one with pipe.save_pretrained(folder)")


def load_model(name: str, *, dtype: torch.dtype | None = None, device: str | None = None):
    check_model_name(name)
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
                f"cannot load pipeline {name!r} offline ({e.__class__.__name__}): it is not a shipped model, a "
                f"tiny-<family> pipeline or a local folder, and not in the hub cache. Download it once with "
                f"`huggingface-cli download {name}` on a machine with internet and point HF_HOME at that cache "
                f"(models are {MODEL_FORMS})"
            ) from e
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
