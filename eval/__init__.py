"""Image-quality and text-alignment metrics, prompt sets, generation cache and reports.

Images everywhere in this package are float tensors ``[N, 3, H, W]`` with values in ``[0, 1]``
(see :func:`to_tensor_batch` for converting PIL lists and numpy ``HWC`` arrays).

* paired, against full-precision images of the same prompts/seeds: :func:`psnr`, :func:`ssim`,
  :func:`lpips` -- each returns one value per image, ``Tensor[N]``; :func:`image_distance` wraps one
  as the ``quality`` function of a sensitivity analysis;
* distribution: :func:`fid`, :class:`FidAccumulator`, :func:`fid_from_features`,
  :func:`kid_from_features` over a :class:`FeatureNetwork` (:class:`ClipImageFeatures`,
  :class:`InceptionFeatures`);
* text alignment: :class:`ClipScorer` (transformers CLIPModel or open_clip), :func:`clip_score_digits`;
* :func:`load_prompts` / :func:`prompt_list`, :class:`GenerationCache` / :func:`generate_cached` / :func:`shard_jobs`;
* :func:`image_grid`, :func:`write_report`, :func:`plot_quality_vs_size`.

Heavy dependencies (torchmetrics, transformers, open_clip, scipy, matplotlib) are imported when a
function needs them, so ``import diffq.eval`` stays cheap.
"""

from diffq.eval.cache import GenerationCache, GenerationJob, cache_key, generate_cached, shard_jobs
from diffq.eval.clip_score import (
    ClipScore,
    ClipScorer,
    clip_score,
    clip_score_digits,
    digits_scorer,
    zero_shot_classify,
)
from diffq.eval.features import (
    ClipImageFeatures,
    EvalInputError,
    FeatureNetwork,
    InceptionFeatures,
    inception_weights_path,
    to_tensor_batch,
)
from diffq.eval.fid import (
    FidAccumulator,
    fid,
    fid_from_features,
    fid_from_stats,
    gaussian_stats,
    kid_from_features,
)
from diffq.eval.paired import (
    IMAGE_DISTANCES,
    ImageDistance,
    check_lpips_weights,
    image_distance,
    lpips,
    psnr,
    ssim,
)
from diffq.eval.prompts import BUILTIN_PROMPT_SETS, PromptSetError, load_prompts, prompt_list
from diffq.eval.report import image_grid, plot_quality_vs_size, save_png, write_report

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "IMAGE_DISTANCES",
    "ClipImageFeatures",
    "ClipScore",
    "ClipScorer",
    "EvalInputError",
    "FeatureNetwork",
    "FidAccumulator",
    "GenerationCache",
    "GenerationJob",
    "ImageDistance",
    "InceptionFeatures",
    "PromptSetError",
    "cache_key",
    "check_lpips_weights",
    "clip_score",
    "clip_score_digits",
    "digits_scorer",
    "fid",
    "fid_from_features",
    "fid_from_stats",
    "gaussian_stats",
    "generate_cached",
    "image_distance",
    "image_grid",
    "inception_weights_path",
    "kid_from_features",
    "load_prompts",
    "lpips",
    "plot_quality_vs_size",
    "prompt_list",
    "psnr",
    "save_png",
    "shard_jobs",
    "ssim",
    "to_tensor_batch",
    "write_report",
    "zero_shot_classify",
]
