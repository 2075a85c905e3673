"""The compiled step's grouped attention equals SDPA, and a model switched to it decodes the same
greedy tokens as plain `generate()`."""

import pytest
import torch
import torch.nn.functional as F

import merger.decode_attention as decode_attention
import merger.fastgen as fastgen
from merger.assemble import assemble
from merger.fastgen import FastGenerator
from merger.plan import make_plan
from merger.recipe import passthrough


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_grouped_decode_attention_equals_sdpa(groups, mask_kind):
    gen = torch.Generator().manual_seed(groups)
    kv_heads, window, dim = 3, 37, 16
    query = torch.randn(2, kv_heads * groups, 1, dim, generator=gen)
    key, value = torch.randn(2, 2, kv_heads, window, dim, generator=gen)
    attend = torch.rand(2, 1, 1, window, generator=gen) < 0.6
    attend[..., 0] = True  # every row attends somewhere
    mask = {"bool": attend, "additive": torch.zeros(attend.shape).masked_fill(~attend, -1e9), "none": None}[mask_kind]
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = decode_attention.grouped_decode_attention(query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_compiled_step_with_grouped_attention_greedy_equals_generate(fixture, request, monkeypatch):
    ref = str(request.getfixturevalue(fixture))
    model = assemble(make_plan(passthrough((ref, 0, 4), (ref, 2, 6))))
    prompt = torch.tensor([list(range(3, 20))])  # past tiny_gemma's sliding window of 4
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, 17:].tolist()
    graphs = []  # what dynamo traced: the step runs each graph eagerly, without inductor's C++ build

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(fastgen, "STEP_COMPILE", {"backend": record})
    fast = FastGenerator(model, max_seq_len=80, compile=True)
    assert model.config.get_text_config(decoder=True)._attn_implementation == decode_attention.IMPLEMENTATION
    assert list(fast.generate(prompt, max_new_tokens=48)) == expected
    traced = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert graphs and not any("scaled_dot_product_attention" in op for op in traced)
