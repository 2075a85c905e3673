"""Blends end to end: methods' definitions (DARE's seeded masks, TIES's k), the recipe forms and
their YAML, parameter precedence and gradients as the plan resolves them, every bad blend's
message, and a recipe mixing blended and passed-through slices that builds, chats and exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merger.errors import RecipeError
from merger.methods.functions import linear, magnitude_prune, random_prune, slerp
from merger.plan import Blend, TensorSource, make_plan
from merger.plan.counts import count
from merger.recipe import Recipe
from merger.recipe.mergekit_yaml import recipe_from_dict, recipe_from_yaml
from merger.recipe.share_links import from_share_token, to_share_token

from refs import ANY_PATH


def src(model, start, end, **parameters) -> dict:
    return {"model": str(model), "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


def blended_slice(*sources, **parameters) -> dict:
    return {"sources": list(sources), **({"parameters": parameters} if parameters else {})}


# --- methods -------------------------------------------------------------------------------------


def test_dare_mask_is_reproduced_by_its_seed_and_differs_for_another():
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    first = random_prune(delta, 0.3, seed=7)
    assert torch.equal(first, random_prune(delta, 0.3, seed=7))
    assert not torch.equal(first, random_prune(delta, 0.3, seed=8))


def test_dare_keeps_the_density_fraction_and_rescales_to_the_deltas_l1_norm():
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    density = 0.3
    pruned = random_prune(delta, density, seed=7)
    kept = pruned != 0
    # each entry kept with probability 0.3: over 100,000 entries the fraction is within 0.005 (3.4 sigma)
    assert abs(kept.float().mean().item() - density) < 0.005
    # kept entries are the delta's, scaled by one factor: |delta|_1 / |kept part|_1 (mergekit's `rescale`)
    factor = delta.abs().sum() / (delta * kept).abs().sum()
    torch.testing.assert_close(pruned[kept], delta[kept] * factor)
    assert abs(factor.item() - 1 / density) < 0.1  # which is DARE's 1/density, in expectation
    unscaled = random_prune(delta, density, seed=7, rescale=False)
    assert torch.equal(unscaled[kept], delta[kept]) and torch.equal(unscaled != 0, kept)


def test_ties_keeps_the_k_largest_magnitudes_with_k_at_least_one():
    delta = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.2])
    assert torch.equal(magnitude_prune(delta, 0.4), torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0]))  # k = int(2.0)
    assert torch.count_nonzero(magnitude_prune(delta, 0.01)) == 1  # k = max(1, 0)


def test_linear_and_slerp_endpoints():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(linear([a, b], [3.0, 1.0]), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(linear([a, b], [3.0, 1.0], normalize=False), 3 * a + b)
    torch.testing.assert_close(slerp(0.0, a, b), a)
    torch.testing.assert_close(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)  # on the arc: its norm lies between the ends' (a chord midpoint's is shorter)
    assert mid.norm() > (0.5 * a + 0.5 * b).norm()


# --- recipe forms --------------------------------------------------------------------------------

BLENDED_YAML = """\
slices:
- sources:
  - model: org/base
    layer_range: [0, 4]
  - model: org/tuned
    layer_range: [0, 4]
    parameters:
      weight: 0.3
  parameters:
    density: [0.2, 0.8]
- sources:
  - model: org/base
    layer_range: [4, 8]
merge_method: ties
base_model: org/base
parameters:
  weight: 1.0
  normalize: false
dtype: bfloat16
"""

WHOLE_MODEL_YAML = """\
models:
- model: org/a
  parameters:
    t: 0.2
- model: org/b
merge_method: slerp
base_model: org/a
parameters:
  t:
  - filter: self_attn
    value: [0, 0.5, 0.3, 0.7, 1]
  - value: 0.5
