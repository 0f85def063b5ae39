"""Train digits-sd: a real ``diffusers.StableDiffusionPipeline`` for 32x32 handwritten digits.

Two stages, each seeded and resumable (``--resume``):

1. ``vae``: an ``AutoencoderKL`` 32x32x3 -> 8x8x4 (block_out_channels (16, 32, 64): two 2x
   downsamples; narrow because 32x32 convolutions dominate CPU time), trained with MSE + a small KL term.  ``scaling_factor`` is set to 1/std of the
   training latents so the diffusion model sees unit-variance latents, as in SD.
2. ``unet``: a ``UNet2DConditionModel`` (channels (32, 64), 1.1M parameters -- multiples of 32, so group-size-32
   quantization applies to every linear/conv -- cross-attention on the 128-wide hidden states of the
   *frozen* digits-clip text tower).  Epsilon prediction, cosine noise schedule, Min-SNR-5 loss
   weighting, 10% caption dropout to "" so classifier-free guidance works, EMA weights shipped.
   3,000 steps of batch 64.

The pipeline is saved with ``save_pretrained`` (safetensors + json only): text_encoder is digits-clip's
``CLIPTextModel``, tokenizer its word-level ``PreTrainedTokenizerFast``, the scheduler
``DDIMScheduler`` (see :func:`sampling_scheduler`), ``safety_checker=None``.

Usage (VAE ~4 min, UNet ~13 min on 2 busy shared CPU cores with ``--threads 1``; needs
pipelines/assets/digits-clip).  The shipped UNet was trained with the second command::

    python -m scripts.train_digits_sd --stage all --out pipelines/assets/digits-sd [--resume]
    python -m scripts.train_digits_sd --stage unet --out pipelines/assets/digits-sd --threads 1

``--threads 1`` is faster whenever other jobs share the cores (OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffq.pipelines.digits_data import caption_variants, load_splits, to_model_range
from scripts._train_common import (
    ASSETS,
    RUNS,
    cosine_lr,
    load_checkpoint,
    portable_weights,
    progress,
    save_checkpoint,
    setup,
)

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 32, "layers_per_block": 1,
    "block_out_channels": (16, 32, 64), "norm_num_groups": 16,
    "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
}
UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 128, "attention_head_dim": 2, "norm_num_groups": 32,
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


class EMA:
    """Exponential moving average of a module's float tensors (the weights that get shipped)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


