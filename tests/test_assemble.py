"""Assemble by assignment gives the same model as a deep-copied build, without more memory."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from merger.build.assemble import assemble, parameter_bytes
from merger.dtypes import torch_dtype
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import passthrough
from merger.recipe.mergekit_yaml import recipe_from_dict

from refs import ANY_PATH
from tiny import IDENTITY_START


def copied_reference(plan):
    """The naive build: a fresh model whose every layer owns a cloned copy of its tensors."""
    from safetensors.torch import load_file

    parents = {ref: {} for ref in plan.models}
    for ref, info in plan.models.items():
        for f in sorted(info.local_dir.glob("*.safetensors")):
            parents[ref].update(load_file(f))
    dtype = torch_dtype(plan.dtype)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plan.config), dtype=dtype)
    state = {out: parents[src.model][src.name].to(dtype).clone() for out, src in plan.tensors.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def assert_same_model(plan, prompt_ids, new_tokens=30):
    built, reference = assemble(plan), copied_reference(plan)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reference(ids).logits)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        assert torch.equal(built.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    return built


def unique_parent_bytes(plan):
    return sum(m.nbytes for info in plan.models.values() for n, m in info.tensors.items())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_llama_splice_equals_copied_build_and_shares_tensors(tiny_llama, dtype):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6), dtype=dtype), ANY_PATH)
    built = assert_same_model(plan, [1, 5, 9, 13, 17, 21])
    layers = built.model.layers
    assert len(layers) == built.config.num_hidden_layers == 8
    assert layers[4].self_attn.q_proj.weight.data_ptr() == layers[2].self_attn.q_proj.weight.data_ptr()
    assert layers[4] is not layers[2] and layers[4].self_attn.layer_idx == 4  # own KV-cache slot
    assert built.dtype == torch_dtype(dtype)
    parent_params = unique_parent_bytes(plan) // 4  # stored in float32
    assert parameter_bytes(built) == count(plan).memory_bytes == parent_params * built.dtype.itemsize


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_expansion_starts_as_its_parent_with_only_the_scaled_tensors_materialized(tiny_llama, dtype):
    ref = str(tiny_llama)
    copy = {"model": ref, "layer_range": [1, 2], "parameters": {"scale": IDENTITY_START}}
    slices = [{"sources": [{"model": ref, "layer_range": [0, 2]}]}, {"sources": [copy]}]
    slices.append({"sources": [{"model": ref, "layer_range": [2, 6]}]})
    plan = make_plan(recipe_from_dict({"slices": slices, "dtype": dtype}), ANY_PATH)
    built = assemble(plan)
    added, original = built.model.layers[2], built.model.layers[1]
    assert not added.self_attn.o_proj.weight.any() and not added.mlp.down_proj.weight.any()
    assert original.self_attn.o_proj.weight.any()
    assert added.self_attn.o_proj.weight.data_ptr() != original.self_attn.o_proj.weight.data_ptr()
    assert added.self_attn.q_proj.weight.data_ptr() == original.self_attn.q_proj.weight.data_ptr()  # still shared
    # the preview's memory figure counts the two materialized tensors, and the build holds exactly that
    scaled = original.self_attn.o_proj.weight.nbytes + original.mlp.down_proj.weight.nbytes
    parent_plan = make_plan(passthrough((ref, 0, 6), dtype=dtype), ANY_PATH)
    assert parameter_bytes(built) == count(plan).memory_bytes == count(parent_plan).memory_bytes + scaled
    # an added layer whose output projections are zero adds nothing to the residual stream
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, assemble(parent_plan)(ids).logits)


def test_tiny_gemma3_seam_off_the_attention_pattern_equals_copied_build(tiny_gemma):
    ref = str(tiny_gemma)
    plan = make_plan(passthrough((ref, 0, 8), (ref, 4, 12)), ANY_PATH)
    built = assert_same_model(plan, list(range(3, 40)))  # longer than the sliding window
    assert built.config.layer_types[8] == "sliding_attention"
    assert parameter_bytes(built) == unique_parent_bytes(plan)


def test_two_parents_interleaved_equal_copied_build(tiny_llama, tiny_llama_b):
    a, b = str(tiny_llama), str(tiny_llama_b)
    assert_same_model(make_plan(passthrough((a, 0, 3), (b, 2, 5), (a, 3, 6)), ANY_PATH), [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("ref", "ranges"),
    [
        ("bundled:smollm2-135m-instruct", [(0, 20), (10, 30)]),
        ("bundled:gemma3-270m", [(0, 12), (8, 18)]),
    ],
)
def test_bundled_splices_equal_copied_builds_without_more_memory(ref, ranges):
    plan = make_plan(passthrough(*[(ref, a, b) for a, b in ranges]), ANY_PATH)
    built = assert_same_model(plan, [2, 651, 6037, 563, 9079, 236761, 107][: 7 if "gemma" in ref else 5])
    assert parameter_bytes(built) == unique_parent_bytes(plan)
