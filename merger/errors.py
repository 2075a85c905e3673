"""Error classes. A `UserError` is a mistake in what the user gave us (exit code 2, one plain
sentence); anything else escaping to the CLI is our own failure (exit code 1)."""

import traceback


def exception_line(exc: BaseException) -> str:
    """`exc` as its type and message (what a fallback logs and a status shows), no traceback."""
    return "".join(traceback.format_exception_only(exc)).strip()


class UserError(ValueError):
    """A problem with the user's input, worded for the user."""


class RecipeError(UserError):
    """The recipe (YAML, widget value or share link) is malformed or cannot be built."""


class ModelRefError(UserError):
    """A model reference cannot be resolved or is not allowed."""


class UnsafeCheckpointError(ModelRefError):
    """The model only ships pickled weights, which we never load."""


class PlacementError(UserError):
    """A build cannot fit the memory of the devices at hand (the message carries the numbers)."""


class HubUnavailableError(UserError):
    """The Hugging Face Hub could not be reached (a connection error or a timeout)."""

    def __init__(self) -> None:
        super().__init__("the Hub did not answer: try again")


class LimitError(UserError):
    """An input larger than a limit allows."""


class CheckpointError(ModelRefError):
    """A weights file that is not a well-formed safetensors file."""


class ChatTemplateError(UserError):
    """A model's chat template failed, or ran past its limits, on a conversation."""


class CardError(UserError):
    """A character card that cannot be read."""


class AotLoadError(RuntimeError):
    """A package that AOTInductor's loader refused, or crashed on, in a fresh process."""


class StaleWorker(RuntimeError):
    """A ZeroGPU worker forked before the build a call needs (or before its latest change): it would
    answer from an older build under the visitor's key, or from none."""
