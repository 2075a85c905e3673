"""Our exporter against mergekit 0.1.5, the reference for passthrough tensors: the same recipes,
fed to mergekit as the YAML mapping we write, must give bit-equal tensors (names, dtypes, bytes).

mergekit runs once per module in a child process (its import alone takes seconds), offline, on
the tiny local models. Where mergekit is wrong (Gemma 3 `layer_types`) or picks other parents
for the non-layer tensors, the tests pin both behaviours so a change on either side shows up.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from merger.build.export import export_plan
from merger.errors import RecipeError
from merger.plan import Blend, make_plan
from merger.recipe import Recipe, Slice, Source, passthrough
from merger.recipe.mergekit_yaml import recipe_from_dict

if importlib.util.find_spec("mergekit") is None:
    pytest.skip("mergekit is not installed (pip install -r requirements-dev.txt)", allow_module_level=True)

from mergekit_runner import run_mergekit, tensors_of
from refs import ANY_PATH
from tiny import IDENTITY_START, make_vocab_variant


def block_expansion(a: str, dtype: str) -> Recipe:
    """Every second layer of `a` followed by a copy of itself that starts as the identity."""
    slices = []
    for end in (2, 4, 6):
        slices.append({"sources": [{"model": a, "layer_range": [end - 2, end]}]})
        copy = {"model": a, "layer_range": [end - 1, end], "parameters": {"scale": IDENTITY_START}}
        slices.append({"sources": [copy]})
    return recipe_from_dict({"slices": slices, "merge_method": "passthrough", "dtype": dtype})


def scaled_everywhere(a: str) -> Recipe:
    """`scale` in every form mergekit reads: a gradient over a slice (interpolated at i/(n-1)), a
    slice-level scalar, and a recipe-level filter that also reaches the final norm (t = 0)."""
    return recipe_from_dict(
        {
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 4], "parameters": {"scale": [0.25, 1.0, 0.3]}}]},
                {"sources": [{"model": a, "layer_range": [2, 6]}], "parameters": {"scale": 0.5}},
            ],
            "merge_method": "passthrough",
            "parameters": {"scale": [{"filter": "norm", "value": [2.0, 0.75]}]},
        }
    )


def with_keys(recipe: Recipe, **keys) -> Recipe:
    return recipe_from_dict({**recipe.to_mergekit(), **keys})


def tokenizer_recipes(a: str, b: str, wide: str) -> dict[str, Recipe]:
    """Tokenizer sources whose vocabulary the merge's embedding rows already have: mergekit's row
    rebuild changes nothing. wide: `a` with two added tokens (and rows), used only for layers."""
    splice = passthrough((a, 0, 4), (b, 2, 6))
    beside = passthrough((a, 0, 3), (wide, 3, 4), (a, 4, 6))
    return {
        "tokenizer_base": with_keys(splice, tokenizer_source="base"),
        "tokenizer_union": with_keys(splice, tokenizer_source="union"),
        "tokenizer_legacy_model_form": with_keys(splice, tokenizer_source=f"model:{b}"),
        "tokenizer_mapping": with_keys(splice, tokenizer={"source": "union"}),
        "tokenizer_base_beside_another_vocabulary": with_keys(beside, tokenizer_source="base", base_model=a),
    }


def refused_tokenizer_recipes(a: str, wide: str, padded: str) -> dict[str, tuple[dict, str]]:
    """Tokenizer sources for which mergekit moves or resizes the embedding rows: refused here, with why."""
    beside = passthrough((a, 0, 3), (wide, 3, 4), (a, 4, 6)).to_mergekit()
    return {
        "union_of_different_vocabularies": (
            {**beside, "tokenizer_source": "union", "base_model": a},
            "`tokenizer_source: union` builds one vocabulary from every model's tokenizer",
        ),
        "tokenizer_of_another_vocabulary": (
            {**passthrough((a, 0, 4), (a, 2, 6)).to_mergekit(), "tokenizer_source": wide},
            "does not share: token '<|tool|>' (it lacks)",
        ),
        "padded_rows": (
            {**passthrough((padded, 0, 6)).to_mergekit(), "tokenizer_source": "base"},
            "makes mergekit resize",
        ),
    }


def recipes(a: str, b: str, g: str) -> dict[str, Recipe]:
    """a, b: 6-layer llamas (different weights); g: 12-layer Gemma 3 (5 sliding + 1 full, twice)."""
    return {
        "duplicated": passthrough((a, 0, 4), (a, 2, 6)),
        "skipped": passthrough((a, 0, 2), (a, 4, 6)),
        "reordered": passthrough((a, 3, 6), (a, 0, 3)),
        "repeated": Recipe(slices=(Slice(source=Source(model=a, start=2, end=3), repeat=3),)),
        "interleaved": passthrough((a, 0, 2), (b, 2, 4), (a, 4, 6)),
        "to_bfloat16": passthrough((a, 0, 4), (a, 2, 6), dtype="bfloat16"),
        "gemma_same_count": passthrough((g, 0, 6), (g, 3, 9)),
        "gemma_grown": passthrough((g, 0, 8), (g, 4, 12)),
        "ends_on_other_model": passthrough((a, 0, 3), (b, 3, 6)),
        "base_model_not_sliced": passthrough((a, 0, 3), (a, 2, 6)).model_copy(update={"base_model": b}),
        "block_expansion_bfloat16": block_expansion(a, "bfloat16"),
        "block_expansion_float32": block_expansion(a, "float32"),
        "scaled_everywhere": scaled_everywhere(a),
    }


BIT_EQUAL_CASES = [
    "duplicated",
    "skipped",
    "reordered",
    "repeated",
    "interleaved",
    "to_bfloat16",
    "gemma_same_count",
    "ends_on_other_model",  # embeddings from the first slice's model, final norm from the last's
    "base_model_not_sliced",  # base_model gives the config, not tensors
    "block_expansion_bfloat16",  # passthrough's `scale`: mergekit multiplies in the recipe's dtype
    "block_expansion_float32",
    "scaled_everywhere",
    "tokenizer_base",  # tokenizer sources: mergekit rebuilds the rows for the vocabulary, to the same values
    "tokenizer_union",
    "tokenizer_legacy_model_form",  # `model:` written out plain, the form mergekit 0.1.5 reads
    "tokenizer_mapping",
    "tokenizer_base_beside_another_vocabulary",
]


@pytest.fixture(scope="module")
def vocab_variants(tiny_llama, tmp_path_factory) -> tuple[str, str]:
    """tiny_llama with two added tokens, and tiny_llama with two padding rows."""
    root = tmp_path_factory.mktemp("vocab")
    wide = make_vocab_variant(tiny_llama, root / "wide", added_tokens=("<|tool|>", "<|think|>"))
    return str(wide), str(make_vocab_variant(tiny_llama, root / "padded", extra_rows=2))


@pytest.fixture(scope="module")
def cases(tiny_llama, tiny_llama_b, tiny_gemma, vocab_variants) -> dict[str, Recipe]:
    a, b = str(tiny_llama), str(tiny_llama_b)
    return recipes(a, b, str(tiny_gemma)) | tokenizer_recipes(a, b, vocab_variants[0])


@pytest.fixture(scope="module")
def refused(tiny_llama, vocab_variants) -> dict[str, tuple[dict, str]]:
    return refused_tokenizer_recipes(str(tiny_llama), *vocab_variants)


@pytest.fixture(scope="module")
def mergekit_runs(cases, refused, tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """name -> (mergekit's output folder, its error or None), all made by one child process."""
    configs = {name: recipe.to_mergekit() for name, recipe in cases.items()}
    configs |= {name: data for name, (data, _) in refused.items()}
    return run_mergekit(configs, tmp_path_factory.mktemp("mk"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ours")
    return {name: export_plan(make_plan(recipe, ANY_PATH), root / name).path for name, recipe in cases.items()}


def bit_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def assert_bit_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    unequal = [name for name in ours if not bit_equal(ours[name], theirs[name])]
    assert not unequal, f"tensors that differ from mergekit's: {unequal}"


@pytest.mark.parametrize("case", BIT_EQUAL_CASES)
def test_passthrough_export_is_bit_equal_to_mergekit(case, mergekit_runs, ours):
    theirs, error = mergekit_runs[case]
    assert error is None
    assert_bit_equal(tensors_of(ours[case]), tensors_of(theirs))
    our_config = json.loads((ours[case] / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert our_config["num_hidden_layers"] == their_config["num_hidden_layers"]
    assert "lm_head.weight" not in tensors_of(theirs)  # tied parents: neither tool writes a head


def test_gemma3_grown_stack_matches_what_mergekit_wrote_before_failing(cases, mergekit_runs, ours, tiny_gemma):
    from transformers import AutoModelForCausalLM

    from merger.build.assemble import assemble

    theirs, error = mergekit_runs["gemma_grown"]
    # mergekit keeps the parent's 12 layer_types for 16 layers; transformers refuses that config
    # after the weights are written, leaving a folder without config.json
    assert error is not None and "layer_types" in error
    assert not (theirs / "config.json").exists()
    assert_bit_equal(tensors_of(ours["gemma_grown"]), tensors_of(theirs))

    recipe = cases["gemma_grown"]
    parent_types = json.loads((tiny_gemma / "config.json").read_text())["layer_types"]
    config = json.loads((ours["gemma_grown"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 16
    assert config["layer_types"] == [parent_types[layer] for _, layer in recipe.layer_sources]

    loaded = AutoModelForCausalLM.from_pretrained(ours["gemma_grown"]).eval()
    built = assemble(make_plan(recipe, ANY_PATH))
    ids = torch.arange(1, 13).unsqueeze(0)  # longer than the sliding window (4): masks matter
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, built(ids).logits)


def test_gemma3_reordered_stack_gets_recipe_layer_types_where_mergekit_keeps_the_parents(
    cases, mergekit_runs, ours, tiny_gemma
):
    theirs, _ = mergekit_runs["gemma_same_count"]
    parent_types = json.loads((tiny_gemma / "config.json").read_text())["layer_types"]
    recipe_types = [parent_types[layer] for _, layer in cases["gemma_same_count"].layer_sources]
    assert recipe_types != parent_types  # [0,6)+[3,9) moves the full-attention layers
    assert json.loads((theirs / "config.json").read_text())["layer_types"] == parent_types
    assert json.loads((ours["gemma_same_count"] / "config.json").read_text())["layer_types"] == recipe_types


def test_block_expansion_zeroes_the_added_layers_output_projections_like_mergekit(cases, ours):
    """Not only equal to mergekit: the scaled tensors are zeros, their unscaled twins the parent's."""
    written = tensors_of(ours["block_expansion_bfloat16"])
    plan = make_plan(cases["block_expansion_bfloat16"], ANY_PATH)
    scaled = {name for name, origin in plan.tensors.items() if isinstance(origin, Blend)}
    assert scaled == {f"model.layers.{d}.{p}.weight" for d in (2, 5, 8) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert all(not written[name].any() for name in scaled)
    assert written["model.layers.1.self_attn.o_proj.weight"].any()  # the layer the copy repeats


@pytest.mark.parametrize("case", [c for c in BIT_EQUAL_CASES if c.startswith("tokenizer_")])
def test_a_tokenizer_source_ships_the_vocabulary_mergekit_ships(case, mergekit_runs, ours):
    from tokenizers import Tokenizer

    theirs, _ = mergekit_runs[case]
    folders = (ours[case], theirs)
    vocab = [Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True) for d in folders]
    assert vocab[0] == vocab[1]
    configs = [json.loads((d / "config.json").read_text()) for d in folders]
    assert configs[0]["vocab_size"] == configs[1]["vocab_size"] == len(vocab[0])


@pytest.mark.parametrize("case", ["union_of_different_vocabularies", "tokenizer_of_another_vocabulary", "padded_rows"])
def test_a_tokenizer_source_that_moves_embedding_rows_is_refused_where_mergekit_moves_them(
    case, refused, mergekit_runs
):
    data, message = refused[case]
    with pytest.raises(RecipeError) as info:
        make_plan(recipe_from_dict(data), ANY_PATH)
    assert message in str(info.value)
    theirs, error = mergekit_runs[case]
    if error is None:  # mergekit rebuilt the rows for another vocabulary: not the parent's rows
        embed = tensors_of(theirs)["model.embed_tokens.weight"]
        parent = tensors_of(Path(data["slices"][0]["sources"][0]["model"]))["model.embed_tokens.weight"]
        assert embed.shape != parent.shape
