"""diffq.eval metrics: known values for PSNR/SSIM/FID, offline-only LPIPS/Inception, CLIP score
ordering with a tiny CLIP we fine-tune to agree with two synthetic classes, prompt files."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffq.errors import DiffqError, MissingWeightsError, ShapeError
from diffq.eval import (
    ClipImageFeatures,
    ClipScorer,
    EvalInputError,
    FeatureNetwork,
    FidAccumulator,
    InceptionFeatures,
    PromptSetError,
    fid,
    fid_from_features,
    kid_from_features,
    load_prompts,
    lpips,
    psnr,
    ssim,
    to_tensor_batch,
)
from diffq.eval.features import resize_and_normalize

# ------------------------------------------------------------------------------------ images


def test_to_tensor_batch_accepts_pil_numpy_and_grey():
    arr = np.arange(2 * 5 * 4 * 3, dtype=np.uint8).reshape(2, 5, 4, 3)
    t = to_tensor_batch(arr)
    assert t.shape == (2, 3, 5, 4) and t.dtype == torch.float32
    assert torch.equal(t[1, 2, 3, 1], torch.tensor(arr[1, 3, 1, 2] / 255.0, dtype=torch.float32))
    pil = [Image.fromarray(a) for a in arr]
    assert torch.equal(to_tensor_batch(pil), t)
    assert torch.equal(to_tensor_batch(arr[0]), t[:1])
    grey = torch.rand(3, 1, 6, 6)
    g = to_tensor_batch(grey)
    assert g.shape == (3, 3, 6, 6) and torch.equal(g[:, 2], grey[:, 0])


def test_to_tensor_batch_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(EvalInputError, match=r"\[0, 1\]"):
        to_tensor_batch(torch.rand(2, 3, 4, 4) * 2 - 1)
    with pytest.raises(ShapeError):
        to_tensor_batch(torch.rand(2, 4, 8, 8))
    with pytest.raises(ShapeError):
        to_tensor_batch([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])


# ---------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_of_constant_offset_is_10log10_one_over_c_squared():
    a = torch.full((3, 3, 16, 16), 0.25)
    for c in (0.01, 0.05, 0.2):
        p = psnr(a, a + c)
        assert p.shape == (3,)
        assert torch.allclose(p, torch.full((3,), 10 * math.log10(1 / c**2)), atol=1e-4)


def test_psnr_of_plus_minus_d_pattern_and_identical_images():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 8, 8) * 0.5 + 0.25
    d = 0.1
    sign = torch.where(torch.rand_like(a) > 0.5, 1.0, -1.0)
    assert torch.allclose(psnr(a, a + d * sign), torch.full((2,), 20.0), atol=1e-4)  # MSE = d^2 exactly
    assert torch.isinf(psnr(a, a)).all()
    with pytest.raises(ShapeError):
        psnr(a, a[:, :, :4])


def test_ssim_identical_is_one_and_drops_with_noise():
    torch.manual_seed(0)
    a = torch.rand(4, 3, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(4), atol=1e-6)
    n = torch.randn_like(a)
    s1 = ssim(a, (a + 0.05 * n).clamp(0, 1))
    s2 = ssim(a, (a + 0.3 * n).clamp(0, 1))
    assert s1.shape == (4,)
    assert (s2 < s1).all() and (s1 < 1).all()


# ------------------------------------------------------------------------------------- LPIPS


def test_lpips_without_local_weights_raises_naming_file_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    a = torch.rand(1, 3, 32, 32)
    with pytest.raises(MissingWeightsError) as e:
        lpips(a, a)
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        lpips(a, a, net="vgg")


def test_lpips_with_backbone_file_in_hub_cache(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    # A randomly initialised SqueezeNet stands in for the ImageNet file (same names, no download).
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), ckpt / "squeezenet1_1-b8a52dc0.pth")
    torch.manual_seed(0)
    a = torch.rand(3, 3, 64, 64)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    same = lpips(a, a, net="squeeze")
    diff = lpips(a, b, net="squeeze")
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert (diff > 1e-4).all()


def test_missing_weights_fail_fast_without_touching_the_network(tmp_path, monkeypatch):
    """Offline and without weight files, every metric stops at a MissingWeightsError -- no hub retries."""
    import socket

    attempts = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: no_network(None, *a))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = torch.rand(1, 3, 32, 32)
    errors = []
    for call in (lambda: lpips(a, a), lambda: lpips(a, a, net="vgg"), InceptionFeatures,
                 lambda: ClipScorer.from_open_clip("ViT-L-14", "openai"),
                 lambda: ClipScorer.from_pretrained(tmp_path / "no-clip-here")):
        with pytest.raises(MissingWeightsError) as e:
            call()
        errors.append(str(e.value))
    assert attempts == []
    for msg in errors:  # each names the missing thing and where to put / how to pass it
        assert len(msg) > 40 and ("pass" in msg or str(tmp_path) in msg), msg


# --------------------------------------------------------------------------------------- FID


class PooledPixels:
    """A transparent feature network: 4x4 average-pooled RGB -> 48 features."""

    num_features = 48

    def __call__(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(to_tensor_batch(images), 4).flatten(1).double()


def test_fid_of_mean_shift_is_squared_distance_and_self_is_zero():
    torch.manual_seed(0)
    f = torch.randn(400, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    scale = float(torch.cov(f.T).trace()) * 2  # tr(S_r + S_f): the size of the trace term
    assert fid_from_features(f, f) < 1e-6 * scale
    for s in (0.5, 2.0):
        # identical covariances: FID = ||mu_r - mu_f||^2 = D s^2
        assert fid_from_features(f, f + s) == pytest.approx(16 * s**2, rel=1e-6)


def test_fid_accumulator_streaming_equals_one_shot():
    torch.manual_seed(1)
    r = torch.randn(103, 8, dtype=torch.float64)
    g = torch.randn(77, 8, dtype=torch.float64) * 1.3 + 0.2
    acc = FidAccumulator()
    for i in range(0, len(r), 7):
        acc.update_real_features(r[i:i + 7])
    for i in range(0, len(g), 11):
        acc.update_fake_features(g[i:i + 11])
    assert acc.num_real == 103 and acc.num_fake == 77
    assert acc.compute() == pytest.approx(fid_from_features(r, g), rel=1e-9)
    acc.reset_fake()
    with pytest.raises(EvalInputError, match="at least 2 fake"):
        acc.compute()


def test_fid_on_images_orders_by_how_different_the_sets_are():
    torch.manual_seed(2)
    real = torch.rand(300, 3, 16, 16)
    fake = torch.rand(300, 3, 16, 16)  # same distribution, other samples
    far = (real * 0.5 + 0.5)           # brighter, lower contrast
    feats = PooledPixels()
    assert isinstance(feats, FeatureNetwork)
    self_fid = fid(real, real, features=feats, batch_size=64)
    near, off = fid(real, fake, features=feats), fid(real, far, features=feats)
    assert self_fid < 1e-6 * float(torch.cov(feats(real).T).trace())
    assert 0 < near < off


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another():
    torch.manual_seed(3)
    a, b = torch.randn(200, 8, dtype=torch.float64), torch.randn(200, 8, dtype=torch.float64)
    same, _ = kid_from_features(a, b, subsets=20, subset_size=100)
    shifted, _ = kid_from_features(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 < shifted


def test_inception_features_without_weights_raise_with_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as e:
        InceptionFeatures()
    assert "weights-inception-2015-12-05-6726825d.pth" in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)


# ------------------------------------------------------------------------------- CLIP (tiny)

WORDS = ["light", "on", "the", "left", "right", "a", "photo", "of", "dark", "square"]
CAPTIONS = ("light on the left", "light on the right")


def _tokenizer(with_pad: bool = True):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    kw = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=8, **kw)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"vocab_size": 4 + len(WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # CLIP's 0.02-std position embeddings barely tell left from right in 1 layer
        model.vision_model.embeddings.position_embedding.weight.normal_(0, 1)
    return model


def _sided_images(n: int, side: int, seed: int) -> torch.Tensor:
    """32x32 images, bright on the left (side=0) or right (side=1) half, with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    if side == 0:
        x[..., :16] += 0.6
    else:
        x[..., 16:] += 0.6
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def trained_clip():
    return _train_tiny_clip()


