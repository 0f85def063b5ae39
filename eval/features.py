"""The image convention every metric in ``diffq.eval`` shares, and the feature networks FID runs on.

Images convention
-----------------
Every metric takes **float tensors ``[N, 3, H, W]`` with values in ``[0, 1]``** (RGB, channels
first).  That is what diffusers pipelines return with ``output_type="pt"`` and what PNGs decode to, so
one convention means no metric silently rescales a ``[-1, 1]`` batch.  :func:`to_tensor_batch`
converts the other forms people have at hand: a list of PIL images, a numpy ``HWC``/``NHWC`` array
(uint8 0..255 or float 0..1), a single ``[3, H, W]`` tensor, or grey ``[N, 1, H, W]`` (replicated to
RGB).  Anything outside ``[0, 1]`` or of another rank raises :class:`EvalInputError`.

Feature networks
----------------
FID compares the mean and covariance of image *features*; which network makes them is a choice
(Inception-v3 for numbers comparable with papers, a domain CLIP for small demo models whose images
Inception was never trained on).  :class:`FeatureNetwork` is the protocol: callable on an image batch,
returns float64 ``[N, D]`` on the CPU, and has ``num_features == D``.  Two adapters:

* :class:`ClipImageFeatures` -- the pooled output of a ``transformers.CLIPModel`` vision tower;
* :class:`InceptionFeatures` -- torchmetrics' Inception-v3 (the torch-fidelity port of the TF FID
  network), only when its weights file is already on disk; otherwise ``MissingWeightsError``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from diffq.errors import DiffqError, MissingWeightsError, ShapeError

# Mean/std of the OpenAI CLIP image preprocessing (what CLIPImageProcessor uses by default).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# torch-fidelity's Inception-v3 weights (the TF 2015-12-05 FID network), fetched by torchmetrics'
# FrechetInceptionDistance into the torch hub cache on first use when online.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class EvalInputError(DiffqError, ValueError):
    """Images, features or prompts a metric cannot use (wrong range, too few samples, ...)."""


def to_tensor_batch(images: Any) -> torch.Tensor:
    """Any common image batch -> float32 ``[N, 3, H, W]`` in ``[0, 1]`` on the same device (CPU for
    PIL/numpy).

    Accepts: a tensor ``[N, C, H, W]`` / ``[C, H, W]`` (C = 1 or 3, float in [0, 1] or uint8), a numpy
    array ``[N, H, W, C]`` / ``[H, W, C]`` / ``[H, W]`` (uint8 or float in [0, 1]), a PIL image, or a
    list/tuple of PIL images, numpy arrays or ``[C, H, W]`` tensors of one size.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise EvalInputError("empty image list; pass at least one image")
        items = [to_tensor_batch(im) for im in images]
        shapes = {tuple(t.shape[1:]) for t in items}
        if len(shapes) != 1:
            raise ShapeError(f"images in one batch must share a size, got {sorted(shapes)}; resize them first")
        return torch.cat([t.to(items[0].device) for t in items])
    if _is_pil(images):
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise ShapeError(f"numpy images must be HWC or NHWC with 1, 3 or 4 channels, got shape {images.shape}")
        if arr.shape[-1] == 4:
            arr = arr[..., :3]  # drop alpha
        t = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2)  # own a writable copy
    elif torch.is_tensor(images):
        t = images
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ShapeError(f"image tensors must be [N, 3, H, W] (or [3, H, W], 1 channel ok), got {tuple(images.shape)}")
    else:
        raise EvalInputError(f"cannot read images of type {type(images).__name__}; pass a tensor, numpy array or PIL")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise EvalInputError(f"image dtype {t.dtype} not understood; use uint8 (0..255) or float (0..1)")
    t = t.float()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.numel() and (not torch.isfinite(t).all() or t.min() < -1e-6 or t.max() > 1 + 1e-6):
        raise EvalInputError(
            f"image values must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]; "
            "convert [-1, 1] images with (x + 1) / 2"
        )
    return t.clamp(0, 1).contiguous()


