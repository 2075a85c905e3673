"""The decode loop every threaded reply runs on (`DecodeLoop`: one thread, a token of each request
in turn), and `ModelDecoder`, every generation of one built model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from merger.generate.compiler import JobThread
from merger.generate.generator import FastGenerator
from merger.generate.steps import EAGER_STEP

if TYPE_CHECKING:
    from merger.generate.aot import AotStep


_DONE = object()


@dataclass
class _Job:
    """One request on the decode loop: its tokens (or `call`'s result) go to `out`, then _DONE or
    the exception."""

    decoder: ModelDecoder | None
    input_ids: torch.Tensor | None
    options: dict[str, Any]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    stop: threading.Event = field(default_factory=threading.Event)
    call: Callable[[], Any] | None = None
    tokens: Iterator[int] | None = None  # None until it starts


class DecodeLoop(JobThread):
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
            if job.stop.is_set() or job.decoder.closed:
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

    On a GPU it keeps one FastGenerator with a fixed `context_tokens` (the KV cache the placement budgeted),
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
        context_tokens: int,
        threaded: bool = True,
        compile: bool | None = None,
        aot_step: AotStep | None = None,
    ) -> None:
        self.model = model
        self.context_tokens = context_tokens
        on_gpu = next(model.parameters()).device.type == "cuda"
        self._shared = (
            FastGenerator(model, context_tokens=context_tokens, compile=compile, aot_step=aot_step) if on_gpu else None
        )
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
        """The step form the next token runs on (steps.EAGER_STEP, COMPILED_STEP, ...)."""
        return self._shared.serving if self._shared is not None else EAGER_STEP

    def compiling_for(self) -> float | None:
        """Seconds the step's compile has run so far, or None when none runs."""
        return self._shared.compiling_for() if self._shared is not None else None

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the step's compile to end (ready or failed; at once where none runs); False on timeout."""
        return self._shared is None or self._shared.wait_compiled(timeout)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request fits `context_tokens`: on the CPU too, where each request's cache is sized
        to it, so that bounds its memory and time."""
        return prompt_tokens + max_new_tokens <= self.context_tokens

    def stream(self, input_ids: torch.Tensor, *, stop: threading.Event, **options: Any) -> Iterator[int]:
        """New token ids as they arrive (options as FastGenerator.generate's). Setting `stop`, or
        closing the iterator, ends the generation after the token in flight."""
        if not self._threaded:
            for token in self.tokens(input_ids, options):
                yield token
                if stop.is_set():
                    return
            return
        job = _Job(self, input_ids, options, stop=stop)
        LOOP.submit(job)
        try:
            while (item := job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def warm_up(self, input_ids: torch.Tensor) -> None:
        """Queue a two-token generation: it captures the eager step's CUDA graph now rather than in
        the first reply, and leaves the compile to start when that reply ends (`FastGenerator.generate`).
        Nothing on the CPU, where each request makes its own generator."""
        if self._shared is not None:
            LOOP.submit(_Job(self, input_ids, {"max_new_tokens": 2, "start_compile": False}))

    def tokens(self, input_ids: torch.Tensor, options: dict[str, Any]) -> Iterator[int]:
        """The request's tokens, generated in the calling thread."""
        needed = input_ids.shape[-1] + options["max_new_tokens"]
        generator = self._shared or FastGenerator(self.model, context_tokens=needed)
        return generator.generate(input_ids, **options)

    def close(self) -> None:
        """Let go of the model; requests still queued or running end at their next token."""
        self.closed = True
        self.model = self._shared = None