def _train_tiny_clip(steps: int = 30) -> ClipScorer:
    """Tiny CLIP fine-tuned for 30 steps so that CAPTIONS[k] describes _sided_images(side=k)."""
    model, tok = _tiny_clip(), _tokenizer()
    scorer = ClipScorer(model, tok, mean=(0.5,) * 3, std=(0.5,) * 3)
    enc = tok(list(CAPTIONS), padding=True, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        imgs = torch.cat([_sided_images(8, 0, step), _sided_images(8, 1, 1000 + step)])
        labels = torch.tensor([0] * 8 + [1] * 8)
        px = resize_and_normalize(imgs, 16, scorer.mean, scorer.std)
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(
            model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output, dim=-1)
        loss = torch.nn.functional.cross_entropy(10 * img @ txt.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return scorer


def test_clip_embeddings_match_manual_projection():
    model, tok = _tiny_clip(), _tokenizer()
    scorer = ClipScorer(model, tok)
    imgs = torch.rand(3, 3, 32, 32)
    px = resize_and_normalize(imgs, 16, scorer.mean, scorer.std)
    with torch.no_grad():
        ref = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        enc = tok(["light on the left", "a dark square"], padding=True, return_tensors="pt")
        tref = model.text_projection(model.text_model(**enc).pooler_output)
    assert torch.allclose(scorer.image_embeds(imgs), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    assert torch.allclose(scorer.text_embeds(["light on the left", "a dark square"]),
                          torch.nn.functional.normalize(tref, dim=-1), atol=1e-5)
    # a tokenizer without a pad token gives the same text embeddings (manual right-padding)
    bare = ClipScorer(model, _tokenizer(with_pad=False))
    assert torch.allclose(bare.text_embeds(["light on the left", "a dark square"]),
                          scorer.text_embeds(["light on the left", "a dark square"]), atol=1e-5)


def test_clip_scorer_handles_tensor_and_unprojected_returns():
    model, tok = _tiny_clip(), _tokenizer()
    ref = ClipScorer(model, tok)
    imgs = torch.rand(2, 3, 16, 16)

    class TensorReturn(torch.nn.Module):  # transformers 4.x style: projected tensors
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, pixel_values):
            return self.m.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask=None):
            return self.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    class Unprojected(TensorReturn):  # pooled output without projection: the scorer must project
        def __init__(self, m):
            super().__init__(m)
            self.visual_projection, self.text_projection = m.visual_projection, m.text_projection

        def get_image_features(self, pixel_values):
            return self.m.vision_model(pixel_values=pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return self.m.text_model(input_ids=input_ids, attention_mask=attention_mask)

    for wrapper in (TensorReturn, Unprojected):
        s = ClipScorer(wrapper(model), tok)
        assert torch.allclose(s.image_embeds(imgs), ref.image_embeds(imgs), atol=1e-5)
        assert torch.allclose(s.text_embeds(list(CAPTIONS)), ref.text_embeds(list(CAPTIONS)), atol=1e-5)


def test_clip_score_prefers_matching_captions(trained_clip):
    left, right = _sided_images(10, 0, 777), _sided_images(10, 1, 778)
    imgs = torch.cat([left, right])
    match = [CAPTIONS[0]] * 10 + [CAPTIONS[1]] * 10
    swap = [CAPTIONS[1]] * 10 + [CAPTIONS[0]] * 10
    good, bad = trained_clip.score(imgs, match), trained_clip.score(imgs, swap)
    assert good.per_image.shape == (20,)
    assert ((0 <= good.per_image) & (good.per_image <= 100)).all()
    assert (good.per_image > bad.per_image).all()
    assert good.mean == pytest.approx(float(good.per_image.mean()))
    assert good.mean > bad.mean + 10
    pred = trained_clip.zero_shot_classify(imgs, list(CAPTIONS))
    assert pred.dtype == torch.int64 and pred.tolist() == [0] * 10 + [1] * 10
    # prompt ensembles per class work too
    assert trained_clip.zero_shot_classify(imgs, [[CAPTIONS[0], "light on the left square"],
                                                  [CAPTIONS[1]]]).tolist() == pred.tolist()
    with pytest.raises(EvalInputError, match="one prompt per image"):
        trained_clip.per_image(imgs, match[:3])


def test_clip_image_features_for_fid(trained_clip):
    feats = ClipImageFeatures(trained_clip.model, mean=(0.5,) * 3, std=(0.5,) * 3)
    left, right = _sided_images(40, 0, 5), _sided_images(40, 1, 6)
    f = feats(left)
    assert f.shape == (40, feats.num_features) == (40, 32) and f.dtype == torch.float64
    left2 = _sided_images(40, 0, 7)
    assert fid(left, left, features=feats) < 1e-6 * float(torch.cov(f.T).trace())
    assert fid(left, left2, features=feats) < fid(left, right, features=feats)
    proj = ClipImageFeatures(trained_clip.model, mean=(0.5,) * 3, std=(0.5,) * 3, projected=True)
    assert proj(left).shape == (40, 16) and proj.num_features == 16


def test_open_clip_from_local_file_only(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    name = "diffq-test-tiny-clip"
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    scorer = ClipScorer.from_open_clip(name, weights)
    imgs = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval().encode_image(resize_and_normalize(imgs, 16, scorer.mean, scorer.std), normalize=True)
    assert torch.allclose(scorer.image_embeds(imgs), ref, atol=1e-5)
    s = scorer.score(imgs, ["a photo", "a dog"])
    assert s.per_image.shape == (2,) and 0 <= s.mean <= 100
    with pytest.raises(MissingWeightsError, match="local file"):
        ClipScorer.from_open_clip(name, tmp_path / "absent.safetensors")
    with pytest.raises(MissingWeightsError):
        ClipScorer.from_open_clip("ViT-B-32", "openai")  # a tag would download: refused


def test_clip_scorer_rejects_non_clip_model():
    with pytest.raises(DiffqError, match="not a CLIP model"):
        ClipScorer(torch.nn.Linear(2, 2), None)


def test_digits_clip_asset_if_present():
    demo = pytest.importorskip("diffq.pipelines.demo_models")
    try:
        clip, held = demo.digits_clip(), demo.heldout_digits()
    except MissingWeightsError:
        pytest.skip("digits-clip asset not built")
    from diffq.eval import clip_score_digits, digits_scorer

    idx = torch.arange(0, len(held), 5)
    imgs, labels = held.images[idx], held.labels[idx]
    pred = digits_scorer(clip).zero_shot_classify(imgs, [f"the digit {k}" for k in range(10)])
    assert (pred == labels).float().mean() >= 0.8
    caps = [held.captions[i] for i in idx.tolist()]
    wrong = [f"the digit {(int(k) + 5) % 10}" for k in labels]
    assert clip_score_digits(clip, imgs, caps).mean() > clip_score_digits(clip, imgs, wrong).mean()


# ----------------------------------------------------------------------------------- prompts


def test_load_prompts_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("# header\nthe digit 7\n\n  a thin one  \n# the digit 3\n")
    assert load_prompts(tmp_path / "p.txt") == ["the digit 7", "a thin one"]
    (tmp_path / "p.csv").write_text('id,prompt,note\n1,"a thick, slanted seven",x\n2,the digit 1,\n3,,empty\n')
    assert load_prompts(str(tmp_path / "p.csv")) == ["a thick, slanted seven", "the digit 1"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "the digit 2", "seed": 3}\n\n{"prompt": "a \\"quoted\\" four"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["the digit 2", 'a "quoted" four']


def test_load_prompts_errors(tmp_path):
    for name, text in (("e.txt", "# only a comment\n\n"), ("e.csv", "prompt\n"), ("e.jsonl", "\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(PromptSetError, match="holds no prompts"):
            load_prompts(tmp_path / name)
    assert issubclass(PromptSetError, DiffqError)
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(PromptSetError, match="'prompt' column"):
        load_prompts(tmp_path / "c.csv")
    (tmp_path / "b.jsonl").write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(PromptSetError, match=r"b.jsonl:2"):
        load_prompts(tmp_path / "b.jsonl")
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(PromptSetError, match="unknown prompt file type"):
        load_prompts(tmp_path / "p.yaml")
    with pytest.raises(PromptSetError, match="built-in"):
        load_prompts("no-such-set")


def test_builtin_digits_prompts_cover_digits_in_vocabulary():
    from diffq.pipelines.digits_data import DIGIT_WORDS, vocabulary

    prompts = load_prompts("digits")
    assert 30 <= len(prompts) <= 50 and len(set(prompts)) == len(prompts)
    vocab = set(vocabulary())
    word_to_digit = {w: k for k, w in enumerate(DIGIT_WORDS)} | {str(k): k for k in range(10)}
    for i, p in enumerate(prompts):
        tokens = re.findall(r"\w+|[^\w\s]", p)
        assert set(tokens) <= vocab, p
        assert [word_to_digit[t] for t in tokens if t in word_to_digit] == [i % 10], p
