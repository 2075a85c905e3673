"""Blends against mergekit 0.1.5: the same recipe (as the YAML mapping we write) built by mergekit
and by our exporter must give every tensor equal within TOLERANCE, on tiny local models that
genuinely differ (tiny_llama, an unrelated tiny_llama_b, and two "fine-tunes" of tiny_llama).

Every method is here, most with a gradient or a `{filter, value}` on its own parameters; the
preview's count of each plan must equal the number of values mergekit wrote. DARE and DELLA draw
their masks at random (mergekit unseeded, we seeded per tensor): both sides run under
mergekit_runner.fix_random_draws, so one fixed draw meets equal probabilities, and everything but
the randomness is compared (tests/test_blend.py and tests/test_methods.py check the seeded draws themselves).

On these models every tensor comes out bit-equal today; the tests still compare within TOLERANCE,
since bit-equality is in neither tool's contract. TOLERANCE: our methods run the same operations
as mergekit in the same precision (float32 for linear and slerp, the input dtype for the
task-vector methods) but not always in the same order (mergekit reduces slerp's norms in chunks
of 2**20 entries and batches tensors). Float32 rounding can then differ by a few units in the
last place, 2**-23 = 1.2e-7 relative each: rtol 1e-6 (8 ulp) and atol 1e-6 (for entries near
zero; entries here are about 0.05 to 1) bound what rounding can do, while a semantic difference
(a wrong t, weight or mask) moves entries by 1e-3 or more. In bfloat16 both tools round one
float32 result, so one bfloat16 ulp (2**-7 relative) is allowed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from merger.build.export import export_plan
from merger.plan import Blend, make_plan
from merger.plan.counts import count
from merger.recipe.mergekit_yaml import recipe_from_dict, recipe_from_yaml

if importlib.util.find_spec("mergekit") is None:
    pytest.skip("mergekit is not installed (pip install -r requirements-dev.txt)", allow_module_level=True)

from mergekit_runner import fix_random_draws, run_mergekit, tensors_of
from refs import ANY_PATH

TOLERANCE = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.bfloat16: {"rtol": 2**-7, "atol": 1e-6}}
MLP_SPARSER = [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]


def _src(model: str, start: int, end: int, **parameters) -> dict:
    return {"model": model, "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


def blend_recipes(a: str, b: str, t1: str, t2: str) -> dict[str, dict]:
    return {
        "linear_whole_models": {
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}],
            "merge_method": "linear",
        },
        "linear_slices_gradient_unnormalized": {
            "slices": [{"sources": [_src(a, 0, 6, weight=[1.0, 0.2]), _src(b, 0, 6, weight=[0.1, 0.9])]}],
            "merge_method": "linear",
            "parameters": {"normalize": False},
        },
        "task_arithmetic_two_tasks": {
            "models": [{"model": t1, "parameters": {"weight": 0.1}}, {"model": t2, "parameters": {"weight": 0.3}}],
            "merge_method": "task_arithmetic",
            "base_model": a,
        },
        "ties": {
            "models": [
                {"model": a},
                {"model": t1, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": t2, "parameters": {"weight": 0.4, "density": MLP_SPARSER}},
            ],
            "merge_method": "ties",
            "base_model": a,
        },
        "slerp_gradient": {
            "slices": [{"sources": [_src(a, 0, 6), _src(b, 0, 6)]}],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": SLERP_T},
        },
        "slerp_finetunes_bfloat16": {  # two close fine-tunes: some tensors take the near-collinear branch
            "slices": [{"sources": [_src(t1, 0, 6), _src(a, 0, 6)]}],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": SLERP_T},
            "dtype": "bfloat16",
        },
        "dare_ties": {
            "models": [
                {"model": t1, "parameters": {"weight": 0.5, "density": [0.3, 0.9]}},
                {"model": t2, "parameters": {"weight": 0.5, "density": MLP_SPARSER}},
            ],
            "merge_method": "dare_ties",
            "base_model": a,
        },
        "della": {
            "models": [
                {"model": a},
                {"model": t1, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": t2, "parameters": {"weight": 0.4, "density": MLP_SPARSER, "epsilon": 0.1}},
            ],
            "merge_method": "della",
            "base_model": a,
        },
        "della_linear_gradients": {
            "slices": [
                {
                    "sources": [
                        _src(a, 0, 6),
                        _src(t1, 0, 6, weight=[0.2, 0.8], density=[0.3, 0.8]),
                        _src(t2, 0, 6, weight=0.5, density=0.6),
                    ],
                    "parameters": {"epsilon": [{"filter": "self_attn", "value": 0.05}, {"value": 0.15}]},
                }
            ],
            "merge_method": "della_linear",
            "base_model": a,
            "parameters": {"lambda": 0.9},
        },
        "breadcrumbs": {
            "models": [
                {"model": t1, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                {"model": t2, "parameters": {"weight": 0.5, "density": MLP_SPARSER}},
            ],
            "merge_method": "breadcrumbs",
            "base_model": a,
        },
        "breadcrumbs_ties_gradients": {
            "slices": [
                {
                    "sources": [
                        _src(a, 0, 6),
                        _src(t1, 0, 6, weight=0.7, density=[0.9, 0.5]),
                        _src(
                            t2, 0, 6, weight=0.3, density=0.7, gamma=[{"filter": "mlp", "value": 0.1}, {"value": 0.02}]
                        ),
                    ]
                }
            ],
            "merge_method": "breadcrumbs_ties",
            "base_model": a,
            "parameters": {"rescale": True, "normalize": True},
        },
        "sce": {
            "models": [{"model": t1}, {"model": t2}],
            "merge_method": "sce",
            "base_model": a,
            "parameters": {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.5]}]},
        },
        "model_stock": {
            "models": [{"model": a}, {"model": t1}, {"model": t2}],
            "merge_method": "model_stock",
            "base_model": a,
            "parameters": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
        },
        "nuslerp_with_base_row_wise": {
            "slices": [
                {
                    "sources": [_src(a, 0, 6), _src(t1, 0, 6, weight=[1.0, 0.2]), _src(t2, 0, 6, weight=0.6)],
                    "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                }
            ],
            "merge_method": "nuslerp",
            "base_model": a,
        },
        "nuslerp_bfloat16": {
            "models": [
                {"model": a, "parameters": {"weight": 0.3}},
                {"model": b, "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.7}]}},
            ],
            "merge_method": "nuslerp",
            "parameters": {"nuslerp_flatten": False},
            "dtype": "bfloat16",
        },
        "multislerp_with_base": {
            "models": [
                {"model": t1, "parameters": {"weight": [0.2, 0.9]}},
                {"model": t2, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": 0.1}},
            ],
            "merge_method": "multislerp",
            "base_model": a,
        },
        "multislerp": {
            "models": [
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}},
            ],
            "merge_method": "multislerp",
            "parameters": {"normalize_weights": [{"filter": "norm", "value": False}, {"value": True}]},
        },
        "karcher": {
            "models": [{"model": a}, {"model": b}, {"model": t1}],
            "merge_method": "karcher",
            "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 20}], "tol": 1e-6},
        },
        "nearswap": {
            "slices": [{"sources": [_src(t1, 0, 6), _src(a, 0, 6)]}],
            "merge_method": "nearswap",
            "base_model": a,
            "parameters": {"t": [{"filter": "self_attn", "value": [0.001, 0.05]}, {"value": 0.01}]},
        },
        "arcee_fusion": {
            "models": [{"model": t2}],
            "merge_method": "arcee_fusion",
            "base_model": a,
        },
        "task_arithmetic_mixed_with_passthrough": {  # base-only slices pass through (in mergekit too)
            "slices": [
                {"sources": [_src(a, 0, 3)]},
                {"sources": [_src(a, 2, 5), _src(t1, 2, 5)], "parameters": {"weight": [0.2, 0.8]}},
                {"sources": [_src(a, 3, 6)]},
            ],
            "merge_method": "task_arithmetic",
            "base_model": a,
            "parameters": {"weight": 5.0, "lambda": 0.9},  # the slice's weight wins over the recipe's
        },
    }


CASES = [
    "linear_whole_models",
    "linear_slices_gradient_unnormalized",
    "task_arithmetic_two_tasks",
    "ties",
    "slerp_gradient",
    "slerp_finetunes_bfloat16",
    "dare_ties",
    "della",
    "della_linear_gradients",
    "breadcrumbs",
    "breadcrumbs_ties_gradients",
    "sce",
    "model_stock",
    "nuslerp_with_base_row_wise",
    "nuslerp_bfloat16",
    "multislerp_with_base",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "task_arithmetic_mixed_with_passthrough",
]


@pytest.fixture(scope="module")
def cases(tiny_llama, tiny_llama_b, tiny_llama_ft1, tiny_llama_ft2) -> dict[str, dict]:
    return blend_recipes(str(tiny_llama), str(tiny_llama_b), str(tiny_llama_ft1), str(tiny_llama_ft2))


@pytest.fixture(scope="module")
def mergekit_runs(cases, tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    return run_mergekit(cases, tmp_path_factory.mktemp("mk"), fixed_draws=True)


@pytest.mark.parametrize("case", CASES)
def test_blend_export_equals_mergekit_within_rounding(case, cases, mergekit_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "bernoulli", torch.bernoulli)  # undone after the test
    fix_random_draws()  # as in mergekit's run: DARE's and DELLA's masks are then one fixed draw on both sides
    theirs_dir, error = mergekit_runs[case]
    assert error is None
    recipe = recipe_from_yaml(recipe_from_dict(cases[case]).to_yaml())  # as the page's YAML box and preview read it
    plan = make_plan(recipe, ANY_PATH)
    assert plan.blends, "the case must blend something"
    ours = tensors_of(export_plan(plan, tmp_path / case).path)
    theirs = tensors_of(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    assert count(plan).total_params == sum(t.numel() for t in theirs.values())  # the preview's count
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        torch.testing.assert_close(tensor, theirs[name], **TOLERANCE[tensor.dtype], msg=lambda m, n=name: f"{n}: {m}")
    # and a blend is not trivially one of its parents
    name, blend = next((n, o) for n, o in plan.tensors.items() if isinstance(o, Blend))
    parents = [tensors_of(Path(src.meta.file).parent)[src.name].to(ours[name].dtype) for src in blend.sources]
    assert not any(torch.equal(ours[name], parent) for parent in parents)
