"""Character cards (Character Card V2, as SillyTavern uses them) and roleplay prompts.

Cards are untrusted input: size limits (merger/limits.py; the text with {{char}} and {{user}}
filled in too, since a long name used thousands of times multiplies), strict field types, and no
field is ever used as markup (the page shows card text escaped or as plain text). `creator_notes`
is for humans browsing cards, never for the model, so it is dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass, field

from merger.chat.templates import check_conversation, render_chat_template
from merger.errors import CardError, LimitError
from merger.limits import CARD_BYTES, CARD_CHARS, CARD_FIELD_CHARS, CARD_PNG_BYTES, check_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
)
DEFAULT_SYSTEM = (
    "Write {{char}}'s next reply in a fictional roleplay between {{char}} and {{user}}. "
    "Stay in character and write only {{char}}'s words and actions."
)


@dataclass(frozen=True)
class CharacterCard:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: tuple[str, ...] = field(default_factory=tuple)

    def greetings(self) -> list[str]:
        return [g for g in (self.first_mes, *self.alternate_greetings) if g.strip()]


def parse_card(raw: bytes, filename: str = "card") -> CharacterCard:
    """A card from a V2 JSON file or a PNG with the card in its `chara` text chunk."""
    if raw.startswith(PNG_SIGNATURE):
        CARD_PNG_BYTES.check(len(raw), filename)
        raw = _png_card_json(raw, filename)
    CARD_BYTES.check(len(raw), f"{filename}'s JSON")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 too
        raise CardError(f"{filename} is neither a character card JSON nor a PNG with a card inside") from None
    return card_from_dict(data, filename)


def card_from_dict(data: object, filename: str = "card") -> CharacterCard:
    if not isinstance(data, dict):
        raise CardError(f"{filename}: a character card must be a JSON object")
    if data.get("spec") == "chara_card_v2":
        fields = data.get("data")
        if not isinstance(fields, dict):
            raise CardError(f"{filename}: a V2 card needs a `data` object")
    else:
        fields = data  # V1 cards keep the same fields at the top level
    values: dict[str, str] = {}
    for key in TEXT_FIELDS:
        value = fields.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise CardError(f"{filename}: `{key}` must be text")
        CARD_FIELD_CHARS.check(len(value), f"{filename}'s `{key}`")
        check_text(value, f"{filename}'s `{key}`")
        values[key] = value
    greetings = fields.get("alternate_greetings") or []
    if not isinstance(greetings, list) or not all(isinstance(g, str) for g in greetings):
        raise CardError(f"{filename}: `alternate_greetings` must be a list of texts")
    greetings = [g[: CARD_FIELD_CHARS.value] for g in greetings[:32]]
    for greeting in greetings:
        check_text(greeting, f"{filename}'s `alternate_greetings`")
    if not values["name"].strip():
        raise CardError(f"{filename}: the card has no `name`")
    return CharacterCard(**values, alternate_greetings=tuple(greetings))


def _png_card_json(png: bytes, filename: str) -> bytes:
    """The base64 JSON of the `chara` tEXt (or zTXt/iTXt) chunk."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        body = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        keyword, _, rest = body.partition(b"\x00")
        if keyword.lower() != b"chara":
            continue
        try:
            if kind == b"zTXt":
                rest = zlib.decompressobj().decompress(rest[1:], CARD_BYTES.value * 2)
            elif kind == b"iTXt":
                compressed, rest = rest[0], rest[2:].split(b"\x00", 2)[-1]
                if compressed:
                    rest = zlib.decompressobj().decompress(rest, CARD_BYTES.value * 2)
            return base64.b64decode(rest, validate=False)
        except (binascii.Error, zlib.error, IndexError):
            raise CardError(f"{filename}: the card inside the PNG is damaged") from None
    raise CardError(f"{filename} is a PNG without a character card inside (no `chara` chunk)")


CHAR_MACRO = re.compile(r"\{\{char\}\}|<bot>", flags=re.IGNORECASE)
USER_MACRO = re.compile(r"\{\{user\}\}|<user>", flags=re.IGNORECASE)


def substitute(text: str, card: CharacterCard, user: str) -> str:
    """{{char}} and {{user}} (any case; the legacy <BOT>/<USER> too) become the two names; a
    text that would grow past the card limit is refused before it is made."""
    chars, users = CHAR_MACRO.findall(text), USER_MACRO.findall(text)
    filled = len(text) - sum(map(len, chars + users)) + len(chars) * len(card.name) + len(users) * len(user)
    if filled > CARD_CHARS.value:
        raise LimitError(CARD_CHARS.refusal(f"the card's text is {filled:,} characters once the names are filled in"))
    text = CHAR_MACRO.sub(lambda _: card.name, text)
    return USER_MACRO.sub(lambda _: user, text)


def system_text(card: CharacterCard, user: str) -> str:
    parts = [card.system_prompt or DEFAULT_SYSTEM]
    if card.description:
        parts.append(card.description)
    if card.personality:
        parts.append(f"{card.name}'s personality: {card.personality}")
    if card.scenario:
        parts.append(f"Scenario: {card.scenario}")
    if card.mes_example:
        parts.append(f"Example dialogue:\n{card.mes_example.replace('<START>', '').strip()}")
    return substitute("\n\n".join(parts), card, user)


def stop_strings(user: str) -> list[str]:
    """Where the model starts speaking for the user, the reply ends."""
    return [f"\n{user}:", f"\n{user} :"]


def roleplay_prompt(
    tokenizer,
    card: CharacterCard,
    user: str,
    history: list[dict[str, str]],
    greeting: int = 0,
    *,
    model: str | None = None,
) -> str:
    """The exact text the model receives: the chat template (of `model`, named in a refusal) with
    the card as system turn and the greeting as the opening assistant turn; a transcript for
    models without a template."""
    check_text(user, "your persona name")
    check_conversation(history)
    greetings = card.greetings()
    opening = substitute(greetings[greeting], card, user) if greetings else ""
    turns = [{"role": m["role"], "content": substitute(m["content"], card, user)} for m in history]
    if card.post_history_instructions and turns and turns[-1]["role"] == "user":
        note = substitute(card.post_history_instructions, card, user)
        turns[-1] = {"role": "user", "content": f"{turns[-1]['content']}\n\n({note})"}
    system = system_text(card, user)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}]
        if opening:
            messages.append({"role": "assistant", "content": opening})
        messages += turns
        owner = model or tokenizer.name_or_path
        return render_chat_template(tokenizer, messages, model=owner, add_generation_prompt=True)
    lines = [system, ""]
    if opening:
        lines.append(f"{card.name}: {opening}")
    for t in turns:
        lines.append(f"{user if t['role'] == 'user' else card.name}: {t['content']}")
    lines.append(f"{card.name}:")
    return "\n".join(lines)