"""


@pytest.mark.parametrize("text", [BLENDED_YAML, WHOLE_MODEL_YAML])
def test_blended_and_whole_model_recipes_round_trip_through_yaml_and_share_links(text):
    recipe = recipe_from_yaml(text)
    assert yaml.safe_load(recipe.to_yaml()) == yaml.safe_load(text)
    assert recipe_from_yaml(recipe.to_yaml()) == recipe
    assert from_share_token(to_share_token(recipe))[0] == recipe


def test_share_links_made_before_blends_still_open():
    old = {"slices": [{"source": {"model": "a/b", "start": 0, "end": 2}, "repeat": 2}], "merge_method": "passthrough"}
    recipe = Recipe.model_validate(old)
    assert recipe.slices[0].sources[0].model == "a/b" and recipe.num_layers == 4


DENSITY_TO_0 = {"density": [0.5, 0]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2))], "merge_method": "ties"},
            "merge_method ties needs `base_model:`",
        ),
        (
            {"models": [{"model": "a/x"}, {"model": "b/y"}], "merge_method": "task_arithmetic"},
            "merge_method task_arithmetic needs `base_model:`",
        ),
        (
            {
                "slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2, density=1.5))],
                "merge_method": "ties",
                "base_model": "a/x",
            },
            "`density` is 1.5, outside (0, 1]",
        ),
        (
            {
                "models": [{"model": "a/x"}],
                "merge_method": "dare_ties",
                "base_model": "a/x",
                "parameters": {"density": [0.5, 0]},
            },
            "`density` is 0, outside (0, 1]",
        ),
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2))], "merge_method": "passthrough"},
            "slice 1 blends 2 sources but merge_method is passthrough",
        ),
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("b/y", 1, 4))], "merge_method": "linear"},
            "must span equally many layers: a/x [0, 2) has 2, b/y [1, 4) has 3",
        ),
        (
            {
                "slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2))],
                "merge_method": "slerp",
                "base_model": "c/z",
            },
            "slice 1 blends a/x, b/y but not the base model c/z",
        ),
        (
            {
                "slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2), src("c/z", 0, 2))],
                "merge_method": "slerp",
                "base_model": "a/x",
            },
            "slerp blends exactly 2 models (the base model included); slice 1 has 3",
        ),
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2), wieght=1)], "merge_method": "linear"},
            "`wieght` is not a parameter of linear (it takes weight, normalize)",
        ),
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("b/y", 0, 2), weight="lots")], "merge_method": "linear"},
            "`weight` is a number, not 'lots'",
        ),
        (
            {"slices": [blended_slice(src("a/x", 0, 2), src("a/x", 2, 4))], "merge_method": "linear"},
            "a/x appears twice",
        ),
    ],
)
def test_bad_blend_recipes_are_refused_in_words(data, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)


# --- plan ------------------------------------------------------------------------------------------


def test_parameters_resolve_source_over_slice_over_recipe(tiny_llama, tiny_llama_ft1, tiny_llama_ft2):
    base, t1, t2 = str(tiny_llama), str(tiny_llama_ft1), str(tiny_llama_ft2)
    recipe = recipe_from_dict(
        {
            "slices": [blended_slice(src(base, 0, 2), src(t1, 0, 2, weight=3.0), src(t2, 0, 2), weight=2.0)],
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"weight": 1.0, "lambda": 0.5, "normalize": True},
        }
    )
    blend = make_plan(recipe, ANY_PATH).tensors["model.layers.1.mlp.up_proj.weight"]
    assert isinstance(blend, Blend) and blend.base_index == 0
    assert [dict(p).get("weight") for p in blend.per_source] == [None, 3.0, 2.0]  # the base takes none
    assert dict(blend.shared)["lambda"] == 0.5 and dict(blend.shared)["normalize"] is True


def test_slerp_gradient_follows_the_layer_and_the_filter_and_non_layer_tensors_take_its_start(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    recipe = recipe_from_dict(
        {
            "slices": [blended_slice(src(a, 0, 6), src(b, 0, 6))],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": [0.2, 0.4]}]},
        }
    )
    plan = make_plan(recipe, ANY_PATH)

    def t_of(name):
        return dict(plan.tensors[name].shared)["t"]

    # layer i of 6 sits at i/5 of the gradient: for 5 values, between entries 4i/5 and the next
    expected = [0, 0.4, 0.38, 0.46, 0.76, 1]
    got = [t_of(f"model.layers.{i}.self_attn.q_proj.weight") for i in range(6)]
    assert got == pytest.approx(expected)
    assert [t_of(f"model.layers.{i}.mlp.up_proj.weight") for i in (0, 5)] == pytest.approx([0.2, 0.4])
    assert t_of("model.embed_tokens.weight") == t_of("model.norm.weight") == 0.2  # t = 0 off the layers


def linear_blend(*sources) -> Recipe:
    return recipe_from_dict({"slices": [blended_slice(*sources)], "merge_method": "linear"})


def _variant(parent: Path, path: Path, change) -> Path:
    """A copy of `parent` whose tensors and config `change(tensors, config)` edits."""
    shutil.copytree(parent, path)
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    change(tensors, config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_blending_a_different_tensor_shape_names_the_tensor(tiny_llama, tmp_path):
    def narrower_mlp(tensors, config):
        config["intermediate_size"] = 96
        for name in list(tensors):
            if ".mlp." in name:
                tensors[name] = tensors[name][:96] if "down_proj" not in name else tensors[name][:, :96]

    other = _variant(tiny_llama, tmp_path / "narrow", narrower_mlp)
    recipe = recipe_from_dict(
        {
            "slices": [blended_slice(src(tiny_llama, 0, 2, weight=1), src(other, 0, 2, weight=1))],
            "merge_method": "linear",
        }
    )
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 96\]"):
        make_plan(recipe, ANY_PATH)


def test_blending_different_vocabularies_names_both_sizes_and_tokenizer_source(tiny_llama, tmp_path):
    def more_tokens(tensors, config):
        config["vocab_size"] += 8
        embed = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = torch.cat([embed, embed[:8]])

    other = _variant(tiny_llama, tmp_path / "wide-vocab", more_tokens)
    vocab = load_file(tiny_llama / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    recipe = recipe_from_dict(
        {
            "slices": [blended_slice(src(tiny_llama, 0, 2, weight=1), src(other, 0, 2, weight=1))],
            "merge_method": "linear",
        }
    )
    with pytest.raises(RecipeError) as info:
        make_plan(recipe, ANY_PATH)
    message = str(info.value)
    assert "model.embed_tokens.weight" in message and f"{vocab:,} tokens" in message and f"{vocab + 8:,}" in message
    assert "tokenizer_source" in message


def test_weights_summing_to_zero_under_normalize_are_refused(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    data = {"slices": [blended_slice(src(a, 0, 2, weight=0.5), src(b, 0, 2, weight=-0.5))], "merge_method": "linear"}
    with pytest.raises(RecipeError, match=r"sum to zero .* set normalize: false"):
        make_plan(recipe_from_dict(data), ANY_PATH)
    make_plan(recipe_from_dict({**data, "parameters": {"normalize": False}}), ANY_PATH)  # fine without normalize


def test_a_missing_required_weight_is_named_with_its_model(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    data = {"slices": [blended_slice(src(a, 0, 2, weight=1), src(b, 0, 2))], "merge_method": "linear"}
    with pytest.raises(RecipeError, match=f"linear needs `weight` for {b}"):
        make_plan(recipe_from_dict(data), ANY_PATH)


# --- build, chat, export ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_recipe(tiny_llama, tiny_llama_ft1):
    """Layers 0-2 passed through, 2-4 blended twice over (a repeated slice), 4-6 passed through."""
    base, tuned = str(tiny_llama), str(tiny_llama_ft1)
    return recipe_from_dict(
        {
            "slices": [
                {"sources": [src(base, 0, 3)]},
                {"sources": [src(base, 2, 4), src(tuned, 2, 4, weight=0.7, density=0.5)], "repeat": 2},
                {"sources": [src(base, 4, 6)]},
            ],
            "merge_method": "dare_ties",
            "base_model": base,
            "parameters": {"seed": 3},
        }
    )


def test_mixed_blend_and_passthrough_recipe_builds_chats_and_exports_the_same_model(mixed_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from merger.build.assemble import parameter_bytes
    from merger.build.export import export_plan
    from merger.chat.replies import stream_reply
    from merger.generate.settings import GenerationSettings
    from merger.runtime.builds import build

    plan = make_plan(mixed_recipe, ANY_PATH)
    assert plan.num_layers == 3 + 4 + 2
    assert isinstance(plan.tensors["model.layers.0.mlp.up_proj.weight"], TensorSource)
    assert isinstance(plan.tensors["model.layers.3.mlp.up_proj.weight"], Blend)
    # the repeated blended slice is one set of blends, held once
    assert plan.tensors["model.layers.3.mlp.up_proj.weight"] == plan.tensors["model.layers.5.mlp.up_proj.weight"]

    built = build(plan, device="cpu")
    counts = count(plan)
    per_layer = sum(m.numel for m in plan.primary.layer_tensors(0).values()) * 4
    assert counts.blend_bytes == 2 * per_layer  # two distinct blended layers
    assert parameter_bytes(built.model) == counts.memory_bytes
    *_, reply = stream_reply(
        built, [{"role": "user", "content": "Hello"}], GenerationSettings(max_new_tokens=8, seed=1)
    )
    assert isinstance(reply, str)

    first = export_plan(plan, tmp_path / "one").path
    again = export_plan(make_plan(mixed_recipe, ANY_PATH), tmp_path / "two").path
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()  # seeded
    loaded = AutoModelForCausalLM.from_pretrained(first).eval()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, built.model(ids).logits)
    assert recipe_from_yaml((first / "mergekit_config.yml").read_text()).compacted() == mixed_recipe


def test_preview_text_reports_the_memory_blended_tensors_take(mixed_recipe):
    import app

    plan = make_plan(mixed_recipe, ANY_PATH)
    counts = count(plan)
    text = app.preview_markdown({**counts.as_dict(), "seams": plan.seams()})
    assert f"{counts.blend_bytes / 2**10:,.2f} KiB of it blended or scaled tensors" in text


@pytest.mark.parametrize("text", [BLENDED_YAML, WHOLE_MODEL_YAML])
def test_widget_value_keeps_every_blend_setting(text):
    from ui.recipe_value import stack_mapping, value_from_recipe

    recipe = recipe_from_yaml(text)
    columns = [{"ref": ref, "label": ref, "num_layers": 8} for ref in recipe.models]
    again = recipe_from_dict({**stack_mapping(value_from_recipe(recipe, columns)), "dtype": recipe.dtype})
    slices = recipe.as_slices(dict.fromkeys(recipe.models, 8))
    assert again == recipe.model_copy(update={"slices": slices, "model_entries": ()})


def test_every_merge_method_has_its_function_and_no_function_lacks_a_method():
    """A method is its spec (merger.methods.specs) and its function (merger.methods.functions.BLENDS):
    one without the other fails here, not in a visitor's build."""
    from merger.methods.functions import BLENDS
    from merger.methods.specs import METHODS

    assert set(BLENDS) == set(METHODS)
