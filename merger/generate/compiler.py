"""The thread that compiles decode steps off the decode loop, so replies keep streaming meanwhile."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
# Python's thread switch interval while a step compiles: the compile holds the GIL for whole
# intervals, and every torch call of a decode loop gives the GIL up and waits for it again, so at
# the default 5 ms the other visitors' replies would crawl (one replay a token, a few calls a chunk)
COMPILE_SWITCH_INTERVAL_S = 0.0002
# the longest the compile waits for one prompt (`BackgroundCompiler.replies_first`): the compile may
# hold a lock the prompt needs (a logging handler's, a module's import lock), and then waiting longer
# would only stall both
PROMPT_WAIT_S = 1.0


class JobThread:
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


class BackgroundCompiler(JobThread):
    """The thread that compiles decode steps, one at a time, off the decode loop: replies keep
    streaming meanwhile. While it works, the thread switch interval is short (COMPILE_SWITCH_INTERVAL_S),
    and it waits at its next Python call while any reply's prompt runs (`replies_first`)."""

    def __init__(self) -> None:
        super().__init__("step-compiler")
        self._resume = threading.Event()  # clear while a prompt runs
        self._resume.set()
        self._prompts = 0  # prompts running now
        self._prompts_lock = threading.Lock()
        self._stretch = 0  # counts stretches of prompts running (one or more at a time)
        self._waited = -1  # the stretch the compile has waited for: once each, at most PROMPT_WAIT_S

    @contextlib.contextmanager
    def replies_first(self) -> Iterator[None]:
        """While inside, the compile (if one runs) waits at its next Python call. A prompt's pass is
        hundreds of short torch calls, each giving the GIL up and waiting to get it back; with a
        compile holding the GIL between them, a visitor's first text on the H200 took 1-3 s instead of
        35 ms (README, Benchmarks). A no-op on the compiler's own thread."""
        if threading.current_thread() is self._thread:
            yield
            return
        with self._prompts_lock:
            self._prompts += 1
            if self._prompts == 1:
                self._stretch += 1
                self._resume.clear()
        try:
            yield
        finally:
            with self._prompts_lock:
                self._prompts -= 1
                if self._prompts == 0:
                    self._resume.set()

    def _wait_for_prompts(self, frame: FrameType, event: str, arg: Any) -> None:
        """The compiler thread's profile hook: called at each Python call and return."""
        if not self._resume.is_set() and self._waited != self._stretch:
            self._waited = self._stretch
            self._resume.wait(PROMPT_WAIT_S)

    def _serve(self) -> None:
        sys.setprofile(self._wait_for_prompts)  # this thread's alone
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
