"""Tiny random-initialised diffusers pipelines, built offline in code, for tests and notebooks.

Why: quantization code must be exercised on the *real* pipeline and denoiser classes of every family
diffq supports (UNet, DiT, MMDiT), but real checkpoints are gigabytes and tests run offline on CPU.
These pipelines have the real classes and the real call paths, with a few thousand to ~150k
parameters per denoiser, random weights (seeded, so two builds with the same ``seed`` are identical)
and tokenizers from :mod:`diffq.pipelines.tiny_tokenizers`.

Linear layers of the denoisers take inputs whose width is a multiple of 32 wherever diffusers allows
it (hidden sizes 32/64, time-embedding widths 32/128/256), so group-size-32 quantization reaches
almost every layer; the exceptions are the patch/latent input layers (4 or 8 latent channels).

Images per family with the defaults (height/width from the denoiser's ``sample_size``, which is also
what :func:`tiny_call_kwargs` asks for); ``output_type="pt"`` gives float32 ``[B, 3, 32, 32]`` in [0, 1],
``output_type="np"`` gives ``[B, 32, 32, 3]``:

======  ==============================  ===========================  ==============  ===============
family  pipeline                        denoiser (attribute)         latents         image
======  ==============================  ===========================  ==============  ===============
sd      StableDiffusionPipeline         UNet2DConditionModel (unet)  [B, 4, 8, 8]    [B, 3, 32, 32]
sdxl    StableDiffusionXLPipeline       UNet2DConditionModel (unet)  [B, 4, 8, 8]    [B, 3, 32, 32]
pixart  PixArtAlphaPipeline             PixArtTransformer2DModel     [B, 4, 8, 8]    [B, 3, 32, 32]
sd3     StableDiffusion3Pipeline        SD3Transformer2DModel        [B, 8, 8, 8]    [B, 3, 32, 32]
flux    FluxPipeline                    FluxTransformer2DModel       [B, 16, 32] (a) [B, 3, 32, 32]
dit     DiTPipeline                     DiTTransformer2DModel        [B, 4, 8, 8]    [B, 3, 32, 32]
======  ==============================  ===========================  ==============  ===============

(a) FLUX packs the [B, 8, 8, 8] latent into 2x2 patches: 16 tokens of 32 channels.  All VAEs are a
3-level ``AutoencoderKL`` with 32 channels per level (scale factor 4).

Things the tiny sizes force (real checkpoints do not need them):

* PixArt: ``use_resolution_binning`` must be False -- the pipeline only knows aspect-ratio bins for
  ``sample_size`` 32/64/128 latents and raises for 8.  :func:`tiny_call_kwargs` passes it; the pipeline
  object is a plain ``PixArtAlphaPipeline``.
* FLUX: ``FluxPipeline.default_sample_size`` is a hard-coded 128 (1024 px); the tiny pipeline sets it to
  8 on the instance so that calls without height/width make 32x32 images.

DiT is class-conditional: ``pipe.labels`` maps :data:`DIT_LABELS` names to ids 0..9 (so
``pipe.get_label_ids(["cat"])`` works), while the class embedding has the 1000 ImageNet rows (+1 null
row) that ``DiTPipeline`` assumes when it uses id 1000 as the unconditional class.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from diffq.errors import UnsupportedModelError
from diffq.pipelines.tiny_tokenizers import (
    CLIP_SPECIAL_IDS,
    T5_SPECIAL_IDS,
    clip_style_tokenizer,
    t5_style_tokenizer,
    vocab_size,
)

TINY_FAMILIES: tuple[str, ...] = ("sd", "sdxl", "pixart", "sd3", "flux", "dit")
SAMPLE_SIZE = 8  # latent height/width
IMAGE_SIZE = 32  # pixels: SAMPLE_SIZE * VAE scale factor 4
DIT_LABELS: dict[int, str] = {
    0: "cat, kitten", 1: "dog, puppy", 2: "bird", 3: "fish", 4: "car",
    5: "house", 6: "tree", 7: "flower", 8: "boat", 9: "mountain",
}


@contextmanager
def _seeded(seed: int, tag: str):
    """Seed torch's CPU RNG for one component without disturbing the caller's RNG state.

    Each component gets its own seed derived from (seed, tag), so its weights do not depend on the
    order in which the other components are built.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(tag.encode()))
        yield


