"""Around every page handler: failures said as sentences, long work that can be stopped, and
model code imported before the handlers that need it.

- Errors: a visitor's mistake (`UserError`) becomes an escaped toast; anything else is logged
  and said as "something failed on our side", never Gradio's bare "Error".
- Work: a handler that runs long registers a `Work` for its session. It stops at its next check
  (Lens progress steps, each model a preview resolves, each piece of a reply) when the visitor
  presses Stop or leaves the page (`demo.unload`), or when it runs past the per-request budget
  (REQUEST_SECONDS); Python threads cannot be killed, so the work checks.
- Start-up: handlers marked `model_code` wait for the background import `python app.py` starts.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from merger.errors import UserError
from merger.limits import REQUEST_SECONDS
from merger.runtime.startup import wait_for_imports
from ui.text import said

log = logging.getLogger(__name__)
clock = time.monotonic  # what work is timed by


class Stopped(UserError):
    """Work ended by the visitor's Stop, their leaving, or the time budget."""


@dataclass(eq=False)
class Work:
    what: str  # "the lens", named in the message when it stops
    started: float = field(default_factory=lambda: clock())
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise Stopped if the work should end now."""
        if self.cancelled.is_set():
            raise Stopped(f"{self.what} was stopped")
        elapsed = clock() - self.started
        if elapsed > REQUEST_SECONDS.value:
            raise Stopped(REQUEST_SECONDS.refusal(f"{self.what} ran {elapsed:,.0f} seconds") + "; it was stopped")


_sessions: dict[str, set[Work]] = {}
_sessions_lock = threading.Lock()
_local = threading.local()  # the current thread's work, for sync handlers (a thread runs one at a time)


def session_id(request: gr.Request | None) -> str:
    return (request.session_hash if request else None) or "local"


@contextmanager
def session_work(request: gr.Request | None, what: str, *, current: bool = True) -> Iterator[Work]:
    """A Work registered for the request's session while the block runs. With `current`, also
    this thread's current work (`check_current`); a generator, which resumes on other threads,
    passes `current=False` and checks its Work itself."""
    work, session = Work(what), session_id(request)
    with _sessions_lock:
        _sessions.setdefault(session, set()).add(work)
    previous = getattr(_local, "work", None)
    if current:
        _local.work = work
    try:
        yield work
    finally:
        if current:
            _local.work = previous
        with _sessions_lock:
            works = _sessions.get(session, set())
            works.discard(work)
            if not works:
                _sessions.pop(session, None)


def check_current() -> None:
    """Stop this thread's current work if it should end (nothing when there is none)."""
    work = getattr(_local, "work", None)
    if work is not None:
        work.check()


def stop_session_work(session: str) -> None:
    """Ask every piece of work of a session to stop at its next check."""
    with _sessions_lock:
        works = list(_sessions.get(session, ()))
    for work in works:
        work.cancelled.set()


def stop_work(request: gr.Request) -> None:
    """The Stop button of long work (the Lens tab's)."""
    stop_session_work(session_id(request))


def web_handler(*, work: str | None = None, model_code: bool = False) -> Callable[[Callable], Callable]:
    """Wrap a page handler (plain or generator): errors as sentences; with `work` (plain handlers
    only), a stoppable Work of the session of its `request` argument, named so; with
    `model_code`, the start-up imports finished first."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def request_of(args: tuple, kwargs: dict) -> Any:
            return signature.bind_partial(*args, **kwargs).arguments.get("request")

        if inspect.isgeneratorfunction(fn):
            if work is not None:
                raise TypeError("a generator handler resumes on other threads: it makes and checks its own Work")

            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                with _boundary(None, None, model_code):
                    yield from fn(*args, **kwargs)

            return stream

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _boundary(work, request_of(args, kwargs) if work else None, model_code):
                return fn(*args, **kwargs)

        return call

    return wrap


@contextmanager
def _boundary(what: str | None, request: Any, model_code: bool) -> Iterator[None]:
    try:
        if model_code:
            wait_for_imports()
        if what is None:
            yield
        else:
            with session_work(request, what):
                yield
    except gr.Error:
        raise
    except UserError as exc:
        raise said(exc) from None
    except RecursionError:
        raise said("the input is nested too deeply to read") from None
    except Exception as exc:
        log.exception("a page handler failed")
        raise said(f"something failed on our side ({type(exc).__name__}); the server's log has the details") from None
