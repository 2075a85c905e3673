"""Every limit on what one request may ask of the app, in one place.

A public Space serves strangers, so each input that could make the work grow (recipe text, YAML
aliases, slices, merged depth, blend parameters, chat text, cards, calibration text, time) has a
limit, checked before the work it bounds starts. A refusal is one sentence that names the limit
and the environment variable an operator sets to raise it (`FRANKENMERGE_MAX_<NAME>`, read at
each check). The README's "Limits" table lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from merger.errors import LimitError, UserError


@dataclass(frozen=True)
class Limit:
    name: str  # FRANKENMERGE_MAX_<name> raises it
    default: int
    unit: str  # what is counted, plural: "characters", "layers"
    about: str  # what it bounds, for the README table

    @property
    def variable(self) -> str:
        return f"FRANKENMERGE_MAX_{self.name}"

    @property
    def value(self) -> int:
        raw = os.environ.get(self.variable, "").strip()
        if not raw:
            return self.default
        try:
            value = int(float(raw))
        except (ValueError, OverflowError):
            raise ValueError(f"{self.variable}={raw!r} is not a number of {self.unit}") from None
        if value < 1:
            raise ValueError(f"{self.variable}={raw!r} must be at least 1")
        return value

    def check(self, amount: int, subject: str) -> None:
        """Refuse `amount` (of `subject`: "the recipe", "this message") past the limit."""
        if amount > self.value:
            raise LimitError(self.refusal(f"{subject} has {count_text(amount)} {self.unit}"))

    def exceeded(self, subject: str) -> LimitError:
        """The refusal of something found past the limit before it was counted to the end."""
        return LimitError(f"{subject} has more than {self.allowed()}")

    def refusal(self, what: str) -> str:
        """One sentence: what was asked, then the limit and how an operator raises it."""
        return f"{what}, more than {self.allowed()}"

    def allowed(self) -> str:
        """'the N units this app allows (an operator can raise VARIABLE)'."""
        return f"the {self.value:,} {self.unit} this app allows (an operator can raise {self.variable})"


def count_text(n: int) -> str:
    """A count for a message; an absurd one (a layer index of 10**30) as a power of ten."""
    return f"{n:,}" if abs(n) < 10**15 else f"about 10^{len(str(abs(n))) - 1}"


RECIPE_CHARS = Limit("RECIPE_CHARS", 256 * 1024, "characters", "recipe text (YAML box, file, API)")
RECIPE_NODES = Limit("RECIPE_NODES", 100_000, "YAML nodes", "a recipe's YAML values, each alias counted as its copy")
RECIPE_DEPTH = Limit("RECIPE_DEPTH", 32, "levels of nesting", "nesting in a recipe's YAML or a share link's JSON")
SLICES = Limit("SLICES", 1024, "slices", "slices in a recipe (before repeats)")
LAYERS = Limit("LAYERS", 1024, "layers", "merged depth; also a parent's depth and any layer index")
MODELS = Limit("MODELS", 16, "models", "different models one recipe names")
PARAMETER_VALUES = Limit("PARAMETER_VALUES", 256, "values", "numbers and {filter, value} entries in one parameter")
PARAMETER_DEPTH = Limit("PARAMETER_DEPTH", 4, "levels of nesting", "lists inside lists in one blend parameter")
SHARE_LINK_CHARS = Limit("SHARE_LINK_CHARS", 8192, "characters", "a share link's token")
SHARE_LINK_BYTES = Limit("SHARE_LINK_BYTES", 64 * 1024, "bytes", "a share link's unpacked JSON")
MESSAGE_CHARS = Limit("MESSAGE_CHARS", 32_000, "characters", "one chat message")
CONVERSATION_CHARS = Limit("CONVERSATION_CHARS", 256_000, "characters", "a whole conversation, every turn")
CONTEXT_TOKENS = Limit(
    "CONTEXT_TOKENS", 4096, "tokens", "a build's context window: prompt plus reply (or the model's own maximum)"
)
NEW_TOKENS = Limit("NEW_TOKENS", 1024, "tokens", "max new tokens of one reply")
PROMPT_CHARS = Limit("PROMPT_CHARS", 256_000, "characters", "the prompt a chat template writes")
TEMPLATE_SECONDS = Limit("TEMPLATE_SECONDS", 2, "seconds", "rendering a model's chat template once")
CARD_BYTES = Limit("CARD_BYTES", 2**20, "bytes", "a character card's JSON")
CARD_PNG_BYTES = Limit("CARD_PNG_BYTES", 16 * 2**20, "bytes", "a PNG character card")
CARD_FIELD_CHARS = Limit("CARD_FIELD_CHARS", 32_000, "characters", "one field of a character card")
CARD_CHARS = Limit("CARD_CHARS", 64_000, "characters", "a card's text with {{char}} and {{user}} filled in")
LENS_TEXT_CHARS = Limit("LENS_TEXT_CHARS", 200_000, "characters", "calibration text pasted on the page")
LENS_TOKENS = Limit("LENS_TOKENS", 8192, "tokens", "tokens of any text a Lens or perplexity run reads on the page")
REQUEST_SECONDS = Limit(
    "REQUEST_SECONDS", 900, "seconds", "one request's long work (Lens run, preview, build, export, reply)"
)
EVAL_TASKS = Limit("EVAL_TASKS", 16, "tasks", "tasks one eval runs (a group counted as its tasks)")
EVAL_ITEMS = Limit("EVAL_ITEMS", 500, "items", "items an eval scores of each task")
EVAL_MODELS = Limit("EVAL_MODELS", 4, "models", "models one eval scores (the merge and its parents)")
SAFETENSORS_HEADER_BYTES = Limit("SAFETENSORS_HEADER_BYTES", 100 * 2**20, "bytes", "a safetensors file's header")

ALL = (
    RECIPE_CHARS,
    RECIPE_NODES,
    RECIPE_DEPTH,
    SLICES,
    LAYERS,
    MODELS,
    PARAMETER_VALUES,
    PARAMETER_DEPTH,
    SHARE_LINK_CHARS,
    SHARE_LINK_BYTES,
    MESSAGE_CHARS,
    CONVERSATION_CHARS,
    CONTEXT_TOKENS,
    NEW_TOKENS,
    PROMPT_CHARS,
    TEMPLATE_SECONDS,
    CARD_BYTES,
    CARD_PNG_BYTES,
    CARD_FIELD_CHARS,
    CARD_CHARS,
    LENS_TEXT_CHARS,
    LENS_TOKENS,
    REQUEST_SECONDS,
    EVAL_TASKS,
    EVAL_ITEMS,
    EVAL_MODELS,
    SAFETENSORS_HEADER_BYTES,
)


def markdown_table() -> str:
    """The README's table of limits."""
    rows = [f"| {lim.about} | {lim.default:,} {lim.unit} | `{lim.variable}` |" for lim in ALL]
    return "\n".join(["| limit | default | variable |", "|---|---|---|", *rows])


def check_text(text: str, subject: str) -> None:
    """Refuse text that is not Unicode text: half of a surrogate pair (which JSON can carry, but
    no encoder, tokenizer or file system accepts) is a mistake to say, not a crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        raise UserError(
            f"{subject} contains U+{bad:04X}, half of a surrogate pair that is not a character on its own; remove it"
        ) from None
