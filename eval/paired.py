"""Paired metrics: how close a quantized model's images are to the full-precision model's images for
the *same* prompts and seeds.

Why paired: with the same prompt, seed and scheduler, any pixel difference is caused by quantization,
so these numbers isolate its cost far more sharply than distribution metrics (FID) do.

All functions take float ``[N, 3, H, W]`` in ``[0, 1]`` (anything :func:`to_tensor_batch` accepts)
and return one float32 value per image, ``Tensor[N]``; average with ``.mean()``.

* :func:`psnr`  -- ``10 log10(1 / MSE)`` per image, ``inf`` for identical images;
* :func:`ssim`  -- torchmetrics' Gaussian-window SSIM (11x11, sigma 1.5), 1 for identical images;
* :func:`lpips` -- torchmetrics' LPIPS (AlexNet / VGG16 / SqueezeNet backbone).  The backbone's
  ImageNet weights come from torchvision's file in the torch hub cache; they are checked *before*
  anything is built, and a missing file raises ``MissingWeightsError`` instead of a download attempt.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from diffq.errors import MissingWeightsError, ShapeError
from diffq.eval.features import EvalInputError, to_tensor_batch, torch_hub_checkpoints_dir

LPIPS_BACKBONES: dict[str, tuple[str, str]] = {
    # LPIPS net name -> (torchvision architecture, torchvision weights enum)
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = to_tensor_batch(a), to_tensor_batch(b)
    if a.shape != b.shape:
        raise ShapeError(f"paired metrics need images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
                         "generate both sets at the same resolution")
    return a, b.to(a.device)


def psnr(a, b, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``Tensor[N]`` (float32; ``inf`` where identical).

    ``PSNR = 10 log10(data_range^2 / MSE)`` with the MSE over all channels and pixels of one image,
    computed in float64 so that near-identical images do not lose precision.
    """
    a, b = _pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def ssim(a, b, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, ``Tensor[N]`` (torchmetrics, Gaussian 11x11 window, sigma 1.5).

    Images smaller than the window are compared with a window shrunk to the image's size (odd).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(a, b)
    k = min(11, *a.shape[-2:])
    k = k if k % 2 else k - 1
    if k < 3:
        raise EvalInputError(f"SSIM needs images of at least 3x3 pixels, got {tuple(a.shape[-2:])}")
    out = structural_similarity_index_measure(a.double(), b.double(), data_range=data_range, kernel_size=k,
                                              sigma=1.5 * k / 11, reduction="none")
    return out.float().reshape(len(a))


def lpips_weight_files(net: str = "alex") -> list[Path]:
    """The files LPIPS(``net``) reads: torchvision's backbone weights and torchmetrics' linear heads."""
    if net not in LPIPS_BACKBONES:
        raise EvalInputError(f"unknown LPIPS net {net!r}; use one of {', '.join(LPIPS_BACKBONES)}")
    import torchmetrics.functional.image.lpips as tm_lpips
    import torchvision

    _, enum = LPIPS_BACKBONES[net]
    url = getattr(torchvision.models, enum).DEFAULT.url
    backbone = torch_hub_checkpoints_dir() / os.path.basename(url)
    head = Path(tm_lpips.__file__).resolve().parent / "lpips_models" / f"{net}.pth"
    return [backbone, head]


def check_lpips_weights(net: str = "alex") -> None:
    """Raise ``MissingWeightsError`` naming each missing LPIPS file and where it belongs."""
    import torchvision

    backbone, head = lpips_weight_files(net)
    missing = []
    if not backbone.is_file():
        arch, enum = LPIPS_BACKBONES[net]
        url = getattr(torchvision.models, enum).DEFAULT.url
        missing.append(f"torchvision {arch} ImageNet weights {backbone.name} (copy {url} to {backbone.parent}/, "
                       "the torch hub cache; set TORCH_HOME to move it)")
    if not head.is_file():
        missing.append(f"torchmetrics LPIPS head {head} (reinstall torchmetrics)")
    if missing:
        raise MissingWeightsError(f"LPIPS({net}) weights are not available offline: " + "; ".join(missing))


@functools.lru_cache(maxsize=6)
def _lpips_net(net: str, hub_dir: str, device: str) -> torch.nn.Module:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).net.to(device).eval()


@torch.no_grad()
def lpips(a, b, net: str = "alex", batch_size: int = 64) -> torch.Tensor:
    """LPIPS distance per image, ``Tensor[N]`` (0 for identical images; lower is closer).

    ``net``: ``"alex"`` (the usual choice), ``"vgg"`` or ``"squeeze"``.  Runs on ``a``'s device.
    Raises ``MissingWeightsError`` when the backbone weights are not in the torch hub cache.
    """
    check_lpips_weights(net)
    a, b = _pair(a, b)
    model = _lpips_net(net, str(torch_hub_checkpoints_dir()), str(a.device))
    outs = []
    for i in range(0, len(a), batch_size):
        outs.append(model(a[i:i + batch_size], b[i:i + batch_size], normalize=True).reshape(-1).float())
    return torch.cat(outs).cpu()


IMAGE_DISTANCES = ("ssim", "mse", "lpips")


class ImageDistance:
    """``distance(images, reference) -> Tensor[N]``, higher = further from the reference: ``1 - SSIM``
    (``"ssim"``), pixel MSE (``"mse"``) or LPIPS (``"lpips"``, needs its weights offline). ``name``
    identifies it (the sensitivity analysis keys its cache on it)."""

    def __init__(self, kind: str) -> None:
        if kind not in IMAGE_DISTANCES:
            raise EvalInputError(f"unknown image distance {kind!r}; use one of {', '.join(IMAGE_DISTANCES)}")
        if kind == "lpips":
            check_lpips_weights()
        self.name = kind

    def __call__(self, images, reference) -> torch.Tensor:
        if self.name == "ssim":
            return 1.0 - ssim(images, reference)
        if self.name == "mse":
            a, b = _pair(images, reference)
            return (a - b).pow(2).flatten(1).mean(1)
        return lpips(images, reference)

    def __repr__(self) -> str:
        return f"image_distance({self.name!r})"


def image_distance(kind: str = "ssim") -> ImageDistance:
    """The per-image distance to a reference that mixed-precision sensitivity calls ``quality``."""
    return ImageDistance(kind)


__all__ = [
    "IMAGE_DISTANCES",
    "LPIPS_BACKBONES",
    "ImageDistance",
    "check_lpips_weights",
    "image_distance",
    "lpips",
    "lpips_weight_files",
    "psnr",
    "ssim",
]
