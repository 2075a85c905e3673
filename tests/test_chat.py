import itertools
import threading

from merger.chat import GenerationSettings, format_prompt, stream_reply
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import SessionModels, build


def built_tiny(path, *ranges):
    return build(make_plan(passthrough(*[(str(path), a, b) for a, b in ranges])), device="cpu")


def test_chat_uses_the_template_and_streams_growing_text(tiny_llama):
    built = built_tiny(tiny_llama, (0, 4), (2, 6))
    history = [{"role": "user", "content": "Hello"}]
    assert format_prompt(built.tokenizer, history).endswith("<|im_start|>assistant\n")
    settings = GenerationSettings(temperature=0.8, max_new_tokens=12, seed=3)
    pieces = list(stream_reply(built, history, settings))
    assert pieces and all(b.startswith(a) for a, b in itertools.pairwise(pieces))
    assert pieces[-1] == list(stream_reply(built, history, settings))[-1]  # same seed, same reply


def test_base_model_without_template_gets_plain_completion(tiny_gemma):
    built = built_tiny(tiny_gemma, (0, 12))
    history = [{"role": "user", "content": "The quick brown"}]
    assert format_prompt(built.tokenizer, history) == "The quick brown"
    *_, reply = stream_reply(built, history, GenerationSettings(temperature=0, max_new_tokens=8))
    assert isinstance(reply, str)


def test_stop_event_ends_generation_early(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    stop = threading.Event()
    stop.set()
    settings = GenerationSettings(temperature=0, max_new_tokens=200)
    *_, reply = stream_reply(built, [{"role": "user", "content": "Hi"}], settings, stop)
    assert len(built.tokenizer(reply)["input_ids"]) < 5


def test_session_cache_keeps_one_model_per_session_and_frees_on_rebuild(tiny_llama):
    sessions = SessionModels()
    first, second = built_tiny(tiny_llama, (0, 6)), built_tiny(tiny_llama, (0, 3))
    sessions.put("a", first)
    sessions.put("b", built_tiny(tiny_llama, (0, 2)))
    sessions.put("a", second)
    assert sessions.get("a") is second and len(sessions) == 2
    assert not hasattr(first, "model")  # the replaced build was freed
    sessions.drop("b")
    assert sessions.get("b") is None


def test_build_that_cannot_fit_is_refused_with_the_numbers_before_loading(tiny_llama, monkeypatch):
    import pytest

    from merger import runtime
    from merger.errors import UserError

    loaded = []
    monkeypatch.setattr(runtime, "free_memory", lambda device: 10 * 2**20)
    monkeypatch.setattr("merger.assemble.load_parent_tensors", lambda *a, **k: loaded.append(1))
    with pytest.raises(UserError, match=r"needs about .* on cpu .* but only 10\.00 MiB is free"):
        built_tiny(tiny_llama, (0, 6))
    assert not loaded
