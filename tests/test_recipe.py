import pytest
import yaml

from merger.errors import RecipeError, UserError
from merger.recipe import passthrough
from merger.recipe.mergekit_yaml import recipe_from_dict, recipe_from_yaml

SOLAR = """\
slices:
- sources:
  - model: upstage/base
    layer_range: [0, 24]
- sources:
  - model: upstage/base
    layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""


def test_mergekit_yaml_round_trips_unchanged():
    recipe = recipe_from_yaml(SOLAR)
    assert recipe.layer_sources[:2] == [("upstage/base", 0), ("upstage/base", 1)]
    assert recipe.num_layers == 48
    assert yaml.safe_load(recipe.to_yaml()) == yaml.safe_load(SOLAR)
    assert recipe_from_yaml(recipe.to_yaml()) == recipe


def test_repeat_is_written_out_as_repeated_slices_that_mergekit_understands():
    recipe = recipe_from_dict({"slices": [{"sources": [{"model": "m/x", "layer_range": [0, 4]}], "repeat": 3}]})
    out = yaml.safe_load(recipe.to_yaml())
    assert [s["sources"][0]["layer_range"] for s in out["slices"]] == [[0, 4]] * 3
    assert recipe.num_layers == 12
    assert recipe_from_yaml(recipe.to_yaml()).compacted() == recipe


def test_preserved_mergekit_keys_survive_a_round_trip():
    text = SOLAR + "parameters:\n  scale: [{filter: o_proj, value: 0.5}]\nchat_template: chatml\n"
    out = yaml.safe_load(recipe_from_yaml(text).to_yaml())
    assert out["parameters"] == {"scale": [{"filter": "o_proj", "value": 0.5}]}
    assert out["chat_template"] == "chatml"


def test_legacy_model_prefix_of_tokenizer_source_names_the_model_and_is_written_plain():
    recipe = recipe_from_yaml(SOLAR + "tokenizer_source: model:org/tokens\n")
    assert recipe.tokenizer_source == "org/tokens" and "org/tokens" in recipe.models
    assert yaml.safe_load(recipe.to_yaml())["tokenizer_source"] == "org/tokens"  # mergekit 0.1.5's form


@pytest.mark.parametrize("mode", ["base", "union"])
def test_vocabulary_modes_are_no_model_references(mode):
    recipe = recipe_from_yaml(SOLAR + f"tokenizer_source: {mode}\n")
    assert recipe.models == ["upstage/base"] and recipe.vocabulary_source == mode
    assert yaml.safe_load(recipe.to_yaml())["tokenizer_source"] == mode


def test_a_tokenizer_mapping_means_its_source_defaulting_to_union_as_in_mergekit():
    assert recipe_from_yaml(SOLAR + "tokenizer: {}\n").vocabulary_source == "union"
    recipe = recipe_from_yaml(SOLAR + "tokenizer: {source: org/tokens}\n")
    assert recipe.vocabulary_source == "org/tokens" and "org/tokens" in recipe.models


def test_embed_slerp_is_accepted_kept_and_noted_as_ignored():
    recipe = recipe_from_yaml(SOLAR + "embed_slerp: true\n")
    assert yaml.safe_load(recipe.to_yaml())["embed_slerp"] is True
    assert recipe.notes == ["`embed_slerp` is kept as written: mergekit 0.1.5 ignores it, and so does this app"]
    assert recipe_from_yaml(SOLAR).notes == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slices: [\n  - sources: [", "malformed YAML at line 2, column"),
        ("slices:\n- sources:\n  - model: a/b\n    layer_range: [4, 4]\n", "is empty"),
        ("slices:\n- sources:\n  - model: a/b\n    layer_range: [8, 2]\n", "is reversed"),
        ("slices: []\n", "has no slices"),
        ("", "the recipe is empty"),
        ("merge_method: passthrough\n", "has no slices"),
        ("slicez: []\n", "unknown key(s) in the recipe: slicez"),
        ("models:\n- model: a/b\n", "needs a blend merge_method"),
        (SOLAR.replace("passthrough", "frankenstein"), "merge_method 'frankenstein' is not supported; use one of"),
        (SOLAR.replace("bfloat16", "int4"), "dtype 'int4' is not one of"),
        ("slices:\n- sources:\n  - model: a/b\n    layer_range: [0, 2]\n    weight: 1\n", "unknown key(s): weight"),
        ("slices:\n- sources:\n  - model: a/b\n    layer_range: 3\n", "two whole numbers"),
        ("slices:\n- sources:\n  - model: a/b\n    layer_range: [0, 2]\n  repeat: 0\n", "`repeat`"),
        (  # mergekit 0.1.5 silently ignores a parameter no method takes; a typo would go unseen
            "slices:\n- sources:\n  - model: a/b\n    layer_range: [0, 2]\n    parameters: {not_a_param: 3}\n",
            "slice 1 source a/b: `not_a_param` is not a parameter of passthrough (it takes scale)",
        ),
        (SOLAR + "parameters:\n  sclae: 0.5\n", "`parameters`: `sclae` is not a parameter of passthrough"),
        (
            "slices:\n- sources:\n  - model: a/b\n    layer_range: [0, 2]\n  parameters: {scale: [{filter: 1}]}\n",
            "slice 1: `scale`: each conditional entry is {filter: NAME, value: V}",
        ),
        (SOLAR + "parameters:\n  scale: lots\n", "`scale` is a number, not 'lots'"),
        (SOLAR + "tokenizer_source: {model: a/b}\n", "`tokenizer_source` names a model, or is base or union"),
        (SOLAR + "tokenizer_source: 'model: '\n", "`tokenizer_source` names no model"),
        (
            SOLAR + "tokenizer_source: base\ntokenizer: {source: union}\n",
            "sets `tokenizer_source` or `tokenizer:`, not both",
        ),
        (
            SOLAR + "tokenizer:\n  source: base\n  tokens: {<pad>: {source: a/b}}\n",
            "`tokenizer: tokens` sets chosen tokens' embeddings or pads the vocabulary",
        ),
    ],
)
def test_bad_recipes_are_refused_in_plain_words(text, message):
    with pytest.raises(RecipeError, match=None) as info:
        recipe_from_yaml(text)
    assert message in str(info.value)


def test_passthrough_shorthand_and_models_order():
    recipe = passthrough(("a/x", 0, 2), ("b/y", 1, 3), ("a/x", 2, 4))
    assert recipe.models == ["a/x", "b/y"]
    assert recipe.primary_model == "a/x"


def test_share_token_round_trips_recipe_and_settings_compactly():
    from merger.recipe.share_links import from_share_token, to_share_token

    recipe = passthrough(("bundled:smollm2-135m-instruct", 0, 20), ("bundled:smollm2-135m-instruct", 10, 30))
    token = to_share_token(recipe, {"temperature": 0.2})
    assert token.startswith("v1.") and len(token) < 400
    assert all(c.isalnum() or c in "-_." for c in token)
    assert from_share_token(token) == (recipe, {"temperature": 0.2})


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda: "v1.!!!", "damaged"),
        (lambda: "v2.abc", "not one this app reads"),
        (lambda: "v1." + "A" * 9000, "9,003 characters, more than the 8,192"),
        (lambda: _token_of(b"\x00" * 5_000_000), "more than the 65,536 bytes"),  # a compression bomb
        (lambda: _token_of(b'{"recipe": {"slices": []}}'), "cannot be used .the recipe has no slices"),
        (lambda: _token_of(b'{"recipe": {"slices": [], "evil": 1}}'), "cannot be used ..evil.: extra inputs"),
    ],
)
def test_damaged_share_tokens_are_refused_in_words(make_token, message):
    from merger.recipe.share_links import from_share_token

    with pytest.raises(UserError, match=message):
        from_share_token(make_token())


def _token_of(raw: bytes) -> str:
    import base64
    import zlib

    return "v1." + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")
