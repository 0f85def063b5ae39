"""CLIP score (does the image show what the prompt says?) and zero-shot classification.

Score definition (the usual one, Hessel et al. 2021 with w = 100):

    clip_score(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0)

per image, where ``E_*`` are the model's *projected* (joint-space) embeddings; a set's CLIP score is
the mean over its images.  Scores from different CLIP models are not comparable.

Backends
--------
* ``transformers.CLIPModel`` + its tokenizer (any ``PreTrainedTokenizer[Fast]``, including a
  word-level one built with ``tokenizers``).  torchmetrics' ``CLIPScore`` is *not* used: with
  transformers 5, ``get_image_features`` / ``get_text_features`` return a
  ``BaseModelOutputWithPooling`` whose ``pooler_output`` already holds the projection, while older
  releases return the projected tensor; :func:`project_image` / :func:`project_text` accept both
  (and a pooled-but-unprojected output, which they project).
* open_clip models (``model.encode_image`` / ``encode_text``), built with
  :meth:`ClipScorer.from_open_clip` from a *local* checkpoint file only.

Images are float ``[N, 3, H, W]`` in ``[0, 1]``; they are resized (bicubic, antialiased) to the
model's input size and normalised with the model's mean/std -- OpenAI CLIP's by default, ``0.5`` for
models trained on ``2x - 1`` inputs such as digits-clip (:func:`clip_score_digits` sets that).
Generated images are square, so resizing equals CLIP's resize + centre-crop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffq.errors import DiffqError, MissingWeightsError
from diffq.eval.features import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EvalInputError,
    module_device,
    project_image,
    project_text,
    resize_and_normalize,
    to_tensor_batch,
)


@dataclass
class ClipScore:
    """``mean``: the set's CLIP score; ``per_image``: float32 ``[N]`` (both on the 0..100 scale)."""

    mean: float
    per_image: torch.Tensor


