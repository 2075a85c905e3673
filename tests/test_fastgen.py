"""The fast decode path gives plain `generate()`'s greedy tokens, before and after fusing projections,
and before, while and after its step compiles in the background; sampling is seeded; stop ids stop."""

import gc
import threading
import time
import weakref

import pytest
import torch

from merger.build.assemble import assemble, parameter_bytes
from merger.generate import compiler, generator
from merger.generate.fuse import fuse_projections
from merger.generate.generator import FastGenerator
from merger.generate.sampling import SamplingState, sample
from merger.generate.steps import COMPILED_STEP, EAGER_STEP
from merger.plan import make_plan
from merger.recipe import passthrough

from refs import ANY_PATH
from tiny import tiny_model


def build(ref: str, *ranges: tuple[int, int], dtype: str | None = None):
    return assemble(make_plan(passthrough(*[(ref, a, b) for a, b in ranges], dtype=dtype), ANY_PATH))


def eos_ids(model) -> list[int]:
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def assert_each_token_is_generates_choice(model, prompt: list[int], got: list[int], new_tokens: int) -> None:
    """Every token of `got`, a greedy reply to `prompt`, is plain generate()'s greedy choice after the
    same tokens, or ties it: its logit within the model's dtype's rounding of generate()'s largest.
    The fast path attends over a static window where generate() grows its cache, so in bf16 a logit
    one rounding step away can rank the other way; after such a tie generate() goes on from `got`'s
    token, so every token is checked."""
    done = 0
    while True:
        ids = torch.tensor([prompt + got[:done]])
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=new_tokens - done, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        expected, rest = out.sequences[0, ids.shape[1] :].tolist(), got[done:]
        differ = next((i for i, (want, have) in enumerate(zip(expected, rest, strict=False)) if want != have), None)
        if differ is None:  # generate() stops at the model's EOS (and returns it), as the fast path does
            assert rest == expected
            return
        scores = out.scores[differ][0]
        rounding = torch.finfo(model.dtype).eps * scores.max().abs()
        assert scores.max() - scores[rest[differ]] <= rounding, f"token {done + differ}: {rest[differ]} is not a tie"
        done += differ + 1


def assert_greedy_follows_generate(model, prompt: list[int], new_tokens: int = 64, fuse: bool = True) -> list[int]:
    """The fast path's greedy reply follows plain generate() on the model as built (each token its
    choice or a tie: assert_each_token_is_generates_choice), unfused and (if `fuse`) fused."""
    ids = torch.tensor([prompt])
    fast = FastGenerator(model, context_tokens=len(prompt) + new_tokens)
    assert not fast.compiled  # the CPU runs the same loop uncompiled
    got = list(fast.generate(ids, max_new_tokens=new_tokens, stop_ids=eos_ids(model)))
    assert_each_token_is_generates_choice(model, prompt, got, new_tokens)
    if not fuse:
        return got
    memory = parameter_bytes(model)
    assert fuse_projections(model) > 0
    assert parameter_bytes(model) == memory  # the originals became views of the fused matrices
    fused = list(fast.generate(ids, max_new_tokens=new_tokens, stop_ids=eos_ids(model)))
    assert_each_token_is_generates_choice(model, prompt, fused, new_tokens)
    return got


