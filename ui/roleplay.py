"""The Roleplay tab: pick a sample character or import a card, then chat in character."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr

from merger.chat.cards import CharacterCard, parse_card, substitute, system_text
from merger.limits import check_text
from ui.guard import web_handler
from ui.text import md

CHARACTERS = Path(__file__).resolve().parent.parent / "assets" / "characters"


def sample_names() -> list[str]:
    return sorted(p.stem for p in CHARACTERS.glob("*.json"))


@web_handler()
def load_card(sample: str | None, upload: bytes | None, user: str) -> tuple[dict | None, str, list[dict]]:
    """The card as state, a plain-text summary and the opening turn. Cards are untrusted: the
    summary is a Textbox (plain text) and the greeting is escaped for the Chatbot's Markdown."""
    if upload:
        card = parse_card(upload, "the uploaded card")
    elif sample in sample_names():
        card = parse_card((CHARACTERS / f"{sample}.json").read_bytes(), sample)
    else:
        return None, "Pick a sample character or import a card.", []
    user = user.strip() or "User"
    check_text(user, "your persona name")
    system_text(card, user)  # refuses, now rather than at the first message, a card too long once filled in
    summary = f"{card.name}\n\n{substitute(card.description, card, user)}"
    greetings = [md(substitute(g, card, user), lines=True) for g in card.greetings()[:1]]
    opening = [{"role": "assistant", "content": greetings[0]}] if greetings else []
    return dataclasses.asdict(card), summary, opening


def card_from_state(state: dict[str, Any] | None) -> CharacterCard:
    if not state:
        raise gr.Error("Load a character first.")
    return CharacterCard(**{**state, "alternate_greetings": tuple(state.get("alternate_greetings", ()))})


def build_roleplay_tab() -> dict[str, Any]:
    """The tab's components, by name, for app.py to wire."""
    with gr.Row():
        sample = gr.Dropdown(sample_names(), value=(sample_names() or [None])[0], label="Sample character")
        upload = gr.File(
            label="…or import a card (V2 JSON or PNG)", type="binary", file_types=[".json", ".png"], elem_id="rp-upload"
        )
        user = gr.Textbox(value="User", label="Your persona name", elem_id="rp-user")
        start = gr.Button("Start", elem_id="rp-start")
    card_state = gr.State(None)
    summary = gr.Textbox(label="Character", lines=3, interactive=False, elem_id="rp-card")
    chatbot = gr.Chatbot(label="Roleplay", height=360, elem_id="rp-chatbot")
    stats = gr.Markdown(elem_id="rp-stats")
    with gr.Row():
        message = gr.Textbox(placeholder="Your move…", show_label=False, scale=5, elem_id="rp-input")
        send = gr.Button("Send", scale=1, elem_id="rp-send")
    return {
        "sample": sample,
        "upload": upload,
        "user": user,
        "start": start,
        "card_state": card_state,
        "summary": summary,
        "chatbot": chatbot,
        "stats": stats,
        "message": message,
        "send": send,
    }
