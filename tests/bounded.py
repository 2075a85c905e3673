"""Guards for tests of bounded work. The test asserts on the refusal; `run_within` only turns a
hang (the unbounded work the refusal replaces) into a failure instead of a stuck run, and
`peak_rss_growth` measures how far the process's memory rose while a call ran."""

import threading
import time
from collections.abc import Callable
from typing import Any


def run_within(seconds: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs)'s result (or its exception, raised here); fails if it runs longer."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)} still running after {seconds} s: its work is not bounded")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def peak_rss_growth(fn: Callable[..., Any], *args: Any, seconds: float = 60, **kwargs: Any) -> tuple[int, Any]:
    """(the process's peak resident memory during fn(*args, **kwargs) minus before, in bytes; the
    call's result or exception, returned); sampled every 5 ms."""
    import psutil

    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        outcome: Any = run_within(seconds, fn, *args, **kwargs)
    except AssertionError:
        raise
    except Exception as exc:  # the refusal: the caller asserts on it
        outcome = exc
    finally:
        done.set()
        sampler.join()
    return max(peak, process.memory_info().rss) - before, outcome