@pytest.mark.parametrize(
    ("ref", "ranges", "prompt", "fuse"),
    [
        ("bundled:smollm2-135m-instruct", [(0, 20), (10, 30)], [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173], True),
        # Gemma's fused MLP is checked on the tiny model: its 262k-token head makes every pass cost
        ("bundled:gemma3-270m", [(0, 12), (8, 18)], [2, 651, 6037, 563, 9079, 236761, 107], False),
    ],
)
def test_bundled_splice_greedy_follows_generate_up_to_ties(ref, ranges, prompt, fuse):
    got = assert_greedy_follows_generate(build(ref, *ranges), prompt, fuse=fuse)
    assert len(got) == 64  # neither stops early on these prompts: all 64 tokens are compared


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: as every GPU build runs, here on the CPU
def test_tiny_llama_splice_greedy_follows_generate_up_to_ties(tiny_llama, dtype):
    model = build(str(tiny_llama), (0, 4), (2, 6), dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    assert_greedy_follows_generate(model, [1, 5, 9, 13, 17, 21])


def test_fused_duplicated_layer_stays_shared(tiny_llama):
    model = build(str(tiny_llama), (0, 4), (2, 6))  # depth 4 repeats parent layer 2
    assert fuse_projections(model) == 2 * 8
    layers = model.model.layers
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(layers[4].self_attn, name).weight is getattr(layers[2].self_attn, name).weight
    assert layers[4].self_attn.qkv_weight is layers[2].self_attn.qkv_weight
    assert layers[4].mlp.gate_up_weight is layers[2].mlp.gate_up_weight
    assert layers[3].mlp.gate_up_weight is not layers[2].mlp.gate_up_weight
    assert "model.layers.4.self_attn.qkv_weight" not in model.state_dict()  # checkpoint names unchanged


def test_tiny_gemma3_past_its_sliding_window_equals_generate(tiny_gemma):
    # window 4: most of the 64 steps see a truncated window, through full-length static layers
    assert_greedy_follows_generate(build(str(tiny_gemma), (0, 8), (4, 12)), list(range(3, 20)))


@pytest.fixture(scope="module")
def tiny_fast(tiny_llama):
    return FastGenerator(build(str(tiny_llama), (0, 4), (2, 6)), context_tokens=64)


def test_seeded_sampling_is_reproducible(tiny_fast):
    ids = torch.tensor([[1, 5, 9, 13]])
    settings = dict(max_new_tokens=32, temperature=1.0, top_p=0.95, top_k=100, min_p=0.01)
    first = list(tiny_fast.generate(ids, seed=7, **settings))
    assert list(tiny_fast.generate(ids, seed=7, **settings)) == first
    assert list(tiny_fast.generate(ids, seed=8, **settings)) != first
    assert len(set(first)) > 4  # it samples, rather than repeating the greedy choice


@pytest.mark.parametrize("narrowing", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_sampling_narrowed_to_one_token_is_greedy(tiny_fast, narrowing):
    ids = torch.tensor([[1, 5, 9, 13]])
    greedy = list(tiny_fast.generate(ids, max_new_tokens=16))
    assert list(tiny_fast.generate(ids, max_new_tokens=16, temperature=1.5, seed=3, **narrowing)) == greedy


def test_stop_ids_end_generation_after_the_stop_token(tiny_fast):
    ids = torch.tensor([[1, 5, 9, 13]])
    full = list(tiny_fast.generate(ids, max_new_tokens=32, temperature=1.0, seed=1))
    stop = full[10]
    stopped = list(tiny_fast.generate(ids, max_new_tokens=32, temperature=1.0, seed=1, stop_ids=[stop]))
    assert stopped == full[: full.index(stop) + 1]


def test_sample_keeps_to_the_top_k():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, temperature=1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert drawn == {1, 2}


def test_sampling_past_its_draws_wraps_instead_of_reading_out_of_range():
    # on a GPU an out-of-range read is a device-side assert, fatal to every reply of the process
    state = SamplingState(vocab=5, rows=2, device=torch.device("cpu"))
    state.start(torch.tensor([[0]]), temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
    state.refill(torch.Generator().manual_seed(0))
    for _ in range(5):  # more draws than the two rows hold, as a step that skipped its refill would take
        assert 0 <= int(state.pick(torch.zeros(1, 5))) < 5


def test_too_long_a_request_is_refused(tiny_fast):
    with pytest.raises(ValueError, match="context_tokens"):
        next(tiny_fast.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=62))


def test_sample_applies_top_p_within_the_top_k():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    gen = torch.Generator().manual_seed(0)
    top3 = {int(sample(logits, temperature=1.0, top_k=3, generator=gen)) for _ in range(300)}
    assert top3 == {1, 2, 4}
    # among those three (p ~ 0.37, 0.33, 0.30) the first two already hold top_p = 0.6
    nucleus = {int(sample(logits, temperature=1.0, top_k=3, top_p=0.6, generator=gen)) for _ in range(300)}
    assert nucleus == {1, 2}


def test_step_that_fails_to_compile_runs_eagerly(tiny_llama, monkeypatch):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no kernel for this architecture")

    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": failing_backend})
    model = build(str(tiny_llama), (0, 4), (2, 6))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 4:].tolist()
    fast = FastGenerator(model, context_tokens=64, compile=True)
    assert list(fast.generate(ids, max_new_tokens=24)) == expected
    assert fast.wait_compiled(60)
    served = {}
    assert list(fast.generate(ids, max_new_tokens=24, served=served)) == expected
    assert not fast.compiled and "no kernel for this architecture" in fast.compile_error
    assert served == {EAGER_STEP: 23}


def tiny_llama_of_depth(layers: int, seed: int = 0):
    # no EOS: generate() would refuse it before min_new_tokens, the fast path emit it
    return tiny_model("llama", layers, seed, vocab_size=97, eos_token_id=None, pad_token_id=0)


class CountingBackend:
    """A torch.compile backend that runs the traced graph eagerly and counts graphs and calls;
    each compile waits for `release` (set by default)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0
        self.compiled: list[weakref.ref] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, graph_module, example_inputs):
        self.release.wait(60)
        self.graphs += 1
        backend = self

        class Compiled:
            def __call__(self, *args):
                backend.calls += 1
                return graph_module.forward(*args)

        compiled = Compiled()
        self.compiled.append(weakref.ref(compiled))
        return compiled


def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def compiled_generator(model, context_tokens: int = 32) -> FastGenerator:
    """A generator whose step has compiled (its first generation starts the compile)."""
    fast = FastGenerator(model, context_tokens=context_tokens, compile=True)
    list(fast.generate(torch.tensor([[1]]), max_new_tokens=2))
    assert fast.wait_compiled(60) and fast.compile_error is None
    return fast


def test_every_model_structure_gets_a_compiled_step(monkeypatch):
    # dynamo stops compiling one code object after 8 entries: a ninth depth would run eagerly
    backend = CountingBackend()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    ids = torch.tensor([[1, 5, 9]])
    for layers in range(1, 12):
        fast = FastGenerator(tiny_llama_of_depth(layers), context_tokens=32, compile=True)
        assert not fast.reuses_compiled_step
        list(fast.generate(ids, max_new_tokens=2))
        assert fast.wait_compiled(60) and fast.compile_error is None
        calls = backend.calls
        served = {}
        assert list(fast.generate(ids, max_new_tokens=6, served=served)) == greedy(fast.model, ids, 6)
        assert backend.calls - calls == 5 and served == {COMPILED_STEP: 5}, (
            f"{layers} layers: steps did not run compiled"
        )
        del fast
        gc.collect()
    assert backend.graphs == 11


def test_models_of_one_structure_share_a_compiled_step_with_their_own_weights(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    ids = torch.tensor([[1, 5, 9]])
    first = compiled_generator(tiny_llama_of_depth(3, seed=1))
    replies = [list(first.generate(ids, max_new_tokens=8))]
    second = compiled_generator(tiny_llama_of_depth(3, seed=2))
    replies.append(list(second.generate(ids, max_new_tokens=8)))
    replies.append(list(first.generate(ids, max_new_tokens=8)))  # both alive, in turn
    assert replies == [greedy(first.model, ids, 8), greedy(second.model, ids, 8), greedy(first.model, ids, 8)]
    assert replies[0] != replies[1] and backend.graphs == 1
    assert not first.reuses_compiled_step and second.reuses_compiled_step
    assert first.serving == second.serving == COMPILED_STEP


def test_merges_of_one_depth_repeating_other_layers_get_their_own_compiled_step(tiny_llama, monkeypatch):
    # a step compiled where layers 4-5 repeat 2-3 takes them as one input: it cannot serve 5-6 repeating 3-4
    backend = CountingBackend()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    ids = torch.tensor([[1, 5, 9]])
    for ranges in (((0, 4), (2, 6)), ((0, 5), (3, 6))):
        fast = FastGenerator(build(str(tiny_llama), *ranges), context_tokens=32, compile=True)
        assert not fast.reuses_compiled_step
        list(fast.generate(ids, max_new_tokens=2))
        assert fast.wait_compiled(60) and fast.compile_error is None
        assert list(fast.generate(ids, max_new_tokens=6)) == greedy(fast.model, ids, 6)
    assert backend.graphs == 2


def test_compiled_step_is_freed_with_its_last_generator(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    fast = compiled_generator(tiny_llama_of_depth(2, seed=3))
    assert backend.compiled and all(ref() is not None for ref in backend.compiled)
    del fast
    gc.collect()
    assert all(ref() is None for ref in backend.compiled)


def test_a_compiling_step_blocks_no_reply_and_takes_over_at_the_next_token_once_ready(monkeypatch):
    # the compile runs on its own thread: its model's reply and another model's go on meanwhile
    backend = CountingBackend()
    backend.release.clear()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    ids = torch.tensor([[1, 5, 9]])
    fresh = FastGenerator(tiny_llama_of_depth(2, seed=6), context_tokens=64, compile=True)
    other = FastGenerator(tiny_llama_of_depth(2, seed=7), context_tokens=64)  # not compiled: eager
    expected = greedy(fresh.model, ids, 40)
    assert list(fresh.generate(ids, max_new_tokens=2)) == expected[:2]  # its end starts the compile
    served = {}
    tokens = fresh.generate(ids, max_new_tokens=40, served=served)
    got = [next(tokens) for _ in range(10)]
    assert fresh.compiling_for() is not None and fresh.serving == EAGER_STEP  # waiting for `release`
    assert list(other.generate(ids, max_new_tokens=12)) == greedy(other.model, ids, 12)
    backend.release.set()
    assert fresh.wait_compiled(60) and fresh.compiling_for() is None
    got += list(tokens)
    assert got == expected
    assert served[EAGER_STEP] >= 9 and served[COMPILED_STEP] >= 1 and sum(served.values()) == 39
    assert fresh.serving == COMPILED_STEP


class BusyBackend(CountingBackend):
    """A backend whose compile keeps the compiler thread busy in Python, as dynamo's trace does,
    noting the time of each round, until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release.clear()
        self.rounds: list[float] = []

    def __call__(self, graph_module, example_inputs):
        while not self.release.is_set():
            self.rounds.append(time.perf_counter())
            sum(range(50))
        return super().__call__(graph_module, example_inputs)


PROMPTS_FIRST = pytest.mark.skipif(
    not hasattr(threading, "setprofile_all_threads"), reason="the compile's wait needs Python 3.12 (a Space's)"
)


@PROMPTS_FIRST
def test_a_compile_waits_while_another_replys_prompt_runs(monkeypatch):
    # every torch call of a prompt's pass gives the GIL up; a compile taking it between them made a
    # visitor's first text 30x later on the H200: the compile waits until the prompt has run
    backend = BusyBackend()
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": backend})
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    fresh = FastGenerator(tiny_llama_of_depth(2, seed=10), context_tokens=64, compile=True)
    other = FastGenerator(tiny_llama_of_depth(4, seed=11), context_tokens=64)
    expected = greedy(other.model, ids, 4)
    prompts = []  # (start, end) of each pass of the other's prompt
    forward = other.model.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            prompts.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(other.model, "forward", timed_forward)
    list(fresh.generate(ids, max_new_tokens=2))  # its end starts the compile
    try:
        while not backend.rounds:
            time.sleep(0.01)
        for _ in range(5):
            assert list(other.generate(ids, max_new_tokens=4)) == expected
        time.sleep(0.1)
        assert fresh.compiling_for() is not None
    finally:
        backend.release.set()
    assert fresh.wait_compiled(60) and fresh.compile_error is None
    assert len(prompts) == 5
    for start, end in prompts:  # one round may be under way as the prompt starts
        assert sum(start < t < end for t in backend.rounds) <= 1
    assert any(t > prompts[-1][1] for t in backend.rounds)  # and it went on after


@PROMPTS_FIRST
def test_a_compile_waits_for_one_prompt_at_most_its_limit(monkeypatch):
    # the compile may hold a lock the prompt needs (a logging handler's, an import's): it waits
    # PROMPT_WAIT_S at most, then goes on
    monkeypatch.setattr(compiler, "PROMPT_WAIT_S", 0.05)
    rounds, stop, done = [], threading.Event(), threading.Event()

    def busy_job() -> None:
        while not stop.is_set():
            rounds.append(time.perf_counter())
            sum(range(50))
        done.set()

    compiler.COMPILER.submit(busy_job)
    try:
        while not rounds:
            time.sleep(0.01)
        with compiler.COMPILER.replies_first():
            start = time.perf_counter()
            time.sleep(0.5)
    finally:
        stop.set()
    assert done.wait(10)
    assert sum(start < t < start + 0.04 for t in rounds) <= 1  # it waited
    assert any(t > start + 0.1 for t in rounds if t < start + 0.5)  # then went on


def test_the_compile_starts_when_the_first_reply_after_the_warm_up_ends_never_during_it(monkeypatch):
    # the compile's first seconds starve a reply sharing them (a 135M model's first token here took
    # 1.5 s instead of 0.3 s): a build's warm-up leaves the compile to its first reply's end, and a
    # reply closed early (Stop) starts it too
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": CountingBackend()})
    ids = torch.tensor([[1, 5, 9]])
    fast = FastGenerator(tiny_llama_of_depth(2, seed=9), context_tokens=64, compile=True)
    assert list(fast.generate(ids, max_new_tokens=2, start_compile=False)) == greedy(fast.model, ids, 2)
    reply = fast.generate(ids, max_new_tokens=24)
    first = [next(reply) for _ in range(12)]
    assert fast.compiling_for() is None and not fast.wait_compiled(0)  # not begun
    reply.close()
    assert fast.wait_compiled(60) and fast.compile_error is None
    assert first == greedy(fast.model, ids, 12)
    served = {}
    assert list(fast.generate(ids, max_new_tokens=24, served=served)) == greedy(fast.model, ids, 24)
    assert served == {COMPILED_STEP: 23}


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_compiled_step_samples_as_the_eager_step_does(monkeypatch, penalty):
    # the same seed through the compiled step: its picks read the same draws and settings
    monkeypatch.setattr(generator, "STEP_COMPILE", {"backend": CountingBackend()})
    model = tiny_llama_of_depth(2, seed=8)
    settings = dict(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=20, min_p=0.02, repetition_penalty=penalty)
    eager = list(FastGenerator(model, context_tokens=64).generate(torch.tensor([[1, 5, 9]]), seed=4, **settings))
    served = {}
    fast = compiled_generator(model, 64)
    assert list(fast.generate(torch.tensor([[1, 5, 9]]), seed=4, served=served, **settings)) == eager
    assert served == {COMPILED_STEP: 23}