class ClipScorer:
    """Embeds images and prompts with one CLIP model; scores pairs and classifies zero-shot.

    ``ClipScorer(model, tokenizer)`` takes a ``transformers`` CLIP-like model (has
    ``get_image_features``) with its tokenizer, or an open_clip model (has ``encode_image``) with an
    open_clip tokenizer.  ``image_size`` / ``mean`` / ``std`` default to the model's own settings
    (transformers: ``vision_config.image_size`` and OpenAI CLIP's mean/std; open_clip: its
    ``preprocess_cfg``).  Runs on the model's device and dtype; results come back float32 on the CPU.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, image_size: int | tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 max_length: int | None = None, batch_size: int = 64, name: str | None = None) -> None:
        self.model = model.eval()
        # identifies the scorer in caches (e.g. a sensitivity analysis): the model's hub id or class
        config = getattr(model, "config", None)
        self.name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
            self.backend = "transformers"
            vcfg = getattr(model.config, "vision_config", model.config)
            tcfg = getattr(model.config, "text_config", model.config)
            self.image_size = image_size or vcfg.image_size
            self.mean, self.std = tuple(mean or OPENAI_CLIP_MEAN), tuple(std or OPENAI_CLIP_STD)
            limit = getattr(tcfg, "max_position_embeddings", None)
            tok_max = getattr(tokenizer, "model_max_length", None)
            cands = [v for v in (max_length, tok_max if tok_max and tok_max < 100_000 else None, limit) if v]
            self.max_length = int(min(cands)) if cands else 77
        elif hasattr(model, "encode_image") and hasattr(model, "encode_text"):
            self.backend = "open_clip"
            visual = model.visual
            pp = getattr(visual, "preprocess_cfg", {}) or {}
            self.image_size = image_size or pp.get("size") or getattr(visual, "image_size", 224)
            self.mean = tuple(mean or pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
            self.std = tuple(std or pp.get("std") or getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
            self.max_length = max_length
        else:
            raise DiffqError(f"{type(model).__name__} is not a CLIP model: it needs get_image_features/"
                             "get_text_features (transformers) or encode_image/encode_text (open_clip)")

    # ----------------------------------------------------------------- construction from files
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ClipScorer:
        """A transformers CLIP model + tokenizer saved in a local folder (never downloads)."""
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise MissingWeightsError(f"CLIP model folder {path} not found; pass a local folder written by "
                                      "save_pretrained (model + tokenizer files)")
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise MissingWeightsError(f"cannot load a CLIP model + tokenizer from {path}: {e}") from e
        return cls(model, tok, **kwargs)

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | os.PathLike, device: str | torch.device = "cpu",
                       **kwargs) -> ClipScorer:
        """open_clip architecture ``name`` with weights from the *local file* ``pretrained``.

        A pretrained tag ("openai", "laion2b_...") would download, so only file paths are accepted;
        anything else raises ``MissingWeightsError``.
        """
        if pretrained is None or not os.path.isfile(pretrained):
            raise MissingWeightsError(
                f"open_clip weights for {name!r} must be a local file, got {pretrained!r}; download the "
                "checkpoint (e.g. open_clip_pytorch_model.bin / .safetensors) on a networked machine and pass its path"
            )
        import open_clip

        try:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(pretrained), device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except RuntimeError as e:
            raise MissingWeightsError(f"open_clip could not build {name!r} from {pretrained}: {e}") from e
        return cls(model, tokenizer, **kwargs)

    # ----------------------------------------------------------------------------- embeddings
    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """L2-normalised joint-space embeddings of images ``[N, 3, H, W]`` in [0, 1] -> float32 ``[N, E]``."""
        images = to_tensor_batch(images)
        outs = []
        for i in range(0, len(images), self.batch_size):
            x = resize_and_normalize(images[i:i + self.batch_size].to(self.device), self.image_size,
                                     self.mean, self.std).to(self.dtype)
            if self.backend == "transformers":
                e = project_image(self.model, x)
            else:
                e = self.model.encode_image(x)
            outs.append(F.normalize(e.float(), dim=-1).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised joint-space embeddings of ``texts`` -> float32 ``[M, E]``."""
        texts = [str(t) for t in texts]
        if not texts:
            raise EvalInputError("no texts to embed")
        outs = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            if self.backend == "transformers":
                ids, mask = self._tokenize(chunk)
                e = project_text(self.model, ids.to(self.device), None if mask is None else mask.to(self.device))
            else:
                tokens = self.tokenizer(chunk)
                e = self.model.encode_text(tokens.to(self.device))
            outs.append(F.normalize(e.float(), dim=-1).cpu())
        return torch.cat(outs)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = self.tokenizer
        if getattr(tok, "pad_token", None) is not None:
            enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            return enc["input_ids"], enc.get("attention_mask")
        # No pad token (e.g. a bare word-level tokenizer): encode one by one and right-pad with 0s under a
        # zero attention mask.  CLIP's text tower is causal and pools at EOS, so padding never leaks in.
        rows = [tok(t, truncation=True, max_length=self.max_length)["input_ids"] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        return ids, mask

    # ---------------------------------------------------------------------------------- metrics
    def per_image(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP score of each image with its own prompt, float32 ``[N]`` in [0, 100]."""
        prompts = list(prompts)
        img = self.image_embeds(images)
        if len(prompts) != len(img):
            raise EvalInputError(f"{len(img)} images but {len(prompts)} prompts; pass one prompt per image")
        uniq = sorted(set(prompts))
        txt = self.text_embeds(uniq)
        index = {p: k for k, p in enumerate(uniq)}
        t = txt[torch.tensor([index[p] for p in prompts])]
        return 100 * (img * t).sum(-1).clamp(min=0)

    def score(self, images, prompts: Sequence[str]) -> ClipScore:
        """Set CLIP score (mean over images) plus the per-image values."""
        per = self.per_image(images, prompts)
        return ClipScore(float(per.mean()), per)

    def similarity(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every image with every text, float32 ``[N, M]``."""
        return self.image_embeds(images) @ self.text_embeds(texts).T

    def zero_shot_classify(self, images, class_prompts: Sequence[str] | Sequence[Sequence[str]]) -> torch.Tensor:
        """Index of the best-matching class for each image, int64 ``[N]``.

        ``class_prompts[k]`` is one prompt or a list of prompts for class ``k`` (their normalised
        embeddings are averaged: a prompt ensemble).
        """
        if not class_prompts:
            raise EvalInputError("no class prompts given")
        groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
        if any(not g for g in groups):
            raise EvalInputError("every class needs at least one prompt")
        flat = [p for g in groups for p in g]
        emb = self.text_embeds(flat)
        cls, start = [], 0
        for g in groups:
            cls.append(F.normalize(emb[start:start + len(g)].mean(0), dim=-1))
            start += len(g)
        return (self.image_embeds(images) @ torch.stack(cls).T).argmax(-1)

    def as_feature_network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Normalised joint-space image embeddings as a FID :class:`FeatureNetwork` (float64)."""
        return _ScorerFeatures(self)


class _ScorerFeatures:
    def __init__(self, scorer: ClipScorer) -> None:
        self.scorer = scorer
        self.num_features = int(scorer.image_embeds(torch.zeros(1, 3, 8, 8)).shape[-1])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer.image_embeds(images).double()


def clip_score(scorer: ClipScorer, images, prompts: Sequence[str]) -> ClipScore:
    """Functional form of :meth:`ClipScorer.score`."""
    return scorer.score(images, prompts)


def zero_shot_classify(scorer: ClipScorer, images, class_prompts) -> torch.Tensor:
    """Functional form of :meth:`ClipScorer.zero_shot_classify`."""
    return scorer.zero_shot_classify(images, class_prompts)


def digits_scorer(clip: Any) -> ClipScorer:
    """A :class:`ClipScorer` for digits-clip: ``clip`` is a ``DigitsClip`` or ``(model, tokenizer)``;
    32x32 inputs scaled to ``2x - 1`` (mean = std = 0.5), as digits-clip was trained."""
    model, tokenizer = tuple(clip)
    return ClipScorer(model, tokenizer, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name="digits-clip")


def clip_score_digits(clip: Any, images, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image CLIP score (float32 ``[N]``, 0..100) of digits images under digits-clip."""
    return digits_scorer(clip).per_image(images, prompts)


__all__ = [
    "ClipScore",
    "ClipScorer",
    "clip_score",
    "clip_score_digits",
    "digits_scorer",
    "project_image",
    "project_text",
    "zero_shot_classify",
]
