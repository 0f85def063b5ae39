"""One way to run a pipeline for diffq: prompts + per-image seeds -> images in [0, 1].

Calibration, sensitivity analysis and evaluation all generate through here, so "the same seed"
means the same initial noise for the FP and the quantized pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffq.errors import DiffqError
from diffq.pipelines.adapters import adapter_for
from diffq.progress import progress_enabled


def prompts_to_class_labels(pipe, prompts: Sequence[str | int]) -> list[int]:
    """Map prompts to class ids for class-conditional pipelines (DiT).

    Ints pass through; a string is matched against the pipeline's ``id2label`` names: an exact
    label first, else the label whose words all occur in the prompt (longest label wins).
    """
    # DiTPipeline builds pipe.labels = {label name: class id} from its id2label
    names = {str(k).strip().lower(): int(v) for k, v in (getattr(pipe, "labels", None) or {}).items()}
    out = []
    for p in prompts:
        if isinstance(p, (int, np.integer)):
            out.append(int(p))
            continue
        text = str(p).lower().strip()
        if text in names:
            out.append(names[text])
            continue
        words = set(text.replace(",", " ").split())
        hits = [(len(n), i) for n, i in names.items() if n and set(n.split()) <= words]
        if not hits:
            raise DiffqError(
                f"cannot map prompt {p!r} to a class of this class-conditional pipeline; "
                f"use a label name such as {sorted(names)[:5]} or pass class ids"
            )
        out.append(max(hits)[1])
    return out


def pipeline_kwargs(pipe, prompts: Sequence[str], generators: list[torch.Generator], **kw) -> dict:
    """Build the ``pipe(...)`` kwargs for a batch of prompts, per family."""
    adapter = adapter_for(pipe)
    fam = adapter.name
    args = {**adapter.extra_call_kwargs(pipe), **{k: v for k, v in kw.items() if v is not None}}
    if fam == "dit":
        args["class_labels"] = prompts_to_class_labels(pipe, prompts)
        args.pop("height", None)
        args.pop("width", None)
        args.pop("negative_prompt", None)
    else:
        args["prompt"] = list(prompts)
    args["generator"] = generators
    args["output_type"] = "np"
    return args


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
    extra_kwargs: dict | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] float32 in [0, 1] on CPU; image i uses ``seeds[i]`` (default i).

    extra_kwargs: more ``pipe(...)`` arguments, e.g. FLUX's ``{"true_cfg_scale": 4.0,
    "negative_prompt": "blurry"}`` (a negative prompt string applies to every image)."""
    prompts = list(prompts)
    if not prompts:
        raise DiffqError("no prompts given; pass at least one prompt")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise DiffqError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    device = _device_of(pipe)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress_enabled(progress), leave=False)
    # one bar (ours, per image) instead of the pipeline's per-step bar for every batch
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        out = _generate_batches(pipe, prompts, seeds, batch_size, device, bar, num_inference_steps,
                                guidance_scale, height, width, extra_kwargs or {})
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = saved_bar_config
        bar.close()
    return torch.cat(out)


def _generate_batches(pipe, prompts, seeds, batch_size, device, bar, num_inference_steps, guidance_scale,
                      height, width, extra: dict) -> list[torch.Tensor]:
    out = []
    for i in range(0, len(prompts), batch_size):
        ps = prompts[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        kw = pipeline_kwargs(
            pipe, ps, gens, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width,
        )
        kw.update(extra)
        if device.type != "cpu":
            kw["generator"] = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        res = pipe(**kw)
        imgs = res.images if hasattr(res, "images") else res[0]
        out.append(to_tensor_images(imgs))
        bar.update(len(ps))
    return out


def to_tensor_images(imgs) -> torch.Tensor:
    """numpy [B, H, W, C] / PIL list / tensor [B, C, H, W] -> float32 [B, 3, H, W] in [0, 1]."""
    if isinstance(imgs, torch.Tensor):
        t = imgs.float()
        if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
            t = t.permute(0, 3, 1, 2)
    elif isinstance(imgs, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(imgs)).float()
        if t.dim() == 3:
            t = t.unsqueeze(-1)
        t = t.permute(0, 3, 1, 2)
    else:
        t = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).float() / 255 for im in imgs])
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.clamp(0, 1).contiguous()


def _device_of(pipe) -> torch.device:
    dev = getattr(pipe, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")
