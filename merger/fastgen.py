"""Fast decoding for built models, in the gpt-fast style (DESIGN.md, "On the lent GPU").

A few structural choices instead of `generate()`'s machinery:
- one static KV cache, allocated once per generator and reset in place, so every decode step sees
  the same tensor addresses;
- the prompt runs eagerly (prefill); on one GPU the one-token step, the next token's choice
  included (`merger.sampling`: greedy or sampled, settings read from the device), is captured in
  a CUDA graph and replayed: one launch per token. The step is first the eager one, so replies
  start right after a build; it is compiled meanwhile on a thread of its own (`COMPILER`), then
  captured likewise and takes over at the next token. Its attention is
  `merger.decode_attention`'s, which reads only the cached keys and values in use. Where it is
  not compiled (a ZeroGPU worker forbids torch.compile), the eager step's graph serves;
- the host reads tokens back only every `chunk` tokens, while the GPU already works on the next
  chunk: no sync per token, so the CPU stays ahead of the GPU. Stop tokens are checked on those reads.
On the CPU the same loop runs without graphs, reading every token back (syncs cost nothing there).

`fuse_projections` is the build-time half: one q/k/v and one gate/up matrix per layer, so a decode
step launches fewer, larger kernels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from merger.decode_attention import use_decode_attention
from merger.errors import exception_line
from merger.sampling import SamplingState

if TYPE_CHECKING:
    from merger.aot_step import AotStep

log = logging.getLogger(__name__)
CUDA_CHUNK = 8  # tokens between host reads on a GPU: a read ends the queue's run-ahead, so read rarely
# Inductor's code alone, without its CUDA graphs: the step is captured in a CUDA graph by hand
# (`_capture`), which any thread may replay, so it compiles on the compiler thread while replies go
# on. No gpt-fast coordinate-descent tuning, which turns batch-1 matrix products into inductor
# reductions: cuBLAS's kernels read the weights faster on the H200, and the first compile took 42 s
# instead of 104 (README, 2026-12-02 runs c and d)
STEP_COMPILE: dict[str, Any] = {"options": {"triton.cudagraphs": False}}
# Python's thread switch interval while a step compiles: the compile holds the GIL for whole
# intervals, and every torch call of a decode loop gives the GIL up and waits for it again, so at
# the default 5 ms the other visitors' replies would crawl (one replay a token, a few calls a chunk)
COMPILE_SWITCH_INTERVAL_S = 0.0002
GREEDY, SAMPLED = "greedy", "sampled"  # a step's two forms: argmax, or the request's sampling settings

# What served a reply's tokens, as its status says
EAGER_STEP = "eager step"
COMPILED_STEP = "compiled step"
AHEAD_OF_TIME_STEP = "step compiled ahead of time"
IN_A_CUDA_GRAPH = " in a CUDA graph"


def static_cache(config, max_seq_len: int) -> Cache:
    """One full-length static layer per depth, for sliding-window layers too: the model's masks
    already limit what those see, while transformers' sliding static layer branches on a Python
    counter, which a compiled step would guard on and recompile for."""
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[StaticLayer(max_cache_len=max_seq_len) for _ in range(layers)])


def allocated_static_cache(model: nn.Module, max_seq_len: int, *, as_prefill: bool = False) -> Cache:
    """`static_cache`, its tensors allocated now (zeros) on the model's device and in its dtype,
    rather than by the first prefill: a step compiled ahead of time takes them as inputs. With
    `as_prefill`, the keys and values are inference tensors, as a prefill makes them (a compiled
    step guards on that)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    cache = static_cache(model.config, max_seq_len)
    with torch.inference_mode(as_prefill):
        cache.early_initialization(1, config.num_key_value_heads, head_dim, parameter.dtype, parameter.device)
    return cache


@dataclass
class StepInputs:
    """What the one-token step reads besides its token and position: the model and its KV cache."""

    model: nn.Module
    cache: Cache