def _is_pil(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def resize_and_normalize(images: torch.Tensor, size: int | tuple[int, int] | None,
                         mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> resized (bicubic, antialiased) and ``(x - mean) / std``."""
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(images.shape[-2:]) != hw:
            images = F.interpolate(images, size=hw, mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@runtime_checkable
class FeatureNetwork(Protocol):
    """Images ``[N, 3, H, W]`` in [0, 1] -> float64 CPU features ``[N, num_features]``."""

    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def module_device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pooled_output(out: Any) -> torch.Tensor:
    """The pooled tensor from whatever a transformers tower returned (tensor, ModelOutput, tuple)."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)) and len(out) > 1:
        pooled = out[1]
    if pooled is None:
        raise DiffqError(f"model returned {type(out).__name__} without a pooled output; pass a CLIP-like model")
    return pooled


class ClipImageFeatures:
    """FID features from a ``transformers.CLIPModel`` (or ``CLIPVisionModel``) image tower.

    ``projected=False`` (default) uses the vision tower's pooled output (``[N, hidden_size]``), the
    richer representation; ``projected=True`` uses the joint-space embedding (``[N, projection_dim]``).
    ``image_size`` defaults to the model's ``vision_config.image_size``; ``mean``/``std`` default to
    OpenAI CLIP's -- pass ``(0.5,)*3`` for models trained on ``2x - 1`` inputs such as digits-clip.
    """

    def __init__(self, model: torch.nn.Module, image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 *, projected: bool = False, batch_size: int = 256) -> None:
        cfg = getattr(model.config, "vision_config", model.config)
        self.model = model
        self.image_size = int(image_size or cfg.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.projected = projected
        self.batch_size = batch_size
        if projected:
            self.num_features = int(getattr(model.config, "projection_dim", cfg.hidden_size))
        else:
            self.num_features = int(cfg.hidden_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = to_tensor_batch(images)
        dev = module_device(self.model)
        dtype = next(self.model.parameters()).dtype
        outs = []
        for i in range(0, len(images), self.batch_size):
            x = resize_and_normalize(images[i:i + self.batch_size].to(dev), self.image_size, self.mean, self.std)
            x = x.to(dtype)
            if self.projected:
                feats = project_image(self.model, x)
            else:
                tower = getattr(self.model, "vision_model", self.model)
                feats = pooled_output(tower(pixel_values=x))
            outs.append(feats.double().cpu())
        return torch.cat(outs)


def _projected(out: Any, projection: torch.nn.Module | None) -> torch.Tensor:
    emb = pooled_output(out)
    if isinstance(projection, torch.nn.Linear):
        d = emb.shape[-1]
        if d == projection.in_features and d != projection.out_features:
            emb = projection(emb)  # pooled but not projected (some releases / custom models)
    return emb


def project_image(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Joint-space image embeddings ``[N, E]`` (not normalised) from a transformers CLIP-like model."""
    return _projected(model.get_image_features(pixel_values=pixel_values), getattr(model, "visual_projection", None))


def project_text(model: torch.nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Joint-space text embeddings ``[M, E]`` (not normalised) from a transformers CLIP-like model."""
    kw = {"input_ids": input_ids}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    return _projected(model.get_text_features(**kw), getattr(model, "text_projection", None))


def torch_hub_checkpoints_dir() -> Path:
    """Where torch hub / torchvision keep downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The local Inception-v3 FID weights file, or ``MissingWeightsError`` naming where to put it."""
    name = os.path.basename(INCEPTION_WEIGHTS_URL)
    with contextlib.suppress(Exception):  # torch-fidelity's own URL when installed; else the known name
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        name = os.path.basename(URL_INCEPTION_V3)
    candidate = Path(path) if path is not None else torch_hub_checkpoints_dir() / name
    if not candidate.is_file():
        raise MissingWeightsError(
            f"Inception-v3 FID weights not found at {candidate}; download {INCEPTION_WEIGHTS_URL} on a machine "
            f"with network and copy it to {torch_hub_checkpoints_dir()}/{name} (or pass its path), or use a "
            "CLIP feature network (ClipImageFeatures) instead"
        )
    return candidate


class InceptionFeatures:
    """torchmetrics' Inception-v3 FID features (``feature`` in 64, 192, 768, 2048), offline only.

    Needs the ``torch-fidelity`` package (torchmetrics' Inception port) and its weights file on disk;
    nothing is downloaded.  Images are fed as uint8 like the reference implementation.
    """

    def __init__(self, feature: int = 2048, weights_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        path = inception_weights_path(weights_path)
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as e:
            raise MissingWeightsError(
                "Inception FID features need the torch-fidelity package (pip install torch-fidelity); "
                f"the weights file {path} is present"
            ) from e
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(path))
        self.net = metric.inception.to(device).eval()
        self.num_features = int(feature)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = to_tensor_batch(images)
        outs = []
        for i in range(0, len(images), self.batch_size):
            x = (images[i:i + self.batch_size] * 255).round().to(torch.uint8).to(self.device)
            outs.append(self.net(x).reshape(len(x), -1).double().cpu())
        return torch.cat(outs)


__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipImageFeatures",
    "EvalInputError",
    "FeatureNetwork",
    "InceptionFeatures",
    "inception_weights_path",
    "module_device",
    "pooled_output",
    "resize_and_normalize",
    "to_tensor_batch",
    "torch_hub_checkpoints_dir",
]
