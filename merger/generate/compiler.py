"""The thread that compiles decode steps off the decode loop, so replies keep streaming meanwhile."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)
# Python's thread switch interval while a step compiles: the compile holds the GIL for whole
# intervals, and every torch call of a decode loop gives the GIL up and waits for it again, so at
# the default 5 ms the other visitors' replies would crawl (one replay a token, a few calls a chunk)
COMPILE_SWITCH_INTERVAL_S = 0.0002


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
