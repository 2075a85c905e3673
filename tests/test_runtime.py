"""The cache of built models: one per session slot, a memory budget with least-recently-used
eviction (its owner told why), refusals with the numbers, and memory back to its baseline after
many build-chat cycles."""

import gc
import threading
import weakref

import psutil
import pytest

from merger.chat.replies import stream_reply
from merger.errors import PlacementError, UserError
from merger.generate.settings import GenerationSettings
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import devices
from merger.runtime.builds import build, prepare_for_chat
from merger.runtime.devices import needed_bytes
from merger.runtime.sessions import SessionModels

from refs import ANY_PATH

SMOL = "bundled:smollm2-135m-instruct"


def plan_of(path, *ranges):
    return make_plan(passthrough(*[(str(path), a, b) for a, b in ranges]), ANY_PATH)


def built_tiny(path, *ranges):
    return build(plan_of(path, *ranges), device="cpu")


def test_session_cache_keeps_one_model_per_session_and_frees_on_rebuild(tiny_llama):
    sessions = SessionModels()
    first, second = built_tiny(tiny_llama, (0, 6)), built_tiny(tiny_llama, (0, 3))
    sessions.put("a", first)
    sessions.put("b", built_tiny(tiny_llama, (0, 2)))
    sessions.put("a", second)
    assert sessions.get("a") is second and len(sessions) == 2
    assert first.model is None  # the replaced build was freed
    sessions.put("a:compare", built_tiny(tiny_llama, (0, 1)))
    sessions.drop_session("a")  # the visitor left: both of their models go, the other visitor's stays
    assert sessions.get("a") is None and sessions.get("a:compare") is None and sessions.get("b") is not None


def test_making_room_evicts_the_least_recently_used_and_tells_its_owner(tiny_llama):
    size = needed_bytes(plan_of(tiny_llama, (0, 6)), "cpu")
    sessions = SessionModels(budget_bytes=2 * size)
    for key in ("a", "b"):
        with sessions.room_for(key, size):
            sessions.put(key, built_tiny(tiny_llama, (0, 6)))
    assert sessions.get("a") is not None  # "a" used again: "b" is now the least recently used
    with sessions.room_for("c", size):
        sessions.put("c", built_tiny(tiny_llama, (0, 6)))
    assert sessions.get("b") is None and sessions.get("a") is not None
    assert "unloaded to make room for another visitor's build" in sessions.notice("b")
    assert sessions.notice("b") is None and sessions.notice("a") is None  # said once, to its owner only
    assert sessions.peak_bytes <= 2 * size and sessions.used_bytes == 2 * size


def test_a_build_larger_than_the_whole_budget_is_refused_with_the_numbers(tiny_llama):
    sessions = SessionModels(budget_bytes=1000)
    sessions.put("a", built_tiny(tiny_llama, (0, 2)))
    refusal = r"needs about .* more than this server's budget for built models \(1,000 B\)"
    with pytest.raises(PlacementError, match=refusal), sessions.room_for("b", 10**6):
        pass
    assert sessions.get("a") is not None  # nothing was evicted for a build that could never fit


def test_concurrent_builds_never_hold_more_than_the_budget(tiny_llama):
    size = needed_bytes(plan_of(tiny_llama, (0, 6)), "cpu")
    sessions = SessionModels(budget_bytes=3 * size)

    def visitor(key: str) -> None:
        for _ in range(3):
            with sessions.room_for(key, size):
                sessions.put(key, built_tiny(tiny_llama, (0, 6)))

    threads = [threading.Thread(target=visitor, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sessions.peak_bytes <= 3 * size
    assert len(sessions) == 3


def test_build_that_cannot_fit_is_refused_with_the_numbers_before_loading(tiny_llama, monkeypatch):
    loaded = []
    monkeypatch.setattr(devices, "free_memory", lambda device: 10 * 2**20)
    monkeypatch.setattr("merger.build.assemble.load_parent_tensors", lambda *a, **k: loaded.append(1))
    with pytest.raises(UserError, match=r"needs about .* on cpu .* but only 10\.00 MiB is free"):
        built_tiny(tiny_llama, (0, 6))
    assert not loaded


def test_memory_returns_to_its_baseline_after_twenty_build_chat_cycles():
    sessions = SessionModels()
    plan = make_plan(passthrough((SMOL, 0, 20), (SMOL, 10, 30)), ANY_PATH)
    settings = GenerationSettings(temperature=0.7, max_new_tokens=4)
    hello = [{"role": "user", "content": "Hi"}]
    models = []

    def cycle() -> None:
        built = prepare_for_chat(build(plan, device="cpu"))
        list(stream_reply(built, hello, settings))
        models.append(weakref.ref(built.model))
        sessions.put("visitor", built)  # frees the previous build

    cycle()
    sessions.drop("visitor")
    gc.collect()
    baseline, threads_before = psutil.Process().memory_info().rss, threading.active_count()
    for _ in range(20):
        cycle()
        assert psutil.Process().memory_info().rss < baseline + 1.5 * 2**30  # one build (about 0.6 GiB) at a time
    sessions.drop("visitor")
    gc.collect()
    assert all(ref() is None for ref in models)  # every build's model was freed
    assert threading.active_count() <= threads_before  # builds leave no threads behind
    grown = psutil.Process().memory_info().rss - baseline
    assert grown < 100 * 2**20, f"{grown / 2**20:.0f} MiB more than after the first cycle"
