"""Chat with a built model: prompt formatting (chat template, or plain completion for base
models without one) and streamed generation that a Stop button can interrupt."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merger.runtime import Built

# Turn-end markers of templates we know, so a model stops at the end of its turn even when its
# generation config names only the document end (Gemma's <end_of_turn>, ChatML's <|im_end|>).
TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class ReplyStats:
    """Filled in by stream_reply: what a tester reads under each reply."""

    first_text_s: float | None = None  # time to the first streamed text
    seconds: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - (self.first_text_s or 0.0)
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    def summary(self) -> str:
        first = f"{self.first_text_s * 1000:.0f} ms" if self.first_text_s is not None else "n/a"
        return f"first text after {first} · {self.new_tokens} tokens · {self.tokens_per_s:.1f} tokens/s"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, history: list[dict[str, str]]) -> str:
    """The exact text the model receives. With a chat template: the templated conversation
    ending in the assistant's turn. Without one (a base model): plain completion of the
    conversation's text, so the model continues what the user wrote."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in history)


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in TURN_END_TOKENS if t in vocab]
    return sorted(set(ids))


def stream_reply(
    built: Built,
    history: list[dict[str, str]],
    settings: GenerationSettings,
    stop: threading.Event | None = None,
    stats: ReplyStats | None = None,
    *,
    prompt: str | None = None,
    stop_strings: Sequence[str] = (),
) -> Iterator[str]:
    """Yield the reply so far after each new piece of text; fill `stats` as it goes. `prompt`
    replaces the templated conversation (roleplay); `stop_strings` end the reply, unshown."""
    import time

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    abandoned = threading.Event()  # the consumer closed the stream: stop generating too

    class _StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> bool:
            return abandoned.is_set() or (stop is not None and stop.is_set())

    tokenizer, model = built.tokenizer, built.model
    prompt = prompt if prompt is not None else format_prompt(tokenizer, history)
    # Templates already carry the BOS token; adding it again would double it.
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not has_chat_template(tokenizer))
    inputs = {k: v.to(built.device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = settings.temperature > 0
    kwargs = dict(
        **inputs,
        streamer=streamer,
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopOnEvent()]),
    )
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if settings.repetition_penalty != 1.0:
        kwargs.update(repetition_penalty=settings.repetition_penalty)
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.min_p > 0:
            kwargs.update(min_p=settings.min_p)
    errors: list[BaseException] = []
    stats = stats if stats is not None else ReplyStats()
    prompt_len = inputs["input_ids"].shape[1]
    start = time.perf_counter()

    def run() -> None:
        try:
            torch.manual_seed(settings.seed)
            with torch.inference_mode():
                out = model.generate(**kwargs)
            stats.new_tokens = int(out.shape[1] - prompt_len)
        except BaseException as exc:  # surfaced to the caller below, after the stream ends
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            if piece:
                if stats.first_text_s is None:
                    stats.first_text_s = time.perf_counter() - start
                yield _without_stop(text, stop_strings)
    finally:
        abandoned.set()
        thread.join()
        stats.seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    yield _without_stop(text, stop_strings)


def _without_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The reply up to the first stop string (which generation includes before it halts)."""
    cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
