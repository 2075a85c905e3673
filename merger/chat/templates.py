"""Chat templates under a time and output limit.

A chat template is code from the model's repo, run by Jinja's sandbox, which caps `range()` but
not loops inside loops: two nested `range(99999)` loops would hold a worker for hours. So the
conversation is checked first (message and conversation size, text that is text), then the
template renders with a trace on its own frames only (Jinja compiles templates to Python code
named "<template>"): each line it runs checks the clock, each piece it yields counts towards the
output limit, and past either it is stopped and refused, naming the model. A single operation
that is slow inside C (one huge string multiplication) is not interrupted by this.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from merger.errors import ChatTemplateError, UserError
from merger.limits import CONVERSATION_CHARS, MESSAGE_CHARS, PROMPT_CHARS, TEMPLATE_SECONDS, check_text

TEMPLATE_CODE = "<template>"  # the file name Jinja gives the code of a template compiled from a string


class _Overrun(Exception):
    """Raised inside the template's frames to stop it; never leaves this module."""


def check_conversation(messages: Sequence[dict[str, Any]]) -> None:
    """Each message, and all of them together, within the chat limits, and made of text."""
    total = 0
    for i, message in enumerate(messages, start=1):
        content = message.get("content")
        if not isinstance(content, str):
            raise UserError(f"message {i} of the conversation has no text")
        check_text(content, f"message {i} of the conversation")
        MESSAGE_CHARS.check(len(content), f"message {i} of the conversation")
        total += len(content)
    CONVERSATION_CHARS.check(total, "the conversation")


def render_chat_template(tokenizer: Any, messages: list[dict[str, Any]], *, model: str, **options: Any) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **options)` within the limits."""
    check_conversation(messages)
    guard = _Guard(seconds=TEMPLATE_SECONDS.value, max_chars=PROMPT_CHARS.value)
    try:
        with guard:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except _Overrun as exc:
        raise ChatTemplateError(f"the chat template of {model} {exc}; it was stopped") from None
    except UserError:
        raise
    except Exception as exc:  # the template's own raise_exception, or a mistake in it
        raise ChatTemplateError(f"the chat template of {model} failed on this conversation: {exc}") from None
    PROMPT_CHARS.check(len(text), f"the prompt the chat template of {model} wrote")
    return text


class _Guard:
    """A trace on template frames: a deadline per line run, a count of characters yielded."""

    def __init__(self, *, seconds: float, max_chars: int) -> None:
        self.seconds, self.max_chars = seconds, max_chars
        self.deadline = 0.0
        self.chars = 0
        self._previous: Any = None

    def __enter__(self) -> _Guard:
        self.deadline = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._in_template if frame.f_code.co_filename == TEMPLATE_CODE else None

    def _in_template(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "return" and isinstance(arg, str):  # a generator's yield: a piece of output
            self.chars += len(arg)
            if self.chars > self.max_chars:
                raise _Overrun(f"wrote more than {PROMPT_CHARS.allowed()}")
        if time.monotonic() > self.deadline:
            raise _Overrun(f"ran past {TEMPLATE_SECONDS.allowed()}")
        return self._in_template
