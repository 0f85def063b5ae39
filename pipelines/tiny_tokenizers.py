"""Tokenizers built in code for the tiny test pipelines: no hub, no files, no network.

Why: a real CLIP or T5 tokenizer is a download, and tests run with ``HF_HUB_OFFLINE=1``.  The tiny
pipelines only need *some* deterministic text -> ids map whose special tokens agree with the random
text encoders behind them, so that CLIP's pooled output (read at the first EOS) and T5's padding work
as they do in the real models.

Both tokenizers are WordPiece over a small built-in vocabulary: a list of common prompt words, every
lower-case letter/digit/punctuation mark on its own, and the same letters/digits as ``##`` word
continuations.  So every ASCII word encodes without ``<unk>`` (unknown words fall back to letters), and
different prompts give different ids.  Text is NFKC-normalised and lower-cased.

* :func:`clip_style_tokenizer` -- ``<|startoftext|> ... <|endoftext|>``, padded with ``<pad>``,
  ``model_max_length=77`` (what SD/SDXL/SD3/FLUX pad CLIP prompts to).
* :func:`t5_style_tokenizer` -- ``... </s>`` (no BOS, as in T5), ``<pad>`` is id 0 (T5's decoder start),
  ``model_max_length=512`` (FLUX pads T5 prompts to 512 by default, SD3 to 256, PixArt to 120).

Both return a ``transformers.PreTrainedTokenizerFast``; :data:`CLIP_SPECIAL_IDS` and
:data:`T5_SPECIAL_IDS` hold the ids a text-encoder config must use.
"""

from __future__ import annotations

import string

# Common prompt words. Order is part of the vocabulary: changing it changes every token id.
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "for", "to", "from", "under", "over",
    "photo", "picture", "painting", "drawing", "sketch", "render", "portrait", "landscape", "closeup",
    "cat", "dog", "bird", "horse", "fish", "cow", "fox", "owl", "lion", "tiger", "bear", "rabbit",
    "car", "bus", "train", "boat", "ship", "plane", "bicycle", "truck", "rocket",
    "house", "castle", "city", "street", "bridge", "tower", "room", "kitchen", "garden", "forest",
    "mountain", "mountains", "river", "lake", "sea", "ocean", "beach", "desert", "sky", "field", "snow",
    "tree", "trees", "flower", "flowers", "apple", "cup", "coffee", "table", "chair", "book", "clock",
    "man", "woman", "child", "person", "people", "robot", "astronaut", "wizard", "knight",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "golden",
    "big", "small", "old", "young", "happy", "cute", "dark", "bright", "sunny", "rainy", "foggy",
    "beautiful", "detailed", "realistic", "cinematic", "high", "quality", "resolution", "style",
    "oil", "watercolor", "digital", "art", "sunset", "sunrise", "night", "day", "light", "shadow",
    "sitting", "standing", "running", "flying", "swimming", "reading", "wearing", "hat", "glasses",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "digit", "number",
)
_CHARS: tuple[str, ...] = tuple(string.ascii_lowercase + string.digits + string.punctuation)
_CONTINUATIONS: tuple[str, ...] = tuple("##" + c for c in string.ascii_lowercase + string.digits)

CLIP_SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")
T5_SPECIALS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
# eos is not id 2 on purpose: transformers' CLIP treats eos_token_id == 2 as a legacy config and pools
# at argmax(input_ids) instead of at the first EOS.
CLIP_SPECIAL_IDS: dict[str, int] = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
T5_SPECIAL_IDS: dict[str, int] = {"pad": 0, "eos": 1, "unk": 2}


def _vocab(specials: tuple[str, ...]) -> dict[str, int]:
    tokens: list[str] = []
    for tok in (*specials, *PROMPT_WORDS, *_CHARS, *_CONTINUATIONS):
        if tok not in tokens:
            tokens.append(tok)
    return {tok: i for i, tok in enumerate(tokens)}


def _backend(specials: tuple[str, ...], unk: str, single: str, pair: str, template_tokens: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = _vocab(specials)
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token=unk, continuing_subword_prefix="##",
                              max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + punctuation split
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in template_tokens]
    )
    tok.add_special_tokens(list(specials))
    return tok


def vocab_size(kind: str = "clip") -> int:
    """Number of ids the ``kind`` ("clip" or "t5") tokenizer can emit: the text encoder's ``vocab_size``."""
    return len(_vocab(CLIP_SPECIALS if kind == "clip" else T5_SPECIALS))


def clip_style_tokenizer(model_max_length: int = 77):
    """CLIP-like tokenizer: ids ``[bos, words..., eos, pad...]``; special ids in :data:`CLIP_SPECIAL_IDS`."""
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = CLIP_SPECIALS
    backend = _backend(CLIP_SPECIALS, unk, f"{bos} $A {eos}", f"{bos} $A {eos} $B {eos}", (bos, eos))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=model_max_length, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def t5_style_tokenizer(model_max_length: int = 512):
    """T5-like tokenizer: ids ``[words..., eos, pad...]``; special ids in :data:`T5_SPECIAL_IDS`."""
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = T5_SPECIALS
    backend = _backend(T5_SPECIALS, unk, f"$A {eos}", f"$A {eos} $B {eos}", (eos,))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=model_max_length, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
