"""Names are text: what the page shows of a visitor's or a model's strings (model names, card
names and greetings, config fields, template errors) is escaped for where it goes.

Gradio renders Markdown components and Chatbot messages as Markdown with HTML, and toasts as HTML;
its sanitizer removes scripts but keeps links and images, so a name like
`![x](https://elsewhere/pixel.png)` would make the browser fetch from another host. For Markdown,
every punctuation mark that can begin markup, a link, an autolink (`https:`, `www.`, `a@b`), an
HTML tag or an entity is backslash-escaped (CommonMark then shows it as itself); toasts are
HTML-escaped.
"""

from __future__ import annotations

import html
import re

import gradio as gr

MAX_MESSAGE_CHARS = 600  # a toast is a sentence: a name echoed in it is cut, not shown whole
MARKUP = "\\`*_{}[]()#+-.!|<>&~:@$="  # the rest of ASCII's punctuation (',;?%/^ and quotes) is inert
_PUNCTUATION = re.compile(f"([{re.escape(MARKUP)}])")
_LINE_BREAKS = re.compile(r"[\r\n\t\f\v]+")


def md(text: object, *, lines: bool = False) -> str:
    """`text` for a Markdown surface, shown exactly as written. Inline (the default) it stays on
    one line (a name cannot start a heading or a table row); with `lines`, its line breaks stay."""
    escaped = _PUNCTUATION.sub(r"\\\1", str(text))
    return escaped if lines else _LINE_BREAKS.sub(" ", escaped)


def sentence(text: object) -> str:
    """A clause as a sentence: capitalized, ending in a full stop, cut to a toast's length."""
    text = str(text).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1].rstrip() + "…"
    return f"{text[:1].upper()}{text[1:]}{'' if text.endswith(('.', '…')) else '.'}"


def said(error: Exception | str) -> gr.Error:
    """A toast for the visitor: the error as a sentence, HTML-escaped (a toast renders HTML)."""
    return gr.Error(html.escape(sentence(error), quote=False))
