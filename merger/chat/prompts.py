"""The exact text a model receives: the chat template's conversation, or plain completion for base
models without one; and the tokens a reply stops on."""

from __future__ import annotations

from merger.architecture import TURN_END_TOKENS
from merger.chat.templates import check_conversation, render_chat_template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer, history: list[dict[str, str]], *, continue_last: bool = False, model: str | None = None
) -> str:
    """The exact text the model receives. With a chat template (rendered within the chat limits;
    `model` names whose template it is in a refusal): the templated conversation ending in the
    assistant's turn (or, with `continue_last`, inside the last assistant message, so the model
    carries on writing it). Without one (a base model): plain completion of the conversation's
    text, so the model continues what was written."""
    if has_chat_template(tokenizer):
        owner = model or tokenizer.name_or_path
        if continue_last:
            return render_chat_template(tokenizer, history, model=owner, continue_final_message=True)
        return render_chat_template(tokenizer, history, model=owner, add_generation_prompt=True)
    check_conversation(history)
    return "\n\n".join(m["content"] for m in history)


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in TURN_END_TOKENS if t in vocab]
    return sorted(set(ids))
