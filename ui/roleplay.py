"""The Roleplay tab: pick a sample character or import a card, then chat in character."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr

from merger.cards import CharacterCard, parse_card, substitute
from merger.errors import UserError

CHARACTERS = Path(__file__).resolve().parent.parent / "assets" / "characters"


def sample_names() -> list[str]:
    return sorted(p.stem for p in CHARACTERS.glob("*.json"))


def load_card(sample: str | None, upload: bytes | None, user: str) -> tuple[dict | None, str, list[dict]]:
    """The card as state, a plain-text summary (cards are untrusted: shown as text, never markup)
    and the opening turn."""
    try:
        if upload:
            card = parse_card(upload, "the uploaded card")
        elif sample in sample_names():
            card = parse_card((CHARACTERS / f"{sample}.json").read_bytes(), sample)
        else:
            return None, "Pick a sample character or import a card.", []
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    user = user.strip() or "User"
    summary = f"{card.name}\n\n{substitute(card.description, card, user)}"
    greetings = card.greetings()
    opening = [{"role": "assistant", "content": substitute(greetings[0], card, user)}] if greetings else []
    return dataclasses.asdict(card), summary, opening


def card_from_state(state: dict[str, Any] | None) -> CharacterCard:
    if not state:
        raise gr.Error("Load a character first.")
    return CharacterCard(**{**state, "alternate_greetings": tuple(state.get("alternate_greetings", ()))})


def build_roleplay_tab() -> dict[str, Any]:
    """The tab's components, by name, for app.py to wire."""
    with gr.Row():
        sample = gr.Dropdown(sample_names(), value=(sample_names() or [None])[0], label="Sample character")
        upload = gr.File(label="…or import a card (V2 JSON or PNG)", type="binary", file_types=[".json", ".png"])
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
