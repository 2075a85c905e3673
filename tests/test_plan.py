import json

import pytest

from merger.errors import ModelRefError, RecipeError
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import passthrough

from refs import ANY_PATH


def test_splice_counts_duplicated_layers_twice_and_tied_embeddings_once(tiny_llama):
    ref = str(tiny_llama)
    parent = ANY_PATH(ref)
    per_layer = sum(m.numel for m in parent.layer_tensors(0).values())
    embed = parent.tensors["model.embed_tokens.weight"].numel
    norm = parent.tensors["model.norm.weight"].numel
    counts = count(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH))
    assert counts.num_layers == 8
    assert counts.total_params == 8 * per_layer + embed + norm
    assert counts.bytes == counts.total_params * 4
    assert counts.memory_bytes == (6 * per_layer + embed + norm) * 4  # shared layers count once
    assert "lm_head.weight" not in make_plan(passthrough((ref, 0, 6)), ANY_PATH).tensors


def test_plan_renumbers_layers_in_recipe_order(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    plan = make_plan(passthrough((a, 0, 2), (b, 4, 6), (a, 1, 2)), ANY_PATH)
    src = plan.tensors["model.layers.2.self_attn.q_proj.weight"]
    assert (src.model, src.name) == (b, "model.layers.4.self_attn.q_proj.weight")
    assert plan.tensors["model.layers.4.mlp.up_proj.weight"].name == "model.layers.1.mlp.up_proj.weight"
    assert plan.config["num_hidden_layers"] == 5
    assert plan.seams() == [2, 4]


def test_per_layer_config_lists_follow_the_recipe(tiny_gemma):
    ref = str(tiny_gemma)
    parent = ANY_PATH(ref).config["layer_types"]
    plan = make_plan(passthrough((ref, 0, 8), (ref, 4, 12)), ANY_PATH)
    assert plan.config["layer_types"] == parent[0:8] + parent[4:12]
    assert len(plan.config["layer_types"]) == plan.config["num_hidden_layers"] == 16


def test_range_outside_the_model_is_refused_with_its_layer_count(tiny_llama):
    with pytest.raises(RecipeError, match=r"outside .* which has 6 layers \(0 to 5\)"):
        make_plan(passthrough((str(tiny_llama), 2, 9)), ANY_PATH)


def test_unknown_models_are_named(tmp_path):
    with pytest.raises(ModelRefError, match="unknown model 'bundled:nope'"):
        make_plan(passthrough(("bundled:nope", 0, 2)), ANY_PATH)
    with pytest.raises(ModelRefError, match="no such folder"):
        make_plan(passthrough((str(tmp_path / "missing"), 0, 2)), ANY_PATH)
    with pytest.raises(ModelRefError, match="expected bundled:NAME"):
        make_plan(passthrough(("not a model!", 0, 2)), ANY_PATH)


def test_different_architectures_cannot_be_stacked(tiny_llama, tiny_gemma):
    with pytest.raises(RecipeError, match=r"cannot stack .*Gemma3ForCausalLM.*share one architecture"):
        make_plan(passthrough((str(tiny_llama), 0, 2), (str(tiny_gemma), 0, 2)), ANY_PATH)


def test_different_hidden_sizes_cannot_be_stacked(tiny_llama, tmp_path):
    from tiny import make_tiny

    wide = make_tiny(tmp_path / "wide", "llama", layers=2)
    config = json.loads((wide / "config.json").read_text())
    config["hidden_size"] = 128
    (wide / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="hidden size 128"):
        make_plan(passthrough((str(tiny_llama), 0, 2), (str(wide), 0, 2)), ANY_PATH)


def test_bundled_smollm2_splice_has_the_expected_exact_count():
    """The issue's example: SmolLM2-135M [0,20) + [10,30) is 40 layers, 169,915,968 parameters."""
    ref = "bundled:smollm2-135m-instruct"
    counts = count(make_plan(passthrough((ref, 0, 20), (ref, 10, 30)), ANY_PATH))
    assert (counts.num_layers, counts.total_params) == (40, 169_915_968)
    assert counts.parent_params[ref] == 134_515_008


def test_bundled_gemma3_count_matches_the_model():
    counts = count(make_plan(passthrough(("bundled:gemma3-270m", 0, 18)), ANY_PATH))
    assert counts.total_params == 268_098_176
