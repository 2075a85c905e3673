"""Fast decoding for built models, in the gpt-fast style (DESIGN.md, "On the lent GPU").

A few structural choices instead of `generate()`'s machinery:
- one static KV cache, allocated once per generator and reset in place, so every decode step sees
  the same tensor addresses;
- the prompt runs eagerly (prefill); on one GPU the one-token step, the next token's choice
  included (`merger.generate.sampling`: greedy or sampled, settings read from the device), is captured in
  a CUDA graph and replayed: one launch per token. The step is first the eager one, so replies
  start right after a build; it is compiled meanwhile on a thread of its own (`compiler.COMPILER`), then
  captured likewise and takes over at the next token. Its attention is
  `merger.generate.attention`'s, which reads only the cached keys and values in use. Where it is
  not compiled (a ZeroGPU worker forbids torch.compile), the eager step's graph serves;
- the host reads tokens back only every `chunk` tokens, while the GPU already works on the next
  chunk: no sync per token, so the CPU stays ahead of the GPU. Stop tokens are checked on those reads.
On the CPU the same loop runs without graphs, reading every token back (syncs cost nothing there).

The step itself and its forms are in `steps`; `fuse` is the build-time half (one q/k/v and one
gate/up matrix per layer, so a step launches fewer, larger kernels); `loop` runs every reply.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from merger.errors import exception_line
from merger.generate.attention import use_decode_attention
from merger.generate.compiler import COMPILER
from merger.generate.linear import use_decode_linear
from merger.generate.steps import (
    AHEAD_OF_TIME_STEP,
    COMPILED_STEP,
    EAGER_STEP,
    GREEDY,
    SAMPLED,
    DecodeState,
    Step,
    StepInputs,
    allocated_static_cache,
    capture_step,
    decode,
    forward_one,
    static_cache,
    step_code_for,
)

if TYPE_CHECKING:
    from merger.generate.aot import AotStep


log = logging.getLogger(__name__)
CUDA_CHUNK = 8  # tokens between host reads on a GPU: a read ends the queue's run-ahead, so read rarely

# Inductor's code alone, without its CUDA graphs: the step is captured in a CUDA graph by hand
# (`capture_step`), which any thread may replay, so it compiles on the compiler thread while replies go
# on. No gpt-fast coordinate-descent tuning, which turns batch-1 matrix products into inductor
# reductions: cuBLAS's kernels read the weights faster on the H200, and the first compile took 42 s
# instead of 104 (README, "Benchmarks"; benchmarks/results/generation-h200-*-triton-c and -cublas-d)
STEP_COMPILE: dict[str, Any] = {"options": {"triton.cudagraphs": False}}


@dataclass
class _Chunk:
    start: int
    end: int
    ready: torch.cuda.Event | None  # None on the CPU: already there


class FastGenerator:
    """Batch-1 streaming generation over one model with a static cache of `context_tokens` positions (its KV capacity).

    Not reentrant: one generation at a time per generator (they share the cache). `compile`
    defaults to True on CUDA: the step is then compiled on the compiler thread (tens of seconds for
    an 8B model; at once for a structure compiled before) while generation runs on the eager step,
    and the first step after the compile is ready runs compiled. On one GPU every step form is
    captured in a CUDA graph at its first use and replayed after (one launch per token; setting
    `graphed` False before the first step keeps it eager). A model dispatched over several devices
    runs eagerly by default (CUDA graphs would span devices, and compiling over 100 layers takes
    minutes); each layer's cache lives on that layer's device. A step that fails to compile or be
    captured leaves the form before it serving: slower, never broken; `compile_error` says why.

    With `aot_step` (`merger.generate.aot`: where torch.compile is forbidden) the step is that package,
    loaded with this model's weights, and nothing compiles here; a package that fails to load
    leaves the step eager (in a CUDA graph on one GPU).
    """

    def __init__(
        self, model: nn.Module, *, context_tokens: int, compile: bool | None = None, aot_step: AotStep | None = None
    ) -> None:
        self.model = model
        self.context_tokens = context_tokens
        self.device = next(model.parameters()).device
        spread = len({p.device for p in model.parameters()}) > 1  # dispatched over several devices
        one_gpu = self.device.type == "cuda" and not spread
        self.chunk = CUDA_CHUNK if self.device.type == "cuda" else 1
        # a step compiled ahead of time takes the cache's tensors as inputs: allocated now
        allocated = aot_step is not None
        cache = (
            allocated_static_cache(model, context_tokens) if allocated else static_cache(model.config, context_tokens)
        )
        self.inputs = StepInputs(model, cache)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.state = DecodeState(vocab, context_tokens, self.chunk, self.device)
        self.compile_error: str | None = None
        self.ahead_of_time = False  # the step is a package compiled ahead of time
        self._step = Step(forward_one, EAGER_STEP)
        if aot_step is not None:
            self._bind(aot_step)
        self.graphed = one_gpu and not self.ahead_of_time
        self.compiled = not self.ahead_of_time and (one_gpu if compile is None else compile)
        self._compiled: Step | None = None  # the compiled step, once ready, until the next step takes it up
        self._compile_lock = threading.Lock()
        self._compile_started: float | None = None  # time.monotonic() when its compile began
        self._compile_done = threading.Event()
        self._generator: torch.Generator | None = None  # the request's draws
        self._capture_stream: torch.cuda.Stream | None = None
        # True when an earlier model of this structure compiled the step: its compile takes no time
        self.reuses_compiled_step = False
        if self.compiled or self.graphed:
            use_decode_attention(model)  # the compiled step reads each cached key and value once
        if self.compiled and one_gpu:
            use_decode_linear(model)  # the compiled step's products of one row run the GEMV kernel
        if self.compiled:
            self._step_code = step_code_for(model)
            self.reuses_compiled_step = self._step_code.compiled_once
        else:
            self._compile_done.set()

    @property
    def cache(self) -> Cache:
        return self.inputs.cache

    @property
    def serving(self) -> str:
        """The step form the next token runs on (EAGER_STEP, COMPILED_STEP, ...; IN_A_CUDA_GRAPH added)."""
        return (self._compiled or self._step).form(GREEDY, self.graphed)

    def compiling_for(self) -> float | None:
        """Seconds the step's compile has run so far; None when none runs (not begun, or done)."""
        started = self._compile_started
        return None if started is None or self._compile_done.is_set() else time.monotonic() - started

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the step's compile to end (ready or failed); False on timeout. It starts when the
        first generation that may start it ends (`generate`)."""
        return self._compile_done.wait(timeout)

    def _bind(self, aot_step: AotStep) -> None:
        try:
            bound = aot_step.bind(self.model, self.cache)
        except Exception as exc:
            self.compile_error = exception_line(exc)
            log.warning("decode step compiled ahead of time did not load, running without it: %s", self.compile_error)
            return
        self._step = Step(lambda inputs, token, position: bound(token, position), AHEAD_OF_TIME_STEP)
        self.ahead_of_time = True

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        served: dict[str, int] | None = None,
        start_compile: bool = True,
        **sampling: float,
    ) -> Iterator[int]:
        """Yield new token ids as they arrive; a stop id is yielded, then generation ends. `served`
        counts the steps of each form (`serving`) the reply ran on. `sampling`: the rest of a
        GenerationSettings, as SamplingState.start takes it (none: greedy).

        The step's compile starts when the first generation with `start_compile` ends (finished or
        closed), never during one: its first seconds (dynamo's trace) hold the GIL in stretches no
        switch interval breaks, and a reply sharing them waited seconds for its first token (README,
        Benchmarks). A build's warm-up passes False, so the first reply runs alone and the compile
        runs while its reader reads."""
        prompt = input_ids.reshape(1, -1).to(self.device)  # [1, T]
        length = prompt.shape[1]
        if length == 0 or max_new_tokens < 1:
            raise ValueError("generation needs a non-empty prompt and max_new_tokens >= 1")
        if length + max_new_tokens > self.context_tokens:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds context_tokens ({self.context_tokens})"
            )
        try:
            yield from self._tokens(prompt, max_new_tokens, seed, stop_ids, {} if served is None else served, sampling)
        finally:
            if start_compile and self.compiled and self._compile_started is None:
                self._compile_started = time.monotonic()
                COMPILER.submit(functools.partial(self._compile, weakref.ref(self)))

    def _tokens(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        seed: int,
        stop_ids: Sequence[int],
        served: dict[str, int],
        sampling: dict[str, float],
    ) -> Iterator[int]:
        """`generate`'s tokens."""
        mode = self.start(prompt, seed=seed, **sampling)
        stops = set(stop_ids)
        tokens = self.state.tokens
        host = tokens if self.device.type == "cpu" else torch.empty_like(tokens, device="cpu").pin_memory()
        pending = self._to_host(tokens, host, 0, 1)  # the first token alone: time to first token
        done = 1
        while pending is not None:
            ahead = None
            if done < max_new_tokens:  # queue the next chunk before waiting for the previous one
                end = min(done + self.chunk, max_new_tokens)
                self.draw_ahead(mode)
                for _ in range(done, end):
                    form = self.advance(mode)
                    served[form] = served.get(form, 0) + 1
                ahead = self._to_host(tokens, host, done, end)
                done = end
            if pending.ready is not None:
                pending.ready.synchronize()
            for token in host[pending.start : pending.end].tolist():
                yield token
                if token in stops:
                    return
            pending = ahead

    def start(self, prompt: torch.Tensor, *, seed: int = 0, **sampling: float) -> str:
        """A request's prompt [1, T] through the model (`prefill`) and its first new token chosen under
        `sampling` (SamplingState.start's); returns the mode its steps run in (GREEDY or SAMPLED)."""
        state = self.state
        with COMPILER.replies_first():  # a compile running meanwhile waits: this is the reply's wait for its first text
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(seed)
            state.count.zero_()
            state.position.fill_(prompt.shape[1])
            mode = GREEDY if state.sampling.start(prompt, **sampling) else SAMPLED
            self.draw_ahead(mode)
            state.pick(self.prefill(prompt), mode)
        return mode

    def draw_ahead(self, mode: str) -> None:
        """Random draws for the next chunk of sampled steps."""
        if mode == SAMPLED:
            self.state.sampling.refill(self._generator)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Empty the cache (in place: the captured steps keep its addresses), run the prompt [1, T]
        eagerly into it; the last position's logits [1, V]."""
        self.cache.reset()
        out = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def advance(self, mode: str) -> str:
        """One step after `start`: the next token into `state`, in `mode`. Returns the step form
        that ran it. The compiled step, once ready, takes over here."""
        if self._compiled is not None:
            with self._compile_lock:
                self._step, self._compiled = self._compiled, None
        step = self._step
        if self.graphed and mode not in step.graphs:
            self._first_graphed_step(step, mode)
        elif self.graphed and step.graphs[mode] is not None:
            step.graphs[mode].replay()
        else:
            decode(step.forward, self.inputs, self.state, mode)
        return step.form(mode, self.graphed)

    def _first_graphed_step(self, step: Step, mode: str) -> None:
        """The step's first run in `mode` on one GPU: for real on a side stream (which also warms up
        cuBLAS and the kernels there), then captured in a CUDA graph that later steps replay."""
        current = torch.cuda.current_stream(self.device)
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        side = self._capture_stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            decode(step.forward, self.inputs, self.state, mode)
        current.wait_stream(side)
        error = capture_step(step, self.inputs, self.state, mode, side)
        if error is not None:
            self.compile_error = error
            log.warning("%s not captured in a CUDA graph, running it eagerly: %s", step.kind, error)

    @staticmethod
    def _compile(generator_ref: weakref.ref[FastGenerator]) -> None:
        """On the compiler thread: compile the step, warming it up on a scratch cache and state (the
        loop keeps decoding on the real ones meanwhile), capture it (on one GPU) over the real ones,
        and hand it to the next step. A failure leaves the step it had, and `compile_error` says why."""
        self = generator_ref()
        if self is None:  # freed before its turn
            return
        try:
            step = Step(torch.compile(self._step_code, **STEP_COMPILE), COMPILED_STEP)
            scratch = StepInputs(self.model, allocated_static_cache(self.model, self.context_tokens, as_prefill=True))
            graphed = self.graphed
            with torch.inference_mode():
                scratch_state = DecodeState(self.state.sampling.seen.shape[-1], 1, 1, self.device)
                side = torch.cuda.Stream(self.device) if graphed else None
                if side is not None:
                    side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    for mode in (GREEDY, SAMPLED):  # the first compiles; both warm up
                        scratch_state.position.fill_(0)
                        scratch_state.count.zero_()
                        decode(step.forward, scratch, scratch_state, mode)
                if side is not None:  # before the scratch tensors (made on the current stream) are freed for reuse
                    side.synchronize()
                del scratch, scratch_state
                if graphed:
                    # over the real cache and state, whose tensors the compiled code must take as they
                    # are: a recompile here would mean the scratch ones differed, so refuse it
                    with torch.compiler.set_stance("fail_on_recompile"):
                        errors = [capture_step(step, self.inputs, self.state, mode, side) for mode in (GREEDY, SAMPLED)]
                    if errors[0] is not None:  # uncaptured, the compiled step would be no faster: keep the eager graph
                        raise RuntimeError(f"the compiled step was not captured in a CUDA graph: {errors[0]}")
                    if errors[1] is not None:
                        log.warning(
                            "sampled compiled step not captured in a CUDA graph, it runs eagerly: %s", errors[1]
                        )
        except Exception as exc:
            self.compiled = False
            self.compile_error = exception_line(exc)
            log.warning("decode step not compiled, replies stay on the %s: %s", self.serving, self.compile_error)
        else:
            self._step_code.compiled_once = True
            with self._compile_lock:
                self._compiled = step
        finally:
            self._compile_done.set()

    def _to_host(self, tokens: torch.Tensor, host: torch.Tensor, start: int, end: int) -> _Chunk:
        if host is tokens:
            return _Chunk(start, end, None)
        host[start:end].copy_(tokens[start:end], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the tokens' device, which need not be the current one
        return _Chunk(start, end, ready)
