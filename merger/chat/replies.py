"""Replies from a built model, streamed through its fast decoder (merger.generate.loop), which a
Stop button can interrupt; several models side by side."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from merger.chat.prompts import format_prompt, has_chat_template, stop_token_ids
from merger.errors import LimitError, UserError
from merger.generate.settings import GenerationSettings
from merger.limits import CONTEXT_TOKENS

if TYPE_CHECKING:
    from merger.generate.loop import ModelDecoder
    from merger.plan import Plan


class Chattable(Protocol):
    """What a reply needs of a build (merger.runtime.builds.Built is one)."""

    model: Any
    tokenizer: Any
    plan: Plan

    @property
    def decoder(self) -> ModelDecoder: ...


@dataclass
class ReplyStats:
    """Filled in by stream_reply: what a tester reads under each reply."""

    first_text_s: float | None = None  # time to the first streamed text
    seconds: float = 0.0
    new_tokens: int = 0
    served: dict[str, int] = field(default_factory=dict)  # decode steps by the step form that ran them, in order
    compiling_s: float | None = None  # how long the build's step had been compiling when the reply ended

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - (self.first_text_s or 0.0)
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    def summary(self) -> str:
        first = f"{self.first_text_s * 1000:.0f} ms" if self.first_text_s is not None else "n/a"
        speed = f"first text after {first} · {self.new_tokens} tokens · {self.tokens_per_s:.1f} tokens/s"
        return f"{speed} · {self.served_by()}" if self.served else speed

    def served_by(self) -> str:
        """Which step forms decoded the reply, e.g. 'on the eager step in a CUDA graph (40 steps), then
        the compiled step in a CUDA graph (215 steps)', and whether the faster one is still compiling."""
        forms = list(self.served.items())
        if len(forms) == 1:
            text = f"on the {forms[0][0]}"
        else:
            text = "on the " + ", then the ".join(f"{form} ({steps} steps)" for form, steps in forms)
        if self.compiling_s is not None:
            text += f"; the compiled step is compiling ({self.compiling_s:.0f} s so far) and takes over when ready"
        return text


def stream_reply(
    built: Chattable,
    history: list[dict[str, str]],
    settings: GenerationSettings,
    stop: threading.Event | None = None,
    stats: ReplyStats | None = None,
    *,
    prompt: str | None = None,
    stop_strings: Sequence[str] = (),
) -> Iterator[str]:
    """Yield the reply so far after each new piece of text; fill `stats` as it goes. `prompt`
    replaces the templated conversation (roleplay, continue); `stop_strings` end the reply, unshown."""
    tokenizer, model = built.tokenizer, built.model
    if prompt is None:
        prompt = format_prompt(tokenizer, history, model=built.plan.tokenizer_model.label)
    # Templates already carry the BOS token; adding it again would double it.
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("there is nothing to continue: the prompt is empty")
    decoder = built.decoder  # the reply's own: a session dropped meanwhile closes it, never makes another
    if not decoder.fits(ids.shape[1], settings.max_new_tokens):
        raise LimitError(
            f"the conversation ({ids.shape[1]:,} tokens) plus {settings.max_new_tokens:,} new tokens is longer than "
            f"the {decoder.context_tokens:,}-token window this build holds; clear the chat or ask for fewer tokens "
            f"(an operator can raise {CONTEXT_TOKENS.variable}, up to the model's own maximum)"
        )
    stops = stop_token_ids(tokenizer, model)
    stats = stats if stats is not None else ReplyStats()
    decoder_stop = threading.Event()  # ends the decoder's generation when this reply ends early
    tokens: list[int] = []
    text = shown = ""
    start = time.perf_counter()
    try:
        for token in decoder.stream(
            ids,
            stop=decoder_stop,
            stop_ids=stops,
            served=stats.served,
            **asdict(settings),  # whole: a new setting reaches the sampler with no edit here
        ):
            tokens.append(token)
            stats.new_tokens, stats.seconds = len(tokens), time.perf_counter() - start  # the speed so far
            if stop is not None and stop.is_set():
                break
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # a character split across tokens: wait for the rest of it
            cut = _without_stop(text, stop_strings)
            if cut != shown:
                shown = cut
                if stats.first_text_s is None:
                    stats.first_text_s = time.perf_counter() - start
                yield shown
            if cut != text:
                break  # the model began to speak for the user
    finally:
        decoder_stop.set()
        stats.new_tokens = len(tokens)
        stats.seconds = time.perf_counter() - start
        stats.compiling_s = decoder.compiling_for()
    yield shown


def _without_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The reply up to the first stop string."""
    cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@dataclass
class SideReply:
    """One column of a side-by-side comparison: its text so far, its speed, or why it failed."""

    text: str = ""
    stats: ReplyStats = field(default_factory=ReplyStats)
    error: str | None = None


_END = object()


def stream_side_by_side(
    requests: Sequence[tuple[Chattable, list[dict[str, str]], dict[str, Any]]],
    settings: GenerationSettings,
    stop: threading.Event | None = None,
) -> Iterator[list[SideReply]]:
    """The same settings and seed sent to several models at once ((built, history, stream_reply's
    keyword options) each); yields every column after each new piece of any of them. Each reply is
    the one a separate run gives: every request draws from its own seeded generator. A user mistake
    (a prompt too long for one model's window) fills that column with the reason."""
    replies = [SideReply() for _ in requests]
    updates: queue.SimpleQueue = queue.SimpleQueue()
    stop_all = threading.Event()  # the user's Stop, or the reader went away

    def run(i: int, built: Chattable, history: list[dict[str, str]], options: dict[str, Any]) -> None:
        try:
            for text in stream_reply(built, history, settings, stop_all, replies[i].stats, **options):
                updates.put((i, text))
        except Exception as exc:  # reported in the reader's thread
            updates.put((i, exc))
        finally:
            updates.put((i, _END))

    threads = [threading.Thread(target=run, args=(i, *r), daemon=True) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    failure: Exception | None = None
    try:
        running = len(threads)
        while running:
            i, item = updates.get()
            if stop is not None and stop.is_set():
                stop_all.set()
            if item is _END:
                running -= 1
            elif isinstance(item, UserError):
                replies[i].error = str(item)
            elif isinstance(item, Exception):
                failure = failure or item
                stop_all.set()
            else:
                replies[i].text = item
                yield replies
    finally:
        stop_all.set()
        for thread in threads:
            thread.join()
    if failure is not None:
        raise failure
    yield replies