def forward_one(inputs: StepInputs, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Logits [1, V] for one token [1, 1] at position [1, 1]; writes its keys and values."""
    out = inputs.model(input_ids=token, position_ids=position, past_key_values=inputs.cache, use_cache=True)
    return out.logits[:, -1, :]


Forward = Callable[[StepInputs, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeState:
    """Everything a decode step reads and writes besides the model and its cache, at fixed
    addresses, so a step captured in a CUDA graph reads the last token and writes the next one itself:
    the host only replays it, and reads `tokens` back once a chunk."""

    def __init__(self, vocab: int, max_tokens: int, chunk: int, device: torch.device) -> None:
        with torch.inference_mode():  # as the cache: a compiled step guards on it
            self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the last token
            self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # its cache slot
            self.tokens = torch.zeros(max_tokens, dtype=torch.long, device=device)  # the request's new tokens
            self.count = torch.zeros(1, dtype=torch.long, device=device)  # how many so far
            self.sampling = SamplingState(vocab, chunk, device)

    def take(self, token: torch.Tensor) -> None:
        """`token` [1] is the next one: the step's input, and the request's next new token."""
        self.token.copy_(token.view(1, 1))
        self.tokens.index_copy_(0, self.count, token)
        self.count.add_(1)

    def pick(self, logits: torch.Tensor, mode: str) -> None:
        """Choose the next token from logits [1, V] (GREEDY: argmax; SAMPLED: the request's settings)."""
        self.take(logits.argmax(dim=-1) if mode == GREEDY else self.sampling.pick(logits))


def decode(forward: Forward, inputs: StepInputs, state: DecodeState, mode: str) -> torch.Tensor:
    """One step on the device: the token after `state.token`, into `state`. Returns the logits."""
    logits = forward(inputs, state.token, state.position)
    state.position.add_(1)
    state.pick(logits, mode)
    return logits


@dataclass
class _Step:
    """A decode step (`forward` then the pick) and, on one GPU, its CUDA graph for each mode used so
    far (None for a mode whose capture failed: that mode runs eagerly)."""

    forward: Forward
    kind: str  # EAGER_STEP, COMPILED_STEP or AHEAD_OF_TIME_STEP
    graphs: dict[str, torch.cuda.CUDAGraph | None] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # each graph's output, rewritten per replay

    def form(self, mode: str, graphed: bool) -> str:
        """What runs `mode` (on one GPU, `graphed`: a graph unless its capture failed)."""
        return self.kind + (IN_A_CUDA_GRAPH if graphed and self.graphs.get(mode, True) is not None else "")


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> Iterator[None]:
    """Record the block's work on `stream` into `graph`, running nothing. torch.cuda.graph would
    first synchronize the device, collect garbage and empty the allocator's cache: a pause for every
    thread's replies. Thread-local: other threads keep using the GPU meanwhile."""
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()


@dataclass
class _Chunk:
    start: int
    end: int
    ready: torch.cuda.Event | None  # None on the CPU: already there


class FastGenerator:
    """Batch-1 streaming generation over one model with a static cache of `max_seq_len` positions.

    Not reentrant: one generation at a time per generator (they share the cache). `compile`
    defaults to True on CUDA: the step is then compiled on the compiler thread (tens of seconds for
    an 8B model; at once for a structure compiled before) while generation runs on the eager step,
    and the first step after the compile is ready runs compiled. On one GPU every step form is
    captured in a CUDA graph at its first use and replayed after (one launch per token; setting
    `graphed` False before the first step keeps it eager). A model dispatched over several devices
    runs eagerly by default (CUDA graphs would span devices, and compiling over 100 layers takes
    minutes); each layer's cache lives on that layer's device. A step that fails to compile or be
    captured leaves the form before it serving: slower, never broken; `compile_error` says why.

    With `aot_step` (`merger.aot_step`: where torch.compile is forbidden) the step is that package,
    loaded with this model's weights, and nothing compiles here; a package that fails to load
    leaves the step eager (in a CUDA graph on one GPU).
    """

    def __init__(
        self, model: nn.Module, *, max_seq_len: int, compile: bool | None = None, aot_step: AotStep | None = None
    ) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        spread = len({p.device for p in model.parameters()}) > 1  # dispatched over several devices
        one_gpu = self.device.type == "cuda" and not spread
        self.chunk = CUDA_CHUNK if self.device.type == "cuda" else 1
        # a step compiled ahead of time takes the cache's tensors as inputs: allocated now
        allocated = aot_step is not None
        cache = allocated_static_cache(model, max_seq_len) if allocated else static_cache(model.config, max_seq_len)
        self.inputs = StepInputs(model, cache)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.state = DecodeState(vocab, max_seq_len, self.chunk, self.device)
        self.compile_error: str | None = None
        self.ahead_of_time = False  # the step is a package compiled ahead of time
        self._step = _Step(forward_one, EAGER_STEP)
        if aot_step is not None:
            self._bind(aot_step)
        self.graphed = one_gpu and not self.ahead_of_time
        self.compiled = not self.ahead_of_time and (one_gpu if compile is None else compile)
        self._compiled: _Step | None = None  # the compiled step, once ready, until the next step takes it up
        self._compile_lock = threading.Lock()
        self._compile_started: float | None = None  # time.monotonic() when its compile began
        self._compile_done = threading.Event()
        self._generator: torch.Generator | None = None  # the request's draws
        self._capture_stream: torch.cuda.Stream | None = None
        # True when an earlier model of this structure compiled the step: its compile takes no time
        self.reuses_compiled_step = False
        if self.compiled or self.graphed:
            use_decode_attention(model)  # the compiled step reads each cached key and value once
        if self.compiled:
            self._step_code = _step_code_for(model)
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
        """Wait for the step's compile to end (ready or failed); False on timeout. It starts with the
        first step of the first generation."""
        return self._compile_done.wait(timeout)

    def _bind(self, aot_step: AotStep) -> None:
        try:
            bound = aot_step.bind(self.model, self.cache)
        except Exception as exc:
            self.compile_error = exception_line(exc)
            log.warning("decode step compiled ahead of time did not load, running without it: %s", self.compile_error)
            return
        self._step = _Step(lambda inputs, token, position: bound(token, position), AHEAD_OF_TIME_STEP)
        self.ahead_of_time = True

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        served: dict[str, int] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids as they arrive; a stop id is yielded, then generation ends. `served`
        counts the steps of each form (`serving`) the reply ran on."""
        prompt = input_ids.reshape(1, -1).to(self.device)  # [1, T]
        length = prompt.shape[1]
        if length == 0 or max_new_tokens < 1:
            raise ValueError("generation needs a non-empty prompt and max_new_tokens >= 1")
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len ({self.max_seq_len})"
            )
        settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, penalty=repetition_penalty)
        mode = self.start(prompt, seed=seed, **settings)
        served = {} if served is None else served
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

    def start(self, prompt: torch.Tensor, *, seed: int = 0, **settings: float) -> str:
        """A request's prompt [1, T] through the model (`prefill`) and its first new token chosen under
        `settings` (sampling.SamplingState.start's); returns the mode its steps run in (GREEDY or SAMPLED)."""
        state = self.state
        greedy = settings["temperature"] <= 0 and settings["penalty"] == 1.0
        mode = GREEDY if greedy else SAMPLED
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        state.count.zero_()
        state.position.fill_(prompt.shape[1])
        state.sampling.start(prompt, **settings)
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
        if self.compiled and self._compile_started is None:  # after the first step, so it starts at once
            self._compile_started = time.monotonic()
            COMPILER.submit(functools.partial(self._compile, weakref.ref(self)))
        return step.form(mode, self.graphed)

    def _first_graphed_step(self, step: _Step, mode: str) -> None:
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
        error = _capture(step, self.inputs, self.state, mode, side)
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
            step = _Step(torch.compile(self._step_code, **STEP_COMPILE), COMPILED_STEP)
            scratch = StepInputs(self.model, allocated_static_cache(self.model, self.max_seq_len, as_prefill=True))
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
                        errors = [_capture(step, self.inputs, self.state, mode, side) for mode in (GREEDY, SAMPLED)]
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


def _capture(step: _Step, inputs: StepInputs, state: DecodeState, mode: str, stream: torch.cuda.Stream) -> str | None:
    """Capture `step` in `mode` in a CUDA graph on `stream` (into step.graphs, its logits into
    step.logits), reading and writing `inputs` and `state` where they are now; None, or why it
    failed (a host sync or a host-to-device copy inside the step): the mode then runs eagerly."""
    graph = torch.cuda.CUDAGraph()
    try:
        with _capturing(graph, stream):
            logits = decode(step.forward, inputs, state, mode)
    except Exception as exc:
        step.graphs[mode] = None
        return exception_line(exc)
    step.graphs[mode], step.logits[mode] = graph, logits
    return None


class _JobThread:
    """A daemon thread, started by the first job submitted, that serves the queued jobs (`_serve`)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _serve(self) -> None:
        raise NotImplementedError


class BackgroundCompiler(_JobThread):
    """The thread that compiles decode steps, one at a time, off the decode loop: replies keep
    streaming meanwhile. While it works, the thread switch interval is short (COMPILE_SWITCH_INTERVAL_S)."""

    def __init__(self) -> None:
        super().__init__("step-compiler")

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            interval = sys.getswitchinterval()
            sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
            try:
                job()
            except Exception:  # a job records its own failure; this keeps the thread alive
                log.exception("decode step compile job failed")
            finally:
                sys.setswitchinterval(interval)


COMPILER = BackgroundCompiler()


# Dynamo keeps a function's compiled entries on its code object, keeps dead models' entries there,
# and past `recompile_limit` (8) entries runs that code eagerly without a word: the ninth model
# structure a long-lived app builds would decode at eager speed. So each structure gets its own
# copy of the step's code: builds of one structure (other seams, the same depth and shapes) share
# its compiled step, every new structure compiles, and a structure's entries are dropped once no
# generator uses it.
_STEP_CODES: weakref.WeakValueDictionary[str, types.FunctionType] = weakref.WeakValueDictionary()
_STEP_CODES_LOCK = threading.Lock()


def model_structure(model: nn.Module) -> str:
    """What a compiled step of `model` depends on: its class, dtype and device, its config (the
    values its forward branches on), its module tree (depth, fused projections, shapes) and which
    of its tensors are one (duplicated layers, a tied head); not its name or weights, which the
    step takes as inputs."""
    parameter = next(model.parameters())
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    config_text = json.dumps(config, sort_keys=True, default=str)
    shared = " ".join(shared_tensors(model))
    return f"{type(model).__qualname__} {parameter.dtype} {parameter.device} {config_text} {model} shared: {shared}"


def shared_tensors(model: nn.Module) -> list[str]:
    """Each parameter or buffer that is an earlier one's tensor, as "name=first_name". A compiled
    step takes such a tensor as one input: a step compiled where layers 24-31 repeat 16-23 would
    read the wrong weights for a merge that repeats other layers (and dynamo recompiles for it)."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    shared = []
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))  # the shape tells a fused matrix from its first part
        if key in first:
            shared.append(f"{name}={first[key]}")
        else:
            first[key] = name
    return shared


def _step_code_for(model: nn.Module) -> types.FunctionType:
    """`forward_one` under a code object shared by the models of `model`'s structure
    (`model_structure`). `compiled_once` tells whether a compiled step of it has run."""
    structure = model_structure(model)
    with _STEP_CODES_LOCK:
        step = _STEP_CODES.get(structure)
        if step is None:
            base = forward_one
            code = base.__code__.replace()  # a new code object, the same bytecode
            step = types.FunctionType(code, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
            step.compiled_once = False
            weakref.finalize(step, _drop_compiled, code)
            _STEP_CODES[structure] = step
        return step


def _drop_compiled(code: types.CodeType) -> None:
    """Free the compiled entries dynamo keeps on `code` (they hold the compiled graphs, and outlive
    the function otherwise). A private torch function: where it is missing, they stay."""
    reset = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
    if reset is not None:
        reset(code)


_DONE = object()


@dataclass
class _Job:
    """One request on the decode loop: its tokens (or `call`'s result) go to `out`, then _DONE or
    the exception."""

    decoder: ModelDecoder | None
    input_ids: torch.Tensor | None
    options: dict[str, Any]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancel: threading.Event = field(default_factory=threading.Event)
    call: Callable[[], Any] | None = None
    tokens: Iterator[int] | None = None  # None until it starts


class DecodeLoop(_JobThread):
    """The one thread that runs every threaded decoder's requests, a token at a time in turn.

    Requests for different models interleave, so side-by-side replies and several visitors
    stream together, one GPU queue in order; requests for one model (one KV cache) run one after
    another. Steps compile on the compiler thread (`COMPILER`), never here: a fresh build's first
    reply runs on its eager step meanwhile, and other models' replies go on.
    """

    def __init__(self) -> None:
        super().__init__("decode-loop")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop's thread, between other requests' tokens, and return its result;
        other requests wait while it runs."""
        job = _Job(None, None, {}, call=fn)
        self.submit(job)
        result = job.out.get()
        job.out.get()  # _DONE
        if isinstance(result, BaseException):
            raise result
        return result

    def _serve(self) -> None:
        waiting: list[_Job] = []
        running: list[_Job] = []
        while True:
            try:
                waiting.append(self._jobs.get(block=not (waiting or running)))
                while True:
                    waiting.append(self._jobs.get_nowait())
            except queue.Empty:
                pass
            for job in list(waiting):  # start each model's oldest request once its previous one ended
                if job.decoder is None or all(r.decoder is not job.decoder for r in running):
                    waiting.remove(job)
                    running.append(job)
            for job in list(running):
                if not self._advance(job):
                    running.remove(job)

    @staticmethod
    def _advance(job: _Job) -> bool:
        """One more token of `job`; False once it has ended."""
        try:
            if job.call is not None:
                job.out.put(job.call())
                raise StopIteration
            if job.cancel.is_set() or job.decoder.closed:
                raise StopIteration
            if job.tokens is None:
                job.tokens = job.decoder.tokens(job.input_ids, job.options)
            job.out.put(next(job.tokens))
            return True
        except StopIteration:
            pass
        except Exception as exc:  # handed to the reader, who raises it
            job.out.put(exc)
        if job.tokens is not None:
            job.tokens.close()
        job.out.put(_DONE)
        return False


LOOP = DecodeLoop()


class ModelDecoder:
    """Every generation of one built model.

    On a GPU it keeps one FastGenerator with a fixed window (the KV cache the placement budgeted),
    its step compiled in the background unless `compile` is False, or running `aot_step`
    (compiled ahead of time); on the CPU
    each request gets an uncompiled generator sized to it. Requests run on the process's
    DecodeLoop; with `threaded=False` (a ZeroGPU worker: a process forked per call, where no thread
    of ours lives) they run in the caller's thread. Each request draws from its own seeded
    generator, so a reply does not depend on what else runs.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int,
        threaded: bool = True,
        compile: bool | None = None,
        aot_step: AotStep | None = None,
    ) -> None:
        self.model = model
        self.window = window
        on_gpu = next(model.parameters()).device.type == "cuda"
        self._shared = FastGenerator(model, max_seq_len=window, compile=compile, aot_step=aot_step) if on_gpu else None
        self._threaded = threaded
        self.closed = False

    @property
    def compiled(self) -> bool:
        return self._shared is not None and self._shared.compiled

    @property
    def reuses_compiled_step(self) -> bool:
        """An earlier build of this structure compiled the step: it takes over at once."""
        return self._shared is not None and self._shared.reuses_compiled_step

    @property
    def serving(self) -> str:
        """The step form the next token runs on (fastgen.EAGER_STEP, COMPILED_STEP, ...)."""
        return self._shared.serving if self._shared is not None else EAGER_STEP

    def compiling_for(self) -> float | None:
        """Seconds the step's compile has run so far, or None when none runs."""
        return self._shared.compiling_for() if self._shared is not None else None

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the step's compile to end (ready or failed; at once where none runs); False on timeout."""
        return self._shared is None or self._shared.wait_compiled(timeout)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request fits the window: on the CPU too, where each request's cache is sized
        to it, so the window bounds its memory and time."""
        return prompt_tokens + max_new_tokens <= self.window

    def stream(self, input_ids: torch.Tensor, *, cancel: threading.Event, **options: Any) -> Iterator[int]:
        """New token ids as they arrive (options as FastGenerator.generate's). Setting `cancel`, or
        closing the iterator, ends the generation after the token in flight."""
        if not self._threaded:
            for token in self.tokens(input_ids, options):
                yield token
                if cancel.is_set():
                    return
            return
        job = _Job(self, input_ids, options, cancel=cancel)
        LOOP.submit(job)
        try:
            while (item := job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def warm_up(self, input_ids: torch.Tensor) -> None:
        """Queue a two-token generation: it captures the eager step's CUDA graph and starts the
        compile now rather than in the first reply. Nothing on the CPU, where each request makes its own generator."""
        if self._shared is not None:
            LOOP.submit(_Job(self, input_ids, {"max_new_tokens": 2}))

    def tokens(self, input_ids: torch.Tensor, options: dict[str, Any]) -> Iterator[int]:
        """The request's tokens, generated in the calling thread."""
        needed = input_ids.shape[-1] + options["max_new_tokens"]
        generator = self._shared or FastGenerator(self.model, max_seq_len=needed)
        return generator.generate(input_ids, **options)

    def close(self) -> None:
        """Let go of the model; requests still queued or running end at their next token."""
        self.closed = True
        self.model = self._shared = None


# Modules whose forward we know to be Llama's, by class name: architecture knowledge as data.
FUSABLE_ATTENTION = ("LlamaAttention",)
FUSABLE_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up projections in place; returns how many modules changed.

    Each fused matrix is a non-persistent buffer made by concatenating the source weights, and the
    original weights become row views of it: no extra memory, the same parameter names and values.
    A duplicated layer (the same source tensors at two depths) gets the same fused buffer and views
    at both depths, found by the source tensors' data pointers, so it stays shared.
    """
    from merger.assemble import PARAMETERS_LOCK

    with PARAMETERS_LOCK:
        return _fuse(model)


def _fuse(model: nn.Module) -> int:
    fused: dict[tuple[int, ...], tuple[torch.Tensor, list[nn.Parameter]]] = {}
    changed = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name in FUSABLE_ATTENTION:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            buffer = "qkv_weight"
        elif name in FUSABLE_MLP:
            parts = [module.gate_proj, module.up_proj]
            buffer = "gate_up_weight"
        else:
            continue
        if any(p.bias is not None for p in parts):
            continue
        key = tuple(p.weight.data_ptr() for p in parts)
        if key not in fused:
            weight = torch.cat([p.weight.detach() for p in parts])  # [sum(out), in]
            torch._dynamo.mark_static_address(weight)  # CUDA graphs must not copy it in per replay
            views, row = [], 0
            for p in parts:
                rows = p.weight.shape[0]
                views.append(nn.Parameter(weight[row : row + rows], requires_grad=False))
                row += rows
            fused[key] = (weight, views)
        weight, views = fused[key]
        for p, view in zip(parts, views, strict=True):
            p.weight = view
        module.register_buffer(buffer, weight, persistent=False)
        module.__class__ = _fused_class(type(module))
        changed += 1
    return changed


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of `cls` whose forward uses the fused matrix (swapped in, so isinstance holds)."""
    if cls not in _FUSED_CLASSES:
        if cls.__name__ in FUSABLE_ATTENTION:
            forward = _fused_attention_forward(sys.modules[cls.__module__])
        else:
            forward = _fused_mlp_forward
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
    return _FUSED_CLASSES[cls]


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)  # [..., intermediate] each
    return self.down_proj(self.act_fn(gate) * up)


def _fused_attention_forward(modeling) -> Callable:
    """LlamaAttention.forward with one q/k/v product, using the helpers of the model's own module
    (looked up once here, so the compiled step sees plain functions)."""
    apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
    attention_functions, eager_attention = modeling.ALL_ATTENTION_FUNCTIONS, modeling.eager_attention_forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # [B, T]
        hidden_shape = (*input_shape, -1, self.head_dim)
        sizes = [self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]]
        q, k, v = F.linear(hidden_states, self.qkv_weight).split(sizes, dim=-1)
        q = q.view(hidden_shape).transpose(1, 2)  # [B, heads, T, head_dim]
        k = k.view(hidden_shape).transpose(1, 2)  # [B, kv_heads, T, head_dim]
        v = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = attention_functions.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()  # [B, T, heads * head_dim]
        return self.o_proj(out), weights

    return forward
