"""The methods added after the first six, on their own: DELLA's seeded, rank-shaped masks, Arcee
Fusion's seeded quartile sample, Model Breadcrumbs' outlier cut, each method's parameters refused
or required in words (equality with mergekit is
tests/test_blend_equivalence.py's)."""

from __future__ import annotations

import pytest
import torch

from merger.errors import RecipeError
from merger.methods import functions, selective
from merger.methods.functions import della_prune, outlier_prune
from merger.methods.specs import BLEND_METHODS, METHODS
from merger.plan import make_plan
from merger.recipe.mergekit_yaml import recipe_from_dict

from refs import ANY_PATH


def test_della_mask_is_reproduced_by_its_seed_and_differs_for_another():
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    first = della_prune(delta, 0.5, epsilon=0.3, seed=7)
    assert torch.equal(first, della_prune(delta, 0.5, epsilon=0.3, seed=7))
    assert not torch.equal(first, della_prune(delta, 0.5, epsilon=0.3, seed=8))


def test_della_keeps_larger_entries_of_each_row_more_often_and_rescales_to_the_l1_norm():
    delta = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))
    pruned = della_prune(delta, 0.5, epsilon=0.3, seed=7)
    kept = pruned != 0
    rank = delta.abs().argsort(dim=1).argsort(dim=1)  # 0 = the row's smallest magnitude
    # kept with probability 0.2 + 0.6 * rank / 499: the smallest fifth of each row about 0.26 of the
    # time, the largest fifth 0.74 (40,000 entries each: 0.01 is 4.5 sigma)
    assert abs(kept[rank < 100].float().mean().item() - 0.2595) < 0.01
    assert abs(kept[rank >= 400].float().mean().item() - 0.7405) < 0.01
    factor = delta.abs().sum() / (delta * kept).abs().sum()
    torch.testing.assert_close(pruned[kept], delta[kept] * factor)
    unscaled = della_prune(delta, 0.5, epsilon=0.3, seed=7, rescale=False)
    assert torch.equal(unscaled[kept], delta[kept]) and torch.equal(unscaled != 0, kept)


def test_della_ranks_rows_a_few_at_a_time_without_changing_the_result(monkeypatch):
    delta = torch.randn(200, 500, generator=torch.Generator().manual_seed(2))
    whole = della_prune(delta, 0.4, epsilon=0.2, seed=5)
    monkeypatch.setattr(functions, "DELLA_CHUNK", 1_200)  # two rows and a bit per step
    assert torch.equal(della_prune(delta, 0.4, epsilon=0.2, seed=5), whole)


def test_della_treats_a_vector_as_one_row():
    delta = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    kept = della_prune(delta, 0.5, epsilon=0.4, seed=3) != 0
    order = delta.abs().argsort()
    assert kept[order[:1000]].float().mean() < 0.25 < 0.75 < kept[order[-1000:]].float().mean()


def test_breadcrumbs_drops_the_largest_gamma_share_then_the_smallest():
    delta = torch.tensor([0.1, -0.9, 0.3, -0.05, 0.2, 0.6, -0.4, 0.7, 0.02, -0.8])
    # density 0.5 keeps 5 of 10; gamma 0.2 drops the 2 largest (-0.9, -0.8) first
    expected = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.2, 0.6, -0.4, 0.7, 0.0, 0.0])
    assert torch.equal(outlier_prune(delta, 0.5, gamma=0.2), expected)
    # gamma 0.6 cannot be honoured with 5 kept: the 5 largest go, and none of the smallest
    expected = torch.tensor([0.1, 0.0, 0.3, -0.05, 0.2, 0.0, 0.0, 0.0, 0.02, 0.0])
    assert torch.equal(outlier_prune(delta, 0.5, gamma=0.6), expected)


def test_arcee_fusion_quartiles_of_a_large_tensor_come_from_a_seeded_sample(monkeypatch):
    monkeypatch.setattr(selective, "QUANTILE_SAMPLE", 2_000)
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(0))
    first = selective._quartiles(x, seed=1)
    assert torch.equal(first, selective._quartiles(x, seed=1))
    assert not torch.equal(first, selective._quartiles(x, seed=2))
    torch.testing.assert_close(first, torch.tensor([0.25, 0.5, 0.75]), atol=0.05, rtol=0)  # uniform's quartiles


def _blend_of(method: str, **top) -> dict:
    sources = [{"model": m, "layer_range": [0, 2]} for m in ("a/x", "b/y", "c/z")]
    return {"slices": [{"sources": sources}], "merge_method": method, **top}


