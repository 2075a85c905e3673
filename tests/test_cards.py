"""Character cards: every field, substitution, template and transcript prompts, PNG import, limits."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from merger.chat.cards import parse_card, roleplay_prompt, stop_strings
from merger.errors import UserError

from tiny import tiny_tokenizer

ASSETS = Path(__file__).parent.parent / "assets" / "characters"
MIRELA = ASSETS / "captain-mirela.json"


def png_with_card(card_json: bytes) -> bytes:
    info = PngInfo()
    info.add_text("chara", base64.b64encode(card_json).decode())
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "purple").save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_sample_cards_parse_with_every_field_and_no_creator_notes():
    card = parse_card(MIRELA.read_bytes())
    assert card.name == "Captain Mirela"
    assert card.scenario.startswith("{{user}} has just signed on")
    assert len(card.greetings()) == 2
    assert not hasattr(card, "creator_notes")
    assert parse_card((ASSETS / "professor-quill.json").read_bytes()).system_prompt


def test_template_prompt_has_card_as_system_greeting_first_and_substituted_names():
    card = parse_card(MIRELA.read_bytes())
    tok = tiny_tokenizer(chat=True)
    history = [{"role": "user", "content": "I can read any chart, {{char}}."}]
    prompt = roleplay_prompt(tok, card, "Rin", history)
    system, rest = prompt.split("<|im_end|>", 1)
    for text in ("airship Gull's Errand", "dry humour", "Scenario: Rin has just signed on", "Eleven years"):
        assert text in system
    assert "creator_notes" not in prompt and "Not sent to the model" not in prompt
    assert rest.index("looks Rin up and down") < rest.index("I can read any chart, Captain Mirela.")
    assert "(Keep Captain Mirela's replies under 120 words.)" in rest  # post-history instructions
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "{{" not in prompt


def test_alternate_greeting_can_open_the_conversation():
    card = parse_card(MIRELA.read_bytes())
    prompt = roleplay_prompt(tiny_tokenizer(chat=True), card, "Rin", [], greeting=1)
    assert "The deck lurches" in prompt and "looks Rin up and down" not in prompt


def test_transcript_prompt_for_models_without_a_template_ends_on_the_characters_turn():
    card = parse_card((ASSETS / "professor-quill.json").read_bytes())
    prompt = roleplay_prompt(tiny_tokenizer(chat=False), card, "Rin", [{"role": "user", "content": "Hello!"}])
    assert prompt.startswith("You are Professor Quill, a gentle teacher.")
    assert "\nProfessor Quill: Ah, Rin, just in time" in prompt
    assert prompt.endswith("\nRin: Hello!\nProfessor Quill:")
    assert "\nRin:" in stop_strings("Rin")


def test_png_cards_are_read_from_their_chara_chunk():
    card = parse_card(png_with_card(MIRELA.read_bytes()), "mirela.png")
    assert card.name == "Captain Mirela" and card.alternate_greetings


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "neither a character card"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), "no `name`"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": "A", "description": 5}}).encode(), "must be text"),
        (json.dumps({"name": "A", "description": "x" * 40_000}).encode(), "40,000 characters, more than the 32,000"),
        (b"{" + b" " * (2 * 2**20) + b"}", "2,097,154 bytes, more than the 1,048,576"),
        (png_with_card(b"")[:40] + b"\x00" * 20, "without a character card"),
    ],
)
def test_bad_cards_are_refused_with_a_clear_message(raw, message):
    with pytest.raises(UserError, match=message):
        parse_card(raw, "card")