def train_vae(args, x_train: torch.Tensor, gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = args.ckpt_dir / "vae"
    step = load_checkpoint(ckpt, {"vae": vae}, opt) if args.resume and (ckpt / "checkpoint.json").exists() else 0
    rng = np.random.default_rng([args.seed, step])
    vae.train()
    t0 = time.time()
    bar = progress(range(step, args.vae_steps), initial=step, total=args.vae_steps, desc="vae")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr)
        x = x_train[rng.choice(len(x_train), args.vae_batch, replace=False)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / 256.0  # per latent element
        loss = mse + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.vae_steps:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1)
    print(f"vae trained in {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        mu = torch.cat([vae.encode(x_train[i:i + 500]).latent_dist.mean for i in range(0, len(x_train), 500)])
    vae.register_to_config(scaling_factor=float(1.0 / mu.std()))
    save_checkpoint(ckpt, {"vae": vae}, opt, args.vae_steps)
    return vae


def min_snr_loss(pred: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Epsilon MSE weighted per sample by ``min(SNR, gamma) / SNR`` (Min-SNR-gamma weighting).

    Why: near-clean timesteps (huge SNR) only polish pixels, yet with plain MSE they take as much of the
    gradient as the noisy ones where the *digit* is decided; capping their weight makes the prompt take
    hold in far fewer CPU steps.  ``pred``/``eps``: ``[B, C, H, W]``; ``alpha_bar``: ``[B]``.
    ``gamma <= 0`` gives the plain MSE.
    """
    per = (pred - eps).pow(2).flatten(1).mean(1)
    if gamma <= 0:
        return per.mean()
    snr = alpha_bar / (1 - alpha_bar).clamp_min(1e-8)
    return (per * snr.clamp(max=gamma) / snr.clamp_min(1e-8)).mean()


@torch.no_grad()
def text_embedding_table(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """``[len(captions), L, D]`` last hidden states exactly as StableDiffusionPipeline computes them."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(args, vae, train, gen: torch.Generator):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    text_encoder = CLIPTextModel.from_pretrained(args.clip, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.clip, local_files_only=True)
    variants = [caption_variants(int(k), t, s) for k, t, s in zip(train.labels, train.thickness, train.slant)]
    vocab = sorted({c for v in variants for c in v} | {""})
    cap_id = {c: i for i, c in enumerate(vocab)}
    table = text_embedding_table(text_encoder, tokenizer, vocab)  # [C, 16, 128]
    var_ids = [[cap_id[c] for c in v] for v in variants]
    x = to_model_range(train.images)
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 500]).latent_dist for i in range(0, len(x), 500)]
    mean = torch.cat([d.mean for d in dists]) * vae.config.scaling_factor
    std = torch.cat([d.std for d in dists]) * vae.config.scaling_factor

    unet = UNet2DConditionModel(**UNET_CONFIG)
    noise_sched = DDPMScheduler(**SCHEDULE)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(unet, args.ema)
    ckpt = args.ckpt_dir / "unet"
    step = 0
    if args.resume and (ckpt / "checkpoint.json").exists():
        step = load_checkpoint(ckpt, {"unet": unet, "ema": ema.model}, opt)
    rng = np.random.default_rng([args.seed, 1, step])
    gen.manual_seed(args.seed * 7919 + step)
    alphas = noise_sched.alphas_cumprod
    unet.train()
    t0 = time.time()
    bar = progress(range(step, args.steps), initial=step, total=args.steps, desc="unet")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, warmup=200)
        idx = rng.choice(len(mean), args.batch, replace=False)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        cids = [var_ids[i][rng.integers(len(var_ids[i]))] if rng.random() >= args.drop else cap_id[""]
                for i in idx]
        cond = table[cids]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, eps, a.flatten(), args.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_checkpoint(ckpt, {"unet": unet, "ema": ema.model}, opt, step + 1)
    print(f"unet trained in {time.time() - t0:.0f}s")
    save_checkpoint(ckpt, {"unet": unet, "ema": ema.model}, opt, args.steps)
    return ema.model, text_encoder, tokenizer


def sampling_scheduler():
    """The scheduler both demo pipelines ship with: DDIM on the training (cosine) schedule.

    Why not DPM-Solver++: with ``squaredcos_cap_v2`` the last training step has alpha_bar ~ 2e-9, and
    DPM-Solver's data-prediction first step divides by sqrt(alpha_bar) -- at 20 steps digits-sd then
    draws noise (~15% digit accuracy vs ~88% with DDIM).  DDIM steps in epsilon space and is stable.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    sched = sampling_scheduler()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    portable_weights(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "digits-sd")
    ap.add_argument("--clip", type=Path, default=ASSETS / "digits-clip")
    ap.add_argument("--stage", choices=("vae", "unet", "all"), default="all")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0 = plain MSE)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout probability (for CFG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --ckpt-dir")
    ap.add_argument("--ckpt-dir", type=Path, default=RUNS / "ckpt-digits-sd")
    ap.add_argument("--ckpt-every", type=int, default=250)
    args = ap.parse_args(argv)

    gen = setup(args.seed, args.threads)
    train, _ = load_splits()
    if args.stage in ("vae", "all"):
        vae = train_vae(args, to_model_range(train.images), gen)
        vae.save_pretrained(args.out / "vae", safe_serialization=True)
        portable_weights(args.out / "vae")
        if args.stage == "vae":
            return
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.out / "vae", local_files_only=True, torch_dtype=torch.float32).eval()
    unet, text_encoder, tokenizer = train_unet(args, vae, train, gen)
    save_pipeline(args.out, vae, unet, text_encoder, tokenizer)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
