"""On a CUDA GPU (skipped elsewhere; run on the lent H200): the compiled, fused step gives plain
`generate()`'s greedy tokens with each decode attention, also for two models of one structure
sharing a compiled step, its logits repeat bit for bit, and a seed repeats a sampled reply; the
uncompiled step (a ZeroGPU worker's) captured in a CUDA graph gives them too."""

import pytest
import torch

from merger import decode_attention
from merger.assemble import assemble
from merger.fastgen import FastGenerator, _CapturedStep, fuse_projections
from merger.plan import make_plan
from merger.recipe import passthrough

from refs import ANY_PATH

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]


def compiled_splice(ref: str, dtype: str, ranges=((0, 4), (2, 6))) -> FastGenerator:
    model = assemble(make_plan(passthrough(*[(ref, a, b) for a, b in ranges]), ANY_PATH), device="cuda", dtype=dtype)
    model.generation_config.pad_token_id = 0
    fuse_projections(model)
    fast = FastGenerator(model, max_seq_len=256)
    assert fast.compiled
    return fast


@pytest.fixture(scope="module")
def fast_bf16(tiny_llama):
    return compiled_splice(str(tiny_llama), "bfloat16")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@pytest.mark.parametrize("kernel", ["grouped", "flex", "triton"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_compiled_step_greedy_equals_generate_on_cuda(kernel, fixture, request, monkeypatch):
    monkeypatch.setattr(decode_attention, "DECODE_KERNEL", kernel)  # read when the step is traced
    fast = compiled_splice(str(request.getfixturevalue(fixture)), "float32")
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        expected = fast.model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    got = list(fast.generate(ids, max_new_tokens=64))
    assert first_difference(got, expected[0, len(PROMPT) :].tolist()) is None


def uncompiled_splice(ref: str, dtype: str, graphed: bool = True) -> FastGenerator:
    """An unfused, uncompiled [0,4)+[2,6), as a ZeroGPU worker decodes it."""
    model = assemble(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH), device="cuda", dtype=dtype)
    model.generation_config.pad_token_id = 0
    fast = FastGenerator(model, max_seq_len=256, compile=False)
    assert fast.graphed and not fast.compiled
    fast.graphed = graphed
    return fast


@pytest.mark.parametrize("kernel", ["grouped", "triton"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_uncompiled_step_captured_in_a_cuda_graph_gives_generates_greedy_tokens(kernel, fixture, request, monkeypatch):
    monkeypatch.setattr(decode_attention, "DECODE_KERNEL", kernel)
    fast = uncompiled_splice(str(request.getfixturevalue(fixture)), "float32")
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        expected = fast.model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, len(PROMPT) :]
    for _ in range(2):  # the second generation replays the graph from its first step on
        got = list(fast.generate(ids, max_new_tokens=64))
        assert isinstance(fast._step, _CapturedStep), fast.compile_error
        assert first_difference(got, expected.tolist()) is None


def test_bf16_step_captured_in_a_cuda_graph_gives_the_eager_steps_tokens_bit_for_bit(tiny_llama):
    graphed, eager = (uncompiled_splice(str(tiny_llama), "bfloat16", graphed=g) for g in (True, False))
    ids = torch.tensor([PROMPT], device="cuda")
    expected = list(eager.generate(ids, max_new_tokens=128))
    assert list(graphed.generate(ids, max_new_tokens=128)) == expected
    assert isinstance(graphed._step, _CapturedStep), graphed.compile_error
    assert list(graphed.generate(ids, max_new_tokens=128)) == expected


def test_models_of_one_structure_sharing_a_compiled_step_each_decode_their_own_weights(tiny_llama):
    # the second build reuses the first one's compiled code: its CUDA graph must read its own weights
    ids = torch.tensor([PROMPT], device="cuda")
    first = compiled_splice(str(tiny_llama), "float32", ((0, 4), (2, 6)))
    list(first.generate(ids, max_new_tokens=4))
    second = compiled_splice(str(tiny_llama), "float32", ((0, 3), (1, 6)))  # 8 layers, other seams
    assert second.reuses_compiled_step
    with torch.inference_mode():
        expected = [
            fast.model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(PROMPT) :].tolist()
            for fast in (first, second)
        ]
    assert expected[0] != expected[1]
    for _ in range(2):  # in turn, as a side-by-side comparison runs them
        for fast, tokens in zip((first, second), expected, strict=True):
            assert first_difference(list(fast.generate(ids, max_new_tokens=32)), tokens) is None


def test_compiled_step_logits_repeat_bit_for_bit(fast_bf16):
    ids = torch.tensor([PROMPT], device="cuda")
    token, position = ids[:, -1:].clone(), torch.tensor([[len(PROMPT)]], device="cuda")
    list(fast_bf16.generate(ids, max_new_tokens=4))  # compiled and recorded
    logits = []
    with torch.inference_mode():
        for _ in range(3):
            fast_bf16.prefill(ids)
            logits.append(fast_bf16.step(token, position))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_seeded_sampling_repeats_on_cuda(fast_bf16, penalty):
    ids = torch.tensor([PROMPT], device="cuda")
    settings = dict(max_new_tokens=128, temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, repetition_penalty=penalty)
    first = list(fast_bf16.generate(ids, seed=5, **settings))
    for _ in range(2):
        assert first_difference(list(fast_bf16.generate(ids, seed=5, **settings)), first) is None
    assert list(fast_bf16.generate(ids, seed=6, **settings)) != first
