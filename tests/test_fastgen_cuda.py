"""On a CUDA GPU (skipped elsewhere; run on the lent H200 by benchmarks/gpu_suite.py): the compiled,
fused step, captured in a CUDA graph, gives plain `generate()`'s greedy tokens with each decode
attention, also for two builds of one structure sharing a compiled step; it compiles on its own
thread while replies run on the eager step's graph; its logits repeat bit for bit; sampling runs
inside the graph, seeded; the uncompiled step (a ZeroGPU worker's) in a CUDA graph gives them too."""

import pytest
import torch

from merger.build.assemble import assemble
from merger.generate import attention as decode_attention
from merger.generate.fuse import fuse_projections
from merger.generate.generator import FastGenerator
from merger.generate.steps import COMPILED_STEP, EAGER_STEP, GREEDY, IN_A_CUDA_GRAPH, SAMPLED
from merger.plan import make_plan
from merger.recipe import passthrough

from refs import ANY_PATH

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]
COMPILED_GRAPH, EAGER_GRAPH = COMPILED_STEP + IN_A_CUDA_GRAPH, EAGER_STEP + IN_A_CUDA_GRAPH
SAMPLING = dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02)


def splice(ref: str, dtype: str, ranges=((0, 4), (2, 6)), *, wait: bool = True) -> FastGenerator:
    """[0,4)+[2,6) of `ref` on the GPU, fused, as the page builds it; with `wait`, its step compiled."""
    model = assemble(make_plan(passthrough(*[(ref, a, b) for a, b in ranges]), ANY_PATH), device="cuda", dtype=dtype)
    model.generation_config.pad_token_id = 0
    fuse_projections(model)
    fast = FastGenerator(model, context_tokens=256)
    assert fast.compiled and fast.graphed
    if wait:
        list(fast.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=2))  # starts the compile
        assert fast.wait_compiled(300) and fast.compile_error is None, fast.compile_error
        assert fast.serving == COMPILED_GRAPH
    return fast


@pytest.fixture(scope="module")
def fast_bf16(tiny_llama):
    return splice(str(tiny_llama), "bfloat16")


def expected_greedy(fast: FastGenerator, new_tokens: int = 64) -> list[int]:
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        out = fast.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def reply(fast: FastGenerator, new_tokens: int = 64, **settings) -> tuple[list[int], dict[str, int]]:
    served = {}
    tokens = list(
        fast.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=new_tokens, served=served, **settings)
    )
    return tokens, served


@pytest.mark.parametrize("kernel", ["grouped", "flex", "triton"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_compiled_step_in_a_cuda_graph_gives_generates_greedy_tokens(kernel, fixture, request, monkeypatch):
    monkeypatch.setattr(decode_attention, "DECODE_KERNEL", kernel)  # read when the step is traced
    fast = splice(str(request.getfixturevalue(fixture)), "float32")
    tokens, served = reply(fast)
    assert tokens == expected_greedy(fast) and served == {COMPILED_GRAPH: 63}


def test_a_step_compiling_in_the_background_blocks_no_reply(tiny_llama, tiny_llama_b):
    # the other build's compiled graph replies while this one compiles; this one replies on its
    # eager step's graph meanwhile, and on its compiled graph from the next token after it is ready
    other = splice(str(tiny_llama_b), "float32", ((0, 3), (1, 6)))
    fresh = splice(str(tiny_llama), "float32", ((0, 5), (1, 6)), wait=False)  # a structure of its own
    expected = expected_greedy(fresh, 128)
    assert reply(fresh, 2)[0] == expected[:2]  # its end starts the step's compile
    tokens = fresh.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=128)
    first = [next(tokens) for _ in range(16)]
    assert fresh.compiling_for() is not None
    assert reply(other) == (expected_greedy(other), {COMPILED_GRAPH: 63})
    assert first + list(tokens) == expected
    assert fresh.wait_compiled(300) and fresh.compile_error is None
    assert reply(fresh, 128) == (expected, {COMPILED_GRAPH: 127})


def test_builds_of_one_structure_share_a_compiled_step_each_decoding_its_own_weights(tiny_llama, tiny_llama_b):
    # the second build reuses the first one's compiled code: its CUDA graph must read its own weights
    first = splice(str(tiny_llama), "float32")
    second = splice(str(tiny_llama_b), "float32")  # the same structure, other weights
    assert second.reuses_compiled_step
    expected = [expected_greedy(first, 32), expected_greedy(second, 32)]
    assert expected[0] != expected[1]
    for _ in range(2):  # in turn, as a side-by-side comparison runs them
        assert [reply(fast, 32)[0] for fast in (first, second)] == expected


def uncompiled_splice(ref: str, dtype: str, graphed: bool = True) -> FastGenerator:
    """An unfused, uncompiled [0,4)+[2,6), as a ZeroGPU worker decodes it."""
    model = assemble(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH), device="cuda", dtype=dtype)
    model.generation_config.pad_token_id = 0
    fast = FastGenerator(model, context_tokens=256, compile=False)
    assert fast.graphed and not fast.compiled
    fast.graphed = graphed
    return fast


@pytest.mark.parametrize("kernel", ["grouped", "triton"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_uncompiled_step_captured_in_a_cuda_graph_gives_generates_greedy_tokens(kernel, fixture, request, monkeypatch):
    monkeypatch.setattr(decode_attention, "DECODE_KERNEL", kernel)
    fast = uncompiled_splice(str(request.getfixturevalue(fixture)), "float32")
    expected = expected_greedy(fast)
    for _ in range(2):  # the second generation replays the graph from its first step on
        assert reply(fast) == (expected, {EAGER_GRAPH: 63}), fast.compile_error


def test_bf16_step_captured_in_a_cuda_graph_gives_the_eager_steps_tokens_bit_for_bit(tiny_llama):
    graphed, eager = (uncompiled_splice(str(tiny_llama), "bfloat16", graphed=g) for g in (True, False))
    expected = reply(eager, 128)[0]
    assert reply(graphed, 128) == (expected, {EAGER_GRAPH: 127}), graphed.compile_error
    assert reply(graphed, 128)[0] == expected


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampling_inside_the_cuda_graph_draws_what_the_eager_step_draws(tiny_llama, penalty):
    # the same settings and seed: the graph's pick reads the same logits, settings and draws
    graphed, eager = (uncompiled_splice(str(tiny_llama), "float32", graphed=g) for g in (True, False))
    settings = dict(SAMPLING, repetition_penalty=penalty, seed=5)
    expected = reply(eager, 128, **settings)[0]
    assert reply(graphed, 128, **settings) == (expected, {EAGER_GRAPH: 127})
    assert len(set(expected)) > 8  # it samples, rather than repeating the greedy choice


def test_compiled_step_logits_repeat_bit_for_bit(fast_bf16):
    logits = []
    for _ in range(3):
        reply(fast_bf16, 64)
        logits.append(fast_bf16._step.logits[GREEDY].clone())  # the graph's output: the last step's logits
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_seeded_sampling_in_the_compiled_graph_repeats(fast_bf16, penalty):
    settings = dict(SAMPLING, repetition_penalty=penalty)
    first, served = reply(fast_bf16, 128, seed=5, **settings)
    assert served == {COMPILED_GRAPH: 127} and SAMPLED in fast_bf16._step.graphs
    for _ in range(2):
        assert reply(fast_bf16, 128, seed=5, **settings)[0] == first
    assert reply(fast_bf16, 128, seed=6, **settings)[0] != first