@pytest.mark.parametrize("method", [m for m in BLEND_METHODS if METHODS[m].needs_base])
def test_methods_that_need_a_base_say_so(method):
    with pytest.raises(RecipeError, match=f"merge_method {method} needs `base_model:` .*; add it at the top level"):
        recipe_from_dict(_blend_of(method))


@pytest.mark.parametrize("method", BLEND_METHODS)
def test_a_parameter_a_method_does_not_take_is_refused_with_those_it_takes(method):
    known = ", ".join(p.name for p in METHODS[method].params)
    data = _blend_of(method, base_model="a/x", parameters={"wieght": 1})
    with pytest.raises(RecipeError, match=f"`wieght` is not a parameter of {method} \\(it takes {known}\\)"):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _blend_of("model_stock", base_model="a/x", parameters={"weight": 1}),
            "`weight` is not a parameter of model_stock",
        ),
        (_blend_of("karcher", parameters={"seed": 1}), "`seed` is not a parameter of karcher (it takes max_iter, tol)"),
        (_blend_of("nuslerp"), "nuslerp blends exactly 2 models besides the base model; slice 1 has 3"),
        (_blend_of("nuslerp", base_model="a/x"), None),  # with the base, two others
        (
            {"models": [{"model": "a/x"}, {"model": "b/y"}], "merge_method": "nuslerp", "base_model": "a/x"},
            "nuslerp blends exactly 2 models besides the base model; the blend has 1 (without a base model, it "
            "would blend these 2 themselves)",
        ),
        (
            {"models": [{"model": "a/x"}, {"model": "b/y"}], "merge_method": "model_stock", "base_model": "a/x"},
            "model_stock blends at least 3 models (the base model included); the blend has 2",
        ),
        (_blend_of("nearswap", base_model="a/x"), "nearswap blends exactly 2 models (the base model included)"),
        (_blend_of("multislerp", base_model="d/w"), "slice 1 blends a/x, b/y, c/z but not the base model d/w"),
        (_blend_of("karcher", base_model="d/w"), None),  # karcher ignores the base model
        (
            _blend_of("breadcrumbs", base_model="a/x", parameters={"gamma": 1.5}),
            "`gamma` is 1.5, outside [0, 1): it is the share of outliers dropped",
        ),
        (
            _blend_of("sce", base_model="a/x", parameters={"select_topk": [1, 0]}),
            "`select_topk` is 0, outside (0, 1]: it is the share of entries kept",
        ),
        (
            _blend_of("karcher", parameters={"max_iter": 2.5}),
            "`max_iter` is a whole number, not 2.5",
        ),
        (
            _blend_of("nearswap", base_model="a/x", parameters={"t": -0.1}),
            "`t` is -0.1, outside [0, ∞): it is a distance",
        ),
    ],
)
def test_method_specific_mistakes_are_refused_in_words(data, message):
    if message is None:
        recipe_from_dict(data)
        return
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)


def test_della_keep_probabilities_outside_0_1_are_refused_with_the_model_and_tensor(tiny_llama, tiny_llama_ft1):
    base, tuned = str(tiny_llama), str(tiny_llama_ft1)
    data = {
        "models": [
            {"model": tuned, "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]}}
        ],
        "merge_method": "della",
        "base_model": base,
    }
    with pytest.raises(RecipeError, match=f"of {tuned}'s model.layers.0.mlp.* 0.9 ± 0.15, which must stay inside"):
        make_plan(recipe_from_dict(data), ANY_PATH)
    make_plan(recipe_from_dict({**data, "parameters": {"epsilon": 0.05}}), ANY_PATH)  # 0.85 to 0.95: fine


def test_a_whole_number_gradient_interpolates_as_mergekit_and_must_land_on_whole_numbers(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    data = {"models": [{"model": a}, {"model": b}], "merge_method": "karcher", "parameters": {"max_iter": [0, 10]}}
    plan = make_plan(recipe_from_dict(data), ANY_PATH)  # 6 layers: 0, 2, 4, 6, 8, 10
    steps = [dict(plan.tensors[f"model.layers.{i}.mlp.up_proj.weight"].shared)["max_iter"] for i in range(6)]
    assert steps == [0, 2, 4, 6, 8, 10]
    with pytest.raises(RecipeError, match=r"karcher's `max_iter` for model.layers.1.* gives 5.6 here, not a whole"):
        make_plan(recipe_from_dict({**data, "parameters": {"max_iter": [2, 20]}}), ANY_PATH)
