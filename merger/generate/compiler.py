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
    and, on Python 3.12 and later, it waits at its next Python call while any reply's prompt runs
    (`replies_first`)."""

    def __init__(self) -> None:
        super().__init__("step-compiler")
        self._compiling = False  # a job runs
        self._resume = threading.Event()  # clear while a prompt runs during a job
        self._resume.set()
        self._prompts = 0  # prompts running now during a job
        self._prompts_lock = threading.Lock()

    @contextlib.contextmanager
    def replies_first(self) -> Iterator[None]:
        """While inside, a compile that runs waits at its next Python call, at most PROMPT_WAIT_S.
        A prompt's pass is hundreds of short torch calls, each giving the GIL up and waiting to get
        it back; a compile taking the GIL between them made another visitor's first text on the
        H200 1-3 s instead of 35 ms (README, Benchmarks). The wait is a profile hook on every thread,
        set only for the prompt's time: one kept on the compiler thread made the H200's compile of an
        8B's step 179 s instead of 54 (benchmarks/results/gpu-suite-h200-2026-12-03-run-9.json).
        Setting it from another thread needs Python 3.12 (`threading.setprofile_all_threads`, a
        Space's Python); before, and on the compiler's own thread, this does nothing."""
        pausing = hasattr(threading, "setprofile_all_threads") and threading.current_thread() is not self._thread
        with self._prompts_lock:
            pausing = pausing and self._compiling
            if pausing:
                self._prompts += 1
                if self._prompts == 1:
                    self._resume.clear()
                    threading.setprofile_all_threads(self._wait_for_prompts)
        try:
            yield
        finally:
            if pausing:
                with self._prompts_lock:
                    self._prompts -= 1
                    if self._prompts == 0:
                        threading.setprofile_all_threads(None)
                        self._resume.set()

    def _wait_for_prompts(self, frame: FrameType, event: str, arg: Any) -> None:
        """The profile hook while a prompt runs, called once on each thread: the compiler thread
        waits there (after PROMPT_WAIT_S it goes on, unhooked), any other thread goes on unhooked."""
        sys.setprofile(None)
        if threading.current_thread() is self._thread:
            self._resume.wait(PROMPT_WAIT_S)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            interval = sys.getswitchinterval()
            sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
            with self._prompts_lock:
                self._compiling = True
            try:
                job()
            except Exception:  # a job records its own failure; this keeps the thread alive
                log.exception("decode step compile job failed")
            finally:
                with self._prompts_lock:
                    self._compiling = False
                sys.setswitchinterval(interval)


COMPILER = BackgroundCompiler()
