"""Train digits-dit: a class-conditional ``diffusers.DiTPipeline`` on the digits-sd VAE's latents.

Why class-conditional DiT rather than text-conditioned PixArt: PixArt needs a T5 encoder + T5
tokenizer (a second text model to train and ship) and a much larger transformer block (cross-
attention + caption projection); DiT's ``DiTTransformer2DModel`` (adaLN-zero blocks, the transformer
family diffq quantizes) is the cheapest real diffusers transformer pipeline.  Prompts are mapped to
classes by ``diffq.pipelines.demo_models.digit_class_from_prompt`` and the pipeline's ``id2label``
("0, zero, digit 0, the digit 0, ..."), so ``pipe.get_label_ids(["seven"])`` works too.

Model: hidden 128 (4 heads x 32 -- a multiple of 32 for group-size-32 quantization), 4 blocks,
patch 2 on 8x8x4 latents (16 tokens).  ``num_embeds_ada_norm`` stays 1000 because ``DiTPipeline``
hard-codes class id 1000 as the classifier-free-guidance null class; labels are dropped to 1000 with
probability 0.1 during training.  Same cosine schedule / epsilon prediction / Min-SNR-5 weighting /
EMA / DDIM sampler as digits-sd; 2,000 steps of batch 128.  Every step draws from RNG streams seeded by
(seed, step), so ``--resume`` after an interruption gives bit-identical weights.

Usage (~25 min on 2 busy shared CPU cores; needs pipelines/assets/digits-sd/vae)::

    python -m scripts.train_digits_dit --out pipelines/assets/digits-dit --threads 1 [--resume]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffq.pipelines.digits_data import load_splits, to_model_range
from scripts._train_common import (
    ASSETS,
    RUNS,
    atomic_write_json,
    cosine_lr,
    load_checkpoint,
    portable_weights,
    progress,
    save_checkpoint,
    setup,
)
from scripts.train_digits_sd import EMA, SCHEDULE, min_snr_loss, sampling_scheduler

NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional class id
DIT_CONFIG = {
    "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 4, "out_channels": 4, "num_layers": 4,
    "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000, "norm_num_groups": 32,
}


def id2label() -> dict[int, str]:
    """Comma-separated names DiTPipeline.get_label_ids accepts for each digit class."""
    from pipelines.digits_data import DIGIT_WORDS

    return {k: f"{k}, {w}, digit {k}, digit {w}, the digit {k}, the digit {w}, the number {w}"
            for k, w in enumerate(DIGIT_WORDS)}


def main(argv=None) -> None:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "digits-dit")
    ap.add_argument("--vae", type=Path, default=ASSETS / "digits-sd" / "vae")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0 = plain MSE)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--drop", type=float, default=0.1, help="class dropout probability (for CFG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    ap.add_argument("--ckpt-dir", type=Path, default=RUNS / "ckpt-digits-dit")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--stop-after", type=int, default=None, help="checkpoint and exit at this step (to test resume)")
    args = ap.parse_args(argv)

    gen = setup(args.seed, args.threads)
    train, _ = load_splits()
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True, torch_dtype=torch.float32).eval()
    x = to_model_range(train.images)
    with torch.no_grad():
        dists = [vae.encode(x[i:i + 500]).latent_dist for i in range(0, len(x), 500)]
    mean = torch.cat([d.mean for d in dists]) * vae.config.scaling_factor
    std = torch.cat([d.std for d in dists]) * vae.config.scaling_factor
    labels = torch.as_tensor(train.labels)

    model = DiTTransformer2DModel(**DIT_CONFIG)
    noise_sched = DDPMScheduler(**SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema)
    step = 0
    if args.resume and (args.ckpt_dir / "checkpoint.json").exists():
        step = load_checkpoint(args.ckpt_dir, {"dit": model, "ema": ema.model}, opt)
    alphas = noise_sched.alphas_cumprod
    model.train()
    t0 = time.time()
    bar = progress(range(step, args.steps), initial=step, total=args.steps, desc="dit")
    for step in bar:
        if args.stop_after is not None and step >= args.stop_after:
            save_checkpoint(args.ckpt_dir, {"dit": model, "ema": ema.model}, opt, step)
            print(f"stopped at step {step}; continue with --resume")
            return
        # fresh RNG streams per step: a resumed run draws exactly what an uninterrupted one would
        rng = np.random.default_rng([args.seed, 2, step])
        gen.manual_seed(args.seed * 7919 + step)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, warmup=200)
        idx = torch.as_tensor(rng.choice(len(mean), args.batch, replace=False))
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        y = labels[idx].clone()
        y[torch.as_tensor(rng.random(len(idx)) < args.drop)] = NULL_CLASS
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = min_snr_loss(model(zt, timestep=t, class_labels=y).sample, eps, a.flatten(), args.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_checkpoint(args.ckpt_dir, {"dit": model, "ema": ema.model}, opt, step + 1)
    print(f"dit trained in {time.time() - t0:.0f}s")
    save_checkpoint(args.ckpt_dir, {"dit": model, "ema": ema.model}, opt, args.steps)

    sched = sampling_scheduler()
    pipe = DiTPipeline(transformer=ema.model, vae=vae, scheduler=sched, id2label=id2label())
    pipe.save_pretrained(args.out, safe_serialization=True)
    # DiTPipeline does not record id2label itself; from_pretrained passes it back to __init__ from here
    index = json.loads((args.out / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in id2label().items()}
    atomic_write_json(index, args.out / "model_index.json")
    portable_weights(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
