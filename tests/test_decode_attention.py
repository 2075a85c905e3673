"""The compiled step's attentions (grouped; FlexAttention over the positions in use) and every
variant the attention benchmark times equal SDPA, a model switched to grouped or flex decodes the
same greedy tokens as plain `generate()`, and the Triton attention serves only GPUs that can run it
(its own tests: test_decode_kernel.py)."""

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_reference import attended_slots, sdpa_over

from merger.build.assemble import assemble
from merger.generate import attention as decode_attention
from merger.generate import generator, steps
from merger.generate.generator import FastGenerator
from merger.plan import make_plan
from merger.recipe import passthrough

from refs import ANY_PATH


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


@pytest.mark.parametrize(
    ("position", "sliding_window"), [(0, None), (15, None), (16, None), (70, None), (70, 4), (70, 16), (63, 40)]
)
def test_flex_decode_attention_reads_the_positions_up_to_the_step(position, sliding_window, monkeypatch):
    monkeypatch.setattr(decode_attention, "FLEX_BLOCK", 16)  # many blocks in a small window
    gen = torch.Generator().manual_seed(position)
    window = 128
    query = torch.randn(1, 6, 1, 16, generator=gen)
    key, value = torch.randn(2, 1, 2, window, 16, generator=gen)
    expected = sdpa_over(query, key, value, attended_slots(window, position, sliding_window), 0.3)
    got = decode_attention.flex_decode_attention(
        query, key, value, torch.tensor([[position]]), scaling=0.3, sliding_window=sliding_window
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("position", "sliding_window"), [(0, None), (15, None), (16, None), (127, None), (70, 4), (70, 40), (31, 16)]
)
def test_decode_block_mask_reads_whole_blocks_only_inside_the_range(position, sliding_window, monkeypatch):
    # the GPU kernel skips unnamed blocks and reads "full" ones unmasked; the CPU's flex_attention
    # applies only the mask function, so the block lists are checked here
    monkeypatch.setattr(decode_attention, "FLEX_BLOCK", 16)
    mask = decode_attention.decode_block_mask(torch.tensor([[position]]), 128, sliding_window)
    partial = set(mask.kv_indices[0, 0, 0, : int(mask.kv_num_blocks[0, 0, 0])].tolist())
    full = set(mask.full_kv_indices[0, 0, 0, : int(mask.full_kv_num_blocks[0, 0, 0])].tolist())
    lo = 0 if sliding_window is None else max(position - sliding_window + 1, 0)
    needed = {slot // 16 for slot in range(lo, position + 1)}
    assert not partial & full and partial | full == needed
    assert all(lo <= block * 16 and block * 16 + 15 <= position for block in full)


@pytest.mark.parametrize("kernel", ["grouped", "flex"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_compiled_step_with_decode_attention_greedy_equals_generate(kernel, fixture, request, monkeypatch):
    ref = str(request.getfixturevalue(fixture))
    model = assemble(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH))
    prompt = torch.tensor([list(range(3, 20))])  # past tiny_gemma's sliding window of 4
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)[0, 17:].tolist()
    graphs = []  # what dynamo traced: the step runs each graph eagerly, without inductor's C++ build

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": record})
    monkeypatch.setattr(decode_attention, "DECODE_KERNEL", kernel)
    monkeypatch.setattr(decode_attention, "FLEX_BLOCK", 16)  # the 17..64 positions cross blocks
    fast = FastGenerator(model, context_tokens=128, compile=True)
    assert model.config.get_text_config(decoder=True)._attn_implementation == decode_attention.IMPLEMENTATION
    assert list(fast.generate(prompt, max_new_tokens=48)) == expected  # its end starts the step's compile
    assert fast.wait_compiled(120) and fast.compile_error is None
    served = {}
    assert list(fast.generate(prompt, max_new_tokens=48, served=served)) == expected
    assert served == {steps.COMPILED_STEP: 47}
    traced = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert graphs and not any("scaled_dot_product_attention" in op for op in traced)
    assert any("flex_attention" in op for op in traced) == (kernel == "flex")


def test_prompts_attend_through_sdpa_without_cudnn_which_plans_every_new_prompt_length(tiny_llama, monkeypatch):
    model = assemble(make_plan(passthrough((str(tiny_llama), 0, 4)), ANY_PATH))
    sdpa, backends_enabled = F.scaled_dot_product_attention, []

    def record(*args, **kwargs):
        backends = torch.backends.cuda
        backends_enabled.append(
            (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled())
        )
        return sdpa(*args, **kwargs)

    assert decode_attention.use_decode_attention(model)  # as a build that decodes on the GPU is
    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    with torch.inference_mode():
        model(torch.tensor([list(range(3, 20))]))
    assert backends_enabled and set(backends_enabled) == {(False, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()  # only while attending: the process's setting is kept


def test_every_attention_the_benchmark_times_equals_sdpa_over_the_slots_in_use(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("decode_attention")  # benchmarks/decode_attention.py, as run
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(1, bench.HEADS, 1, bench.HEAD_DIM, generator=gen)
    key, value = torch.randn(2, 1, bench.KV_HEADS, 256, bench.HEAD_DIM, generator=gen)
    mask = (torch.arange(256) < 100).reshape(1, 1, 1, 256)
    expected = bench.ideal(query, key[:, :, :100], value[:, :, :100], None)
    for name, attention in bench.VARIANTS.items():
        if name == "ideal":  # the reference: it takes only the slots in use
            continue
        torch.testing.assert_close(attention(query, key, value, mask), expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(("capability", "served"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_the_triton_attention_serves_only_gpus_with_bf16_tensor_core_dots(capability, served, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert decode_attention.has_tensor_core_dots(torch.device("cuda", 0)) == served
    assert not decode_attention.has_tensor_core_dots(torch.device("cpu"))
