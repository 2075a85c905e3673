"""Fast decoding for built models, in the gpt-fast style (DESIGN.md, "On the lent GPU").

A few structural choices instead of `generate()`'s machinery:
- one static KV cache, allocated once per generator and reset in place, so every decode step sees
  the same tensor addresses;
- the prompt runs eagerly (prefill); the one-token step is compiled with CUDA graphs on a GPU
  (`triton.cudagraphs`, i.e. mode="reduce-overhead"), and its attention is
  `merger.decode_attention`'s, which reads only the cached keys and values in use. Where it is
  not compiled (a ZeroGPU worker forbids torch.compile), the eager step is captured in a CUDA graph
  of its own and replayed: one launch per token instead of hundreds;
- the next token is chosen on the device (greedy argmax or an exponential race), and the host reads
  tokens back only every `chunk` tokens, while the GPU already works on the next chunk: no sync per
  token, so the CPU stays ahead of the GPU. Stop tokens are checked on those reads.
On the CPU the same loop runs uncompiled, reading every token back (syncs cost nothing there).

`fuse_projections` is the build-time half: one q/k/v and one gate/up matrix per layer, so a decode
step launches fewer, larger kernels.
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from merger.aot_step import AotStep

log = logging.getLogger(__name__)
CUDA_CHUNK = 8  # tokens between host reads on a GPU: a read ends the queue's run-ahead, so read rarely
# mode="reduce-overhead". Without gpt-fast's coordinate-descent tuning, which turns batch-1 matrix
# products into inductor reductions: cuBLAS's kernels read the weights faster on the H200, and the
# first compile takes 42 s instead of 104 (README, 2026-12-02 runs c and d)
STEP_COMPILE: dict[str, Any] = {"options": {"triton.cudagraphs": True}}


def static_cache(config, max_seq_len: int) -> Cache:
    """One full-length static layer per depth, for sliding-window layers too: the model's masks
    already limit what those see, while transformers' sliding static layer branches on a Python
    counter, which a compiled step would guard on and recompile for."""
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[StaticLayer(max_cache_len=max_seq_len) for _ in range(layers)])


def allocated_static_cache(model: nn.Module, max_seq_len: int) -> Cache:
    """`static_cache`, its tensors allocated now (zeros) on the model's device and in its dtype,
    rather than by the first prefill: a step compiled ahead of time takes them as inputs."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    cache = static_cache(model.config, max_seq_len)
    cache.early_initialization(1, config.num_key_value_heads, head_dim, parameter.dtype, parameter.device)
    return cache


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`generate()`'s repetition penalty: the logits [1, V] of tokens already in the text (`seen`,
    bool [1, V]) are divided by `penalty` where positive and multiplied by it where negative."""
    logits = logits.float()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [1] from logits [1, V], on their device and without a host sync.
    Filters apply in the order temperature, top-k (exactly k tokens), top-p, min-p; temperature 0
    is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # with top-k, the k token ids that `logits` now holds, most likely first
    if 0 < top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # [1, k]: later steps see k, not V
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        # topk's values come sorted; otherwise sort the whole vocabulary
        sorted_probs, order = (probs, None) if candidates is not None else probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely ones already hold top_p (the most likely always stays).
        # CUDA's float cumsum is not deterministic (torch.use_deterministic_algorithms lists it), and
        # at the nucleus edge a last-bit change decides a draw: scan fixed-point integers, exact in
        # any order, so a seed always gives the same tokens.
        fixed = (sorted_probs * 2.0**40).long()
        drop = fixed.cumsum(dim=-1) - fixed >= round(top_p * 2.0**40)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = sorted_probs if order is None else torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    # argmax(p / E), E ~ Exp(1), draws from p without torch.multinomial's host sync; the clamp
    # keeps a zero draw from turning a filtered token's 0/0 into a NaN that argmax would pick.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    choice = (probs / race).argmax(dim=-1)  # [1]
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


@dataclass
class _Chunk:
    start: int
    end: int
    ready: torch.cuda.Event | None  # None on the CPU: already there


@dataclass
class _CapturedStep:
    """An eager decode step captured in a CUDA graph: its inputs, and the output each replay writes."""

    graph: torch.cuda.CUDAGraph
    token: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites it


class FastGenerator:
    """Batch-1 streaming generation over one model with a static cache of `max_seq_len` positions.

    Not reentrant: one generation at a time per generator (they share the cache). `compile`
    defaults to True on CUDA; the first generation then compiles the step (tens of seconds for an
    8B model), later ones replay its CUDA graph. A model dispatched over several devices runs
    eagerly by default (torch.compile's CUDA graphs skip graphs that span devices, and compiling
    over 100 layers takes minutes); each layer's cache lives on that layer's device. A step that
    fails to compile (an architecture torch.compile cannot take) falls back to running eagerly:
    slower, never broken; `compile_error` says why.

    With `aot_step` (`merger.aot_step`: where torch.compile is forbidden) the step is that package,
    loaded with this model's weights, and nothing compiles here; a package that fails to load also
    leaves the step eager. On one GPU an eager step is `graphed`: its first call runs it, then
    captures it in a CUDA graph that later calls replay (if capture fails, it stays eager and
    `compile_error` says why; setting `graphed` False before the first step keeps it eager).
    """

    def __init__(
        self, model: nn.Module, *, max_seq_len: int, compile: bool | None = None, aot_step: AotStep | None = None
    ) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        spread = len({p.device for p in model.parameters()}) > 1  # dispatched over several devices
        by_default = self.device.type == "cuda" and not spread
        self.compiled = aot_step is None and (by_default if compile is None else compile)
        self.chunk = CUDA_CHUNK if self.device.type == "cuda" else 1
        # a step compiled ahead of time takes the cache's tensors as inputs: allocated now
        self.cache = (
            static_cache(model.config, max_seq_len) if aot_step is None else allocated_static_cache(model, max_seq_len)
        )
        self.compile_error: str | None = None
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._forward_one
        self.ahead_of_time = False  # the step is a package compiled ahead of time
        if aot_step is not None:
            self._bind(aot_step)
        self._stepped = False  # a compiled step has run once: later failures are real errors
        # True when an earlier model of this structure compiled the step: the first reply does not wait
        self.reuses_compiled_step = False
        self.graphed = by_default and not self.compiled and not self.ahead_of_time
        if self.compiled or self.graphed:
            use_decode_attention(model)  # the step reads each cached key and value once
        if self.compiled:
            self._step_code = _step_code_for(model)
            self.reuses_compiled_step = self._step_code.compiled_once
            self._step = torch.compile(types.MethodType(self._step_code, self), **STEP_COMPILE)

    def _bind(self, aot_step: AotStep) -> None:
        try:
            self._step = aot_step.bind(self.model, self.cache)
        except Exception as exc:
            self.compile_error = exception_line(exc)
            log.warning("decode step compiled ahead of time did not load, running without it: %s", self.compile_error)
            return
        self.ahead_of_time = True

    def _forward_one(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] for one token [1, 1] at position [1, 1]; writes its keys and values."""
        out = self.model(input_ids=token, position_ids=position, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]

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
    ) -> Iterator[int]:
        """Yield new token ids as they arrive; a stop id is yielded, then generation ends."""
        prompt = input_ids.reshape(1, -1).to(self.device)  # [1, T]
        length = prompt.shape[1]
        if length == 0 or max_new_tokens < 1:
            raise ValueError("generation needs a non-empty prompt and max_new_tokens >= 1")
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len ({self.max_seq_len})"
            )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)

        seen = None  # tokens in the text so far, for the repetition penalty: bool [1, V]
        if repetition_penalty != 1.0:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=self.device).scatter_(1, prompt, True)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if seen is not None:
                logits = penalize(logits, seen, repetition_penalty)
            token = sample(logits, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, generator=generator)
            if seen is not None:
                seen[0, token] = True
            return token

        stops = set(stop_ids)
        tokens = torch.empty(max_new_tokens, dtype=torch.long, device=self.device)  # every new token
        host = tokens if self.device.type == "cpu" else torch.empty_like(tokens, device="cpu").pin_memory()
        position = torch.tensor([[length]], device=self.device)  # [1, 1]: where the next token goes

        tokens[0:1] = pick(self.prefill(prompt))
        pending = self._to_host(tokens, host, 0, 1)  # the first token alone: time to first token
        done = 1
        while pending is not None:
            ahead = None
            if done < max_new_tokens:  # queue the next chunk before waiting for the previous one
                end = min(done + self.chunk, max_new_tokens)
                for i in range(done, end):
                    logits = self.step(tokens[i - 1 : i].view(1, 1), position)
                    position += 1
                    tokens[i : i + 1] = pick(logits)
                ahead = self._to_host(tokens, host, done, end)
                done = end
            if pending.ready is not None:
                pending.ready.synchronize()
            for token in host[pending.start : pending.end].tolist():
                yield token
                if token in stops:
                    return
            pending = ahead

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Empty the cache (in place: the compiled step keeps its addresses), run the prompt [1, T]
        eagerly into it; the last position's logits [1, V]."""
        self.cache.reset()
        out = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] for one token [1, 1] at `position` [1, 1] after the cache's contents; the
        compiled step where there is one (falling back to the eager step if it fails to compile),
        else the eager step, replayed from a CUDA graph when `graphed`."""
        if self.graphed and not isinstance(self._step, _CapturedStep):
            return self._capture(token, position)
        if not self.compiled:
            return self._step(token, position)
        torch.compiler.cudagraph_mark_step_begin()
        if self._stepped:
            return self._step(token, position).clone()  # clone: the next replay overwrites the graph's output
        return self._first_step(token, position)

    def _first_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The first compiled call: it compiles (unless a model of this structure already did) and
        records; if that fails, the eager step rewrites the slot and runs from then on."""
        try:
            with _compiling(not self.reuses_compiled_step):
                logits = self._step(token, position).clone()
        except Exception as exc:
            self.compiled, self._step = False, self._forward_one
            self.compile_error = exception_line(exc)
            log.warning("decode step not compiled, running eagerly: %s", self.compile_error)
            return self._forward_one(token, position)
        self._stepped = self._step_code.compiled_once = True
        return logits

    def _capture(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The first graphed step: run for real on a side stream (which also warms up cuBLAS and the
        attention kernel there), then captured in a CUDA graph on that stream."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        inputs = token.clone(), position.clone()  # the graph's inputs: each replay copies into them
        with torch.cuda.stream(side):
            logits = self._forward_one(*inputs)
        logits.record_stream(current)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # records the step, runs nothing; thread_local: other threads may use the GPU meanwhile
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                output = self._forward_one(*inputs)
        except Exception as exc:  # a host sync or a host-to-device copy inside the step
            self.graphed = False
            self.compile_error = exception_line(exc)
            log.warning("decode step not captured in a CUDA graph, running eagerly: %s", self.compile_error)
            return logits
        self._step = _CapturedStep(graph, *inputs, output)
        return logits

    def _to_host(self, tokens: torch.Tensor, host: torch.Tensor, start: int, end: int) -> _Chunk:
        if host is tokens:
            return _Chunk(start, end, None)
        host[start:end].copy_(tokens[start:end], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # the tokens' device, which need not be the current one
        return _Chunk(start, end, ready)


_compile_started: float | None = None  # time.monotonic() when the step compiling now began


def compiling_for() -> float | None:
    """Seconds the decode step being compiled now has taken so far, or None when none is. Every
    request on the decode loop waits for it (DecodeLoop), so a reply can say what it waits for."""
    started = _compile_started
    return None if started is None else time.monotonic() - started


@contextmanager
def _compiling(compiles: bool) -> Iterator[None]:
    """Mark the block as the compile of a step when `compiles` (a structure's first compiled call)."""
    global _compile_started
    if not compiles:
        yield
        return
    _compile_started = time.monotonic()
    try:
        yield
    finally:
        _compile_started = None


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
    """`FastGenerator._forward_one` under a code object shared by the models of `model`'s structure
    (`model_structure`). `compiled_once` tells whether a compiled step of it has run."""
    structure = model_structure(model)
    with _STEP_CODES_LOCK:
        step = _STEP_CODES.get(structure)
        if step is None:
            base = FastGenerator._forward_one
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


class DecodeLoop:
    """The one thread that runs every threaded decoder's requests, a token at a time in turn.

    One thread, because torch keeps its CUDA-graph trees in the thread-local state of the thread
    that first used them: a compiled step replayed from a second thread fails (seen on the H200:
    an AssertionError in cudagraph_trees.get_obj). Requests for different models interleave, so
    side-by-side replies and several visitors stream together; requests for one model (one KV
    cache) run one after another. A compile (the first token of a build's first request) holds
    the loop until it is done.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop's thread (anything that compiles or replays CUDA graphs must) and
        return its result; other requests wait while it runs."""
        job = _Job(None, None, {}, call=fn)
        self.submit(job)
        result = job.out.get()
        job.out.get()  # _DONE
        if isinstance(result, BaseException):
            raise result
        return result

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="decode-loop", daemon=True)
                self._thread.start()
        self._jobs.put(job)

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
    compiled unless `compile` is False, or running `aot_step` (compiled ahead of time); on the CPU
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
        """An earlier build of this structure compiled the step: no compile before the first reply."""
        return self._shared is not None and self._shared.reuses_compiled_step

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
        """Queue a two-token generation, so the compile happens now rather than in the first reply."""
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