def _ready(module: torch.nn.Module) -> torch.nn.Module:
    # eval(): DiT's label embedding drops classes at random in training mode (class dropout)
    return module.eval()


# ----------------------------------------------------------------------------- shared components


def _vae(seed: int, latent_channels: int = 4, *, scaling: float = 0.18215, shift: float | None = None):
    from diffusers import AutoencoderKL

    with _seeded(seed, f"vae{latent_channels}"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=latent_channels,
            norm_num_groups=32, sample_size=IMAGE_SIZE, scaling_factor=scaling, shift_factor=shift,
            force_upcast=False,
        )
    return _ready(vae)


def _clip_text(seed: int, tag: str, *, hidden: int = 32, projection: int | None = None):
    """CLIPTextModel (projection None) or CLIPTextModelWithProjection with a tokenizer-consistent config."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size("clip"), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=projection or hidden, hidden_act="quick_gelu",
        pad_token_id=CLIP_SPECIAL_IDS["pad"], bos_token_id=CLIP_SPECIAL_IDS["bos"],
        eos_token_id=CLIP_SPECIAL_IDS["eos"],
    )
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    with _seeded(seed, tag):
        return _ready(cls(config))


def _t5(seed: int, *, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size("t5"), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
        num_heads=d_model // 16, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=T5_SPECIAL_IDS["pad"],
        eos_token_id=T5_SPECIAL_IDS["eos"], decoder_start_token_id=T5_SPECIAL_IDS["pad"],
    )
    with _seeded(seed, f"t5-{d_model}"):
        return _ready(T5EncoderModel(config))


def _ddpm_betas() -> dict[str, Any]:
    # SD1.5/SDXL's noise schedule
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ----------------------------------------------------------------------------- families


def _sd(seed: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with _seeded(seed, "sd-unet"):
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=32,
            # SD1.5's layout in miniature: attention on the high-resolution level, a plain deepest level;
            # up blocks concatenate skip inputs, so their resnets get a 1x1 conv_shortcut
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=2,
        )
    scheduler = DDIMScheduler(**_ddpm_betas(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_clip_text(seed, "clip-l"), tokenizer=clip_style_tokenizer(),
        unet=_ready(unet), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    text_projection = 32
    time_embed = 16  # 6 micro-conditioning numbers * 16 + 32 pooled = 128 inputs to add_embedding
    with _seeded(seed, "sdxl-unet"):
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,  # both text encoders' hidden states side by side (32 + 32)
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=1,
            addition_embed_type="text_time", addition_time_embed_dim=time_embed,
            projection_class_embeddings_input_dim=6 * time_embed + text_projection,
        )
    scheduler = EulerDiscreteScheduler(**_ddpm_betas(), timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_vae(seed, scaling=0.13025), text_encoder=_clip_text(seed, "clip-l"),
        text_encoder_2=_clip_text(seed, "clip-g", projection=text_projection),
        tokenizer=clip_style_tokenizer(), tokenizer_2=clip_style_tokenizer(),
        unet=_ready(unet), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def _pixart(seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    with _seeded(seed, "pixart-transformer"):
        transformer = PixArtTransformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, out_channels=8,  # learned sigma
            num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
            caption_channels=32, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        )
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear")
    return PixArtAlphaPipeline(
        tokenizer=t5_style_tokenizer(), text_encoder=_t5(seed), vae=_vae(seed),
        transformer=_ready(transformer), scheduler=scheduler,
    )


def _sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with _seeded(seed, "sd3-transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=8, out_channels=8, num_layers=2,
            num_attention_heads=2, attention_head_dim=32,
            joint_attention_dim=64,  # T5 width; the two CLIPs' 32 + 32 hidden states are padded to it
            caption_projection_dim=64, pooled_projection_dim=64,  # two pooled CLIP projections, 32 + 32
            pos_embed_max_size=16,
        )
    return StableDiffusion3Pipeline(
        transformer=_ready(transformer), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, 8, scaling=1.5305, shift=0.0609),
        text_encoder=_clip_text(seed, "clip-l-proj", projection=32), tokenizer=clip_style_tokenizer(),
        text_encoder_2=_clip_text(seed, "clip-g", projection=32), tokenizer_2=clip_style_tokenizer(),
        text_encoder_3=_t5(seed, d_model=64), tokenizer_3=t5_style_tokenizer(),
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with _seeded(seed, "flux-transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=32,  # 8 latent channels packed 2x2
            num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae(seed, 8, scaling=0.3611, shift=0.1159),
        text_encoder=_clip_text(seed, "clip-l"), tokenizer=clip_style_tokenizer(),
        text_encoder_2=_t5(seed), tokenizer_2=t5_style_tokenizer(), transformer=_ready(transformer),
    )
    pipe.default_sample_size = SAMPLE_SIZE  # hard-coded 128 (1024 px) in FluxPipeline.__init__
    return pipe


def _dit(seed: int):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    with _seeded(seed, "dit-transformer"):
        transformer = DiTTransformer2DModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, out_channels=8,  # learned sigma
            num_layers=2, num_attention_heads=2, attention_head_dim=32, norm_num_groups=32,
            num_embeds_ada_norm=1000,  # DiTPipeline uses class id 1000 as the null class
        )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=_ready(transformer), vae=_vae(seed), scheduler=scheduler,
                       id2label=dict(DIT_LABELS))


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "sd": _sd, "sdxl": _sdxl, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "dit": _dit,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise UnsupportedModelError(
            f"unknown tiny pipeline family {family!r}; valid families are {', '.join(TINY_FAMILIES)}"
        )


def tiny_pipeline(family: str, *, seed: int = 0):
    """A tiny random ``DiffusionPipeline`` of ``family`` (one of :data:`TINY_FAMILIES`), float32 on CPU.

    The same ``seed`` gives bit-identical weights; the global torch RNG is left untouched.
    Progress bars are off.  Unknown families raise ``UnsupportedModelError``.
    """
    _check_family(family)
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # e.g. "safety checker disabled" notices
    try:
        pipe = _BUILDERS[family](int(seed))
    finally:
        dlog.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str) -> dict[str, Any]:
    """``pipe(**tiny_call_kwargs(family), generator=g)``: one 4-step 32x32 image, ``output_type="pt"``.

    The caller adds ``generator`` (e.g. ``torch.Generator("cpu").manual_seed(0)``) so that the result
    is reproducible.  Text families get one prompt; DiT gets ``class_labels=[0]`` ("cat").  Guidance
    is > 1 everywhere so the classifier-free-guidance branch (batch 2 through the denoiser) runs; FLUX
    uses it as its distilled guidance embedding instead.  The returned ``images`` is float32
    ``[1, 3, 32, 32]`` in [0, 1].
    """
    _check_family(family)
    kw: dict[str, Any] = {"num_inference_steps": 4, "output_type": "pt"}
    if family == "dit":
        kw.update(class_labels=[0], guidance_scale=4.0)
        return kw
    kw.update(prompt="a photo of a cat", height=IMAGE_SIZE, width=IMAGE_SIZE)
    kw["guidance_scale"] = {"sd": 7.5, "sdxl": 5.0, "pixart": 4.5, "sd3": 7.0, "flux": 3.5}[family]
    if family == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False)
    return kw
