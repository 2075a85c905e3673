"""Chat through the fast decoder: prompts, streaming, seeds, stop events and strings, continuing a
reply, the window, and side-by-side replies equal to separate runs."""

import itertools
import threading

import pytest
import torch

from merger.chat.prompts import format_prompt
from merger.chat.replies import ReplyStats, stream_reply
from merger.errors import UserError
from merger.generate.settings import GenerationSettings
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime.builds import build, prepare_for_chat

from refs import ANY_PATH

HELLO = [{"role": "user", "content": "Hello"}]


def built_tiny(path, *ranges, dtype=None):
    return prepare_for_chat(
        build(make_plan(passthrough(*[(str(path), a, b) for a, b in ranges], dtype=dtype), ANY_PATH), device="cpu")
    )


def test_chat_uses_the_template_and_streams_growing_text(tiny_llama):
    built = built_tiny(tiny_llama, (0, 4), (2, 6))
    assert format_prompt(built.tokenizer, HELLO).endswith("<|im_start|>assistant\n")
    settings = GenerationSettings(temperature=0.8, max_new_tokens=12, seed=3)
    pieces = list(stream_reply(built, HELLO, settings))
    assert pieces and all(b.startswith(a) for a, b in itertools.pairwise(pieces))
    assert pieces[-1] == list(stream_reply(built, HELLO, settings))[-1]  # same seed, same reply
    assert pieces[-1] != list(stream_reply(built, HELLO, GenerationSettings(temperature=0.8, max_new_tokens=12)))[-1]


@pytest.mark.parametrize(("penalty", "dtype"), [(1.0, "float32"), (1.3, "float32"), (1.0, "bfloat16")])
def test_greedy_reply_is_the_text_plain_generate_gives(tiny_llama, penalty, dtype):
    built = built_tiny(tiny_llama, (0, 4), (2, 6), dtype=dtype)
    assert built.model.dtype == getattr(torch, dtype)
    settings = GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=penalty)
    *_, reply = stream_reply(built, HELLO, settings)
    ids = built.tokenizer(format_prompt(built.tokenizer, HELLO), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = built.model.generate(**ids, max_new_tokens=24, do_sample=False, repetition_penalty=penalty)
    expected = built.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply == expected and reply


def test_base_model_without_template_gets_plain_completion(tiny_gemma):
    built = built_tiny(tiny_gemma, (0, 12))
    history = [{"role": "user", "content": "The quick brown"}]
    assert format_prompt(built.tokenizer, history) == "The quick brown"
    *_, reply = stream_reply(built, history, GenerationSettings(temperature=0, max_new_tokens=8))
    assert isinstance(reply, str)


def test_continue_carries_on_inside_the_last_assistant_message(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    history = [*HELLO, {"role": "assistant", "content": "The quick"}]
    prompt = format_prompt(built.tokenizer, history, continue_last=True)
    assert prompt.endswith("<|im_start|>assistant\nThe quick")  # no end of turn: the model goes on
    *_, more = stream_reply(built, history, GenerationSettings(temperature=0, max_new_tokens=8), prompt=prompt)
    ids = built.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = built.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert more == built.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_stop_event_ends_generation_early(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    stop = threading.Event()
    stop.set()
    *_, reply = stream_reply(built, HELLO, GenerationSettings(temperature=0, max_new_tokens=200), stop)
    assert len(built.tokenizer(reply)["input_ids"]) < 5


def test_a_reply_whose_build_is_let_go_ends_quietly(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    stats = ReplyStats()
    pieces = stream_reply(built, HELLO, GenerationSettings(temperature=0, max_new_tokens=40), stats=stats)
    next(pieces)
    built.close()  # the visitor left: their session's build is dropped while the reply streams
    pieces.close()  # the page closes the reply; it must not make a decoder for the model let go
    assert stats.new_tokens >= 1 and stats.compiling_s is None


def test_stop_string_ends_the_reply_before_it(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    settings = GenerationSettings(temperature=1.0, max_new_tokens=40, seed=5)
    *_, full = stream_reply(built, HELLO, settings)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    *_, cut = stream_reply(built, HELLO, settings, stop_strings=[stop])
    assert cut == full[: full.index(stop)]


def test_a_conversation_longer_than_the_window_is_refused_in_words(tiny_llama):
    built = built_tiny(tiny_llama, (0, 6))
    built.decoder.context_tokens = 16
    built.decoder._shared = object()  # a GPU decoder's fixed window, simulated
    with pytest.raises(UserError, match="16-token window this build holds; clear the chat"):
        next(stream_reply(built, HELLO, GenerationSettings(max_new_tokens=64)))


def test_replies_streamed_side_by_side_equal_separate_runs(tiny_llama, tiny_llama_b):
    from merger.chat.replies import stream_side_by_side

    merge, parent = built_tiny(tiny_llama, (0, 4), (2, 6)), built_tiny(tiny_llama_b, (0, 6))
    settings = GenerationSettings(temperature=0.9, max_new_tokens=20, seed=11)
    alone = [list(stream_reply(b, HELLO, settings))[-1] for b in (merge, parent)]
    frames = list(stream_side_by_side([(merge, HELLO, {}), (parent, HELLO, {})], settings))
    assert [frames[-1][0].text, frames[-1][1].text] == alone
    assert alone[0] != alone[1]
    assert all(f.stats.new_tokens > 0 for f in frames[-1])
