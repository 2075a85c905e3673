"""Chat within limits: a huge message, a long conversation, a card that multiplies when its names
are filled in, a chat template that loops, settings out of range and text that is not text are
each refused in one sentence, quickly and without the memory the work would have taken."""

import math
import re
from types import SimpleNamespace

import gradio as gr
import pytest

from merger.chat.cards import card_from_dict, roleplay_prompt
from merger.chat.prompts import format_prompt
from merger.errors import ChatTemplateError, UserError
from merger.generate.settings import GenerationSettings
from merger.plan import make_plan
from merger.recipe import passthrough
from ui import chat as bench
from ui.roleplay import load_card

from bounded import peak_rss_growth, run_within
from hostile_inputs import NESTED_LOOPS, half_megabyte_card
from refs import ANY_PATH
from tiny import tiny_tokenizer

GREEDY = (0.0, 0.9, 8, 0, 0.0, 1.0, 0)  # temperature, top-p, max new tokens, top-k, min-p, penalty, seed
MB = 2**20


@pytest.fixture
def visitor(tiny_llama):
    request = SimpleNamespace(session_hash="limits-visitor")
    built = bench.build_into(
        bench.slot(request), make_plan(passthrough((str(tiny_llama), 0, 6)), ANY_PATH), lambda *a, **k: None
    )
    yield request, built
    bench.SESSIONS.drop_session("limits-visitor")


def reply(request, message, history=(), settings=GREEDY):
    *_, last = bench.chat(message, list(history), *settings, request=request)
    return last


def test_a_1mb_chat_message_is_refused_quickly_and_without_the_memory(visitor):
    request, _ = visitor
    growth, outcome = peak_rss_growth(reply, request, "Tell me more. " * (MB // 14), seconds=60)
    assert isinstance(outcome, gr.Error)
    assert "has 1,048,572 characters, more than the 32,000 characters" in outcome.message
    assert growth < 200 * MB


def test_a_conversation_longer_than_the_window_is_refused_on_the_cpu_too(visitor):
    request, built = visitor
    assert next(built.model.parameters()).device.type == "cpu"
    history = [{"role": r, "content": "hello there"} for _ in range(200) for r in ("user", "assistant")]
    with pytest.raises(gr.Error, match=rf"longer than the {built.decoder.context_tokens:,}-token window"):
        run_within(60, reply, request, "and now?", history)


def test_a_half_megabyte_card_whose_long_name_is_used_4000_times_is_refused_when_loaded():
    raw = half_megabyte_card()
    assert len(raw) > MB // 2
    growth, outcome = peak_rss_growth(load_card, None, raw, "Rin", seconds=60)
    assert isinstance(outcome, gr.Error)
    assert "once the names are filled in, more than the 64,000 characters" in outcome.message
    assert growth < 200 * MB


def test_a_roleplay_prompt_that_would_grow_past_the_card_limit_is_refused():
    card = card_from_dict({"name": "Rin", "description": "Hi."})
    with pytest.raises(UserError, match="64,000 characters"):
        roleplay_prompt(tiny_tokenizer(chat=True), card, "U" * 20_000, [{"role": "user", "content": "{{user}}" * 4}])


def test_a_chat_template_with_nested_loops_is_stopped_within_its_time_limit(monkeypatch):
    monkeypatch.setenv("FRANKENMERGE_MAX_TEMPLATE_SECONDS", "1")
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = NESTED_LOOPS
    with pytest.raises(ChatTemplateError, match=r"the chat template of evil/loops ran past the 1 seconds"):
        run_within(30, format_prompt, tokenizer, [{"role": "user", "content": "hi"}], model="evil/loops")


def test_a_looping_template_on_the_page_is_refused_with_its_model_named(visitor, monkeypatch, tiny_llama):
    monkeypatch.setenv("FRANKENMERGE_MAX_TEMPLATE_SECONDS", "1")
    request, built = visitor
    monkeypatch.setattr(built.tokenizer, "chat_template", NESTED_LOOPS)
    with pytest.raises(gr.Error, match=f"The chat template of {tiny_llama} ran past the 1 seconds"):
        run_within(30, reply, request, "hi")


def test_a_template_writing_too_much_or_raising_is_a_sentence():
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = "{% for i in range(99999) %}{{ 'many words ' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="of m/big wrote more than the 256,000 characters"):
        run_within(30, format_prompt, tokenizer, [{"role": "user", "content": "hi"}], model="m/big")
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="of m/strict failed on this conversation: Conversation roles must"):
        format_prompt(tokenizer, [{"role": "user", "content": "hi"}], model="m/strict")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("temperature", math.nan, "`temperature` is nan; it takes a number from 0 to 2"),
        ("top_p", 1e308, "`top_p` is 1e+308; it takes a number from 0.05 to 1"),
        ("max_new_tokens", 10**12, "`max_new_tokens` is 1,000,000,000,000; it takes a whole number from 1 to 1,024"),
        ("seed", 2**70, "`seed` is 1,180,591,620,717,411,303,424; it takes a whole number from 0 to 18,446"),
        ("top_k", 2.5, "`top_k` is 2.5; it takes a whole number"),
    ],
)
def test_generation_settings_out_of_range_are_sentences(visitor, setting, value, message):
    request, _ = visitor
    names = ("temperature", "top_p", "max_new_tokens", "top_k", "min_p", "repetition_penalty", "seed")
    settings = dict(zip(names, GREEDY, strict=True)) | {setting: value}
    with pytest.raises(UserError, match=re.escape(message)):
        GenerationSettings(**settings)
    with pytest.raises(gr.Error, match=re.escape(message[1:])):  # the page says the same, as a sentence
        reply(request, "hi", settings=tuple(settings.values()))


def test_a_lone_surrogate_in_a_message_is_a_sentence(visitor):
    request, _ = visitor
    with pytest.raises(gr.Error, match="contains U\\+D800, half of a surrogate pair"):
        reply(request, "hello \ud800 there")
