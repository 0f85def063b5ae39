"""The shipped demo models load offline and still do their job (a broken asset fails here).

Numbers checked are small-sample versions of benchmarks/eval_demo_models.py: digits-clip zero-shot
accuracy on 200 held-out digits, and the digit accuracy of 1 generated image per digit for each
demo pipeline (few sampling steps to stay fast on CPU).  The one training test (resume of the DiT
training script is bit-exact) is marked slow and needs mlxtend.
"""

from __future__ import annotations

import pytest
import torch

from diffq.errors import CalibrationError, UnsupportedModelError
from diffq.generation import generate
from diffq.pipelines.demo_models import (
    ASSETS_DIR,
    DEMO_MODELS,
    demo_pipeline,
    digit_class_from_prompt,
    digits_clip,
    heldout_digits,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast as two on an idle machine and several times faster
    when the cores are shared (OpenMP threads then wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip():
    return digits_clip()


@pytest.fixture(scope="module")
def held():
    return heldout_digits()


def test_assets_are_safetensors_and_json_only_and_small():
    files = [p for p in ASSETS_DIR.rglob("*") if p.is_file()]
    assert files
    assert {p.suffix for p in files} <= {".safetensors", ".json"}
    assert sum(p.stat().st_size for p in files) < 25 * 2**20


def test_heldout_split_shapes_and_balance(held):
    assert held.images.shape == (1000, 3, 32, 32) and held.images.dtype == torch.float32
    assert 0.0 <= float(held.images.min()) and float(held.images.max()) <= 1.0
    assert torch.bincount(held.labels, minlength=10).tolist() == [100] * 10
    assert len(held.captions) == 1000


def test_digits_clip_zero_shot_accuracy(clip, held):
    idx = torch.arange(0, 1000, 5)  # 200 images, 20 per digit
    acc = (clip.classify(held.images[idx]) == held.labels[idx]).float().mean().item()
    assert acc >= 0.85, acc


def test_digits_clip_unpacks_and_tokenizer_matches_text_config(clip):
    model, tok = clip
    ids = tok(["the digit 7"], padding="max_length", max_length=tok.model_max_length).input_ids[0]
    assert len(ids) == tok.model_max_length == model.config.text_config.max_position_embeddings
    assert ids.index(model.config.text_config.eos_token_id) == 4  # <bos> the digit 7 <eos>


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_pipeline_draws_the_prompted_digit(name, clip):
    pipe = demo_pipeline(name)
    prompts = [f"the digit {k}" for k in range(10)]
    images = generate(pipe, prompts, range(10), num_inference_steps=10, guidance_scale=5.0)
    assert images.shape == (10, 3, 32, 32)
    acc = (clip.classify(images) == torch.arange(10)).float().mean().item()
    assert acc >= 0.7, acc  # the full measurement (1,000 images, 20 steps) gives > 0.85


def test_unknown_demo_name_lists_valid_names():
    with pytest.raises(UnsupportedModelError, match="digits-sd"):
        demo_pipeline("digits-xl")


@pytest.mark.parametrize(("prompt", "k"), [("the digit 7", 7), ("a thick, slanted handwritten seven", 7),
                                           ("zero", 0), ("a thin 3", 3), ("The Number NINE", 9)])
def test_digit_class_from_prompt(prompt, k):
    assert digit_class_from_prompt(prompt) == k


def test_digit_class_from_prompt_rejects_prompts_without_digit():
    with pytest.raises(CalibrationError, match="names no digit"):
        digit_class_from_prompt("a photo of a cat")


def test_dit_pipeline_maps_digit_names_to_classes():
    pipe = demo_pipeline("digits-dit")
    assert pipe.get_label_ids(["seven", "the digit 3", "0"]) == [7, 3, 0]


def test_generate_is_deterministic_for_a_seed():
    pipe = demo_pipeline("digits-dit")
    a = generate(pipe, ["the digit 1", "two"], [3, 4], num_inference_steps=4)
    b = generate(pipe, ["the digit 1", "two"], [3, 4], num_inference_steps=4)
    c = generate(pipe, ["the digit 1", "two"], [5, 6], num_inference_steps=4)
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() > 0.1


@pytest.mark.slow
def test_dit_training_resumes_bit_exactly(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    from safetensors.torch import load_file

    monkeypatch.setenv("DIFFQ_NO_PROGRESS", "1")
    from scripts import train_digits_dit

    common = ["--steps", "4", "--batch", "8", "--threads", "1"]
    train_digits_dit.main(common + ["--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ca")])
    train_digits_dit.main(common + ["--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "cb"),
                                    "--stop-after", "2"])
    assert not (tmp_path / "b").exists()
    train_digits_dit.main(common + ["--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "cb"), "--resume"])
    a = load_file(str(tmp_path / "ca" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "cb" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("opt.") for k in a)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_timestep_groups_beat_one_static_range_on_demo_models(name):
    """Issue 4's claim on the real models: per-timestep-group activation ranges give a lower expected
    quantization MSE than one static range, at 8 and at 4 bits (benchmarks/calibration.py measures
    the full 32 prompts x 20 steps)."""
    from diffq.calibration import calibrate, grouping_mse

    stats = calibrate(demo_pipeline(name), [f"the digit {k}" for k in range(4)], num_inference_steps=10,
                      progress=False)
    for bits in (8, 4):
        grouped = sum(grouping_mse(stats, n, bits, groups=None) for n in stats.layers)
        static = sum(grouping_mse(stats, n, bits, groups=1) for n in stats.layers)
        assert grouped < 0.97 * static, (bits, grouped, static)
