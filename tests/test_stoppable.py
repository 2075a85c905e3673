"""Long work can be stopped: a Lens run ends at its next step when the visitor leaves the page or
presses Stop, and any request's work (a Lens run, a reply) ends, with a message, when it runs
past the per-request time budget."""

import threading
from types import SimpleNamespace

import gradio as gr
import pytest

from merger.plan import make_plan
from merger.recipe import passthrough
from ui import chat as bench
from ui import guard
from ui.lens import analyze_model
from ui.recipe_state import empty_state

from bounded import run_within
from refs import ANY_PATH

TEXT = "The tide came in over the flats while the herons waited by the channel. "


def no_progress(fraction: float, desc: str | None = None) -> None:
    pass


class HeldProgress:
    """A progress bar whose first update waits until the test lets it go (a Lens run in flight)."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, fraction: float, desc: str | None = None) -> None:
        if not self.started.is_set():
            self.started.set()
            assert self.release.wait(30)


def lens_in_flight(ref: str, request, text: str) -> tuple[threading.Thread, HeldProgress, dict]:
    progress, outcome = HeldProgress(), {}

    def run() -> None:
        try:
            outcome["value"] = analyze_model(ref, text * 40, empty_state(), progress, request)
        except gr.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert progress.started.wait(120), "the lens never reported progress"
    return thread, progress, outcome


@pytest.mark.parametrize(
    ("how", "unique"),
    [("leaves the page", "one"), ("presses Stop", "two")],
)
def test_a_lens_run_stops_at_its_next_step_when_the_visitor_leaves_or_presses_stop(web_tiny_llama, how, unique):
    request = SimpleNamespace(session_hash=f"lens-{unique}")
    other = SimpleNamespace(session_hash="someone-else")
    thread, progress, outcome = lens_in_flight(web_tiny_llama, request, f"{unique} {TEXT}")
    guard.stop_session_work(other.session_hash)  # another visitor leaving stops nothing of this one
    if how == "leaves the page":
        bench.forget_session(request)  # what demo.unload runs
    else:
        guard.stop_work(request)  # the Lens tab's Stop button
    progress.release.set()
    thread.join(60)
    assert not thread.is_alive()
    assert "value" not in outcome
    assert outcome["error"].message == "The lens was stopped."


def test_a_lens_run_past_the_time_budget_ends_with_a_message(web_tiny_llama, monkeypatch):
    monkeypatch.setenv("FRANKENMERGE_MAX_REQUEST_SECONDS", "1")
    clock = iter(range(0, 10**6, 5))  # every look at the clock is five seconds later
    monkeypatch.setattr(guard, "clock", lambda: next(clock))
    with pytest.raises(gr.Error, match=r"The lens ran 5 seconds, more than the 1 seconds .*; it was stopped"):
        run_within(120, analyze_model, web_tiny_llama, f"budget {TEXT}", empty_state(), no_progress)


def test_a_reply_past_the_time_budget_stops_and_says_so(tiny_llama, monkeypatch):
    request = SimpleNamespace(session_hash="reply-budget")
    plan = make_plan(passthrough((str(tiny_llama), 0, 6)), ANY_PATH)
    bench.build_into(bench.slot(request), plan, no_progress)
    try:
        monkeypatch.setenv("FRANKENMERGE_MAX_REQUEST_SECONDS", "1")
        clock = iter(range(0, 10**6, 5))
        monkeypatch.setattr(guard, "clock", lambda: next(clock))
        frames = list(bench.chat("Hello", [], 0.0, 0.9, 40, 0, 0.0, 1.0, 0, request=request))
        history, stats = frames[-1]
        assert history[-1]["role"] == "assistant"  # the reply so far stays on screen
        assert "The reply ran 5 seconds, more than the 1 seconds" in stats.replace("\\", "")
        assert len(frames) <= 3  # it stopped at its first piece
    finally:
        bench.SESSIONS.drop_session("reply-budget")
