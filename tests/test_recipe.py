"""Recipes: presets, YAML stacking, overrides, validation; the parser never crashes on junk."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffq.errors import DiffqError, RecipeError
from diffq.formats import QuantSpec
from diffq.pipelines.roles import role_of
from diffq.quantization.presets import PRESETS, get_preset, load_recipe_files, resolve_recipe
from diffq.quantization.recipe import Recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_json(name):
    r = PRESETS[name]
    assert Recipe.from_dict(json.loads(r.to_json())) == r


def test_tuple_overrides_and_removed_fields():
    r = get_preset("w4a8").with_overrides(["skip_roles=()", "skip_patterns=('^conv_in$',)"])
    assert r.skip_roles == () and r.skip_patterns == ("^conv_in$",)
    assert get_preset("w4a8").with_overrides(["skip_roles=[]"]).skip_roles == ()
    # a recipe saved by an older diffq (with the removed ``bos_aware`` field) still loads
    assert Recipe.from_dict(PRESETS["w8a8"].to_dict() | {"bos_aware": True}) == PRESETS["w8a8"]
    with pytest.raises(RecipeError, match="text_encoder=True"):
        Recipe.from_dict(PRESETS["mixed"].to_dict() | {"text_encoder": True})


def test_overrides_and_yaml_stacking(tmp_path):
    r = get_preset("w4a4-svd").with_overrides(["rank=16", "weight.group_size=128", "smooth_alpha=0.6"])
    assert r.rank == 16 and r.weight.group_size == 128 and r.smooth_alpha == 0.6
    a = tmp_path / "a.yaml"
    a.write_text("preset: w4a8\nrank: 8\n")
    b = tmp_path / "b.yaml"
    b.write_text("rank: 4\nskip_roles: [embed, io, cross_attn]\nact: int8:token\n")
    r = load_recipe_files([a, b])
    assert r.rank == 4 and r.weight == get_preset("w4a8").weight and "cross_attn" in r.skip_roles
    assert r.act == QuantSpec("int8", "token")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"rank": -1}, "rank"),
        ({"weight": {"dtype": "int9"}}, "int9"),
        ({"weight": {"dtype": "int4", "granularity": "group", "group_size": 0}}, "group_size"),
        ({"smooth_alpha": 2.0}, "smooth_alpha"),
        ({"skip_roles": ["attention"]}, "unknown roles"),
        ({"act_static": True, "act": None}, "act_static"),
        ({"weight_clip": "best"}, "weight_clip"),
        ({"colour": "blue"}, "unknown recipe fields"),
        ({"skip_patterns": ["(unclosed"]}, "bad layer pattern"),
    ],
)
def test_bad_recipes_rejected_with_clear_message(bad, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(PRESETS["w8a8"].to_dict() | bad)


def test_resolve_and_unknown_preset():
    assert resolve_recipe("w8a8") is PRESETS["w8a8"]
    assert resolve_recipe({"preset": "w4a16", "rank": 4}).rank == 4
    with pytest.raises(RecipeError, match="presets: w8a8"):
        get_preset("int3")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(list(Recipe.__dataclass_fields__) + ["junk"])


@settings(max_examples=300, deadline=None)
@given(d=st.dictionaries(field_names, json_values, max_size=6))
def test_fuzzed_recipe_dicts_raise_only_diffq_errors(d):
    try:
        Recipe.from_dict(PRESETS["w4a8"].to_dict() | d)
    except DiffqError:
        pass


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.text(max_size=30), max_size=4))
def test_fuzzed_overrides_raise_only_diffq_errors(items):
    try:
        PRESETS["w4a8"].with_overrides(items)
    except DiffqError:
        pass


@pytest.mark.parametrize(
    "name, role",
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "attn_qkv"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "cross_attn"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "attn_qkv"),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "attn_out"),
        ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "ffn_up"),
        ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "ffn_down"),
        ("up_blocks.1.resnets.0.conv1", "resblock_conv"),
        ("up_blocks.1.resnets.0.conv_shortcut", "shortcut"),
        ("down_blocks.0.resnets.0.time_emb_proj", "embed"),
        ("down_blocks.0.downsamplers.0.conv", "resample"),
        ("conv_in", "io"),
        ("time_embedding.linear_1", "embed"),
        ("transformer_blocks.3.attn.add_k_proj", "cross_attn"),
        ("transformer_blocks.3.attn.to_add_out", "attn_out"),
        ("transformer_blocks.3.ff_context.net.0.proj", "ffn_up"),
        ("transformer_blocks.3.norm1.linear", "adanorm"),
        ("single_transformer_blocks.2.proj_mlp", "ffn_up"),
        ("single_transformer_blocks.2.proj_out", "ffn_down"),
        ("proj_out", "io"),
        ("pos_embed.proj", "io"),
        ("adaln_single.linear", "embed"),
        ("caption_projection.linear_1", "embed"),
        ("time_text_embed.timestep_embedder.linear_1", "embed"),
        ("context_embedder", "embed"),
    ],
)
def test_role_table(name, role):
    assert role_of(name) == role
