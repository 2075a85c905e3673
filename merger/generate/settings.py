"""A reply's generation settings, checked where they enter (the page, the API, the CLI): torch-free,
so the page imports them without the decode path."""

from __future__ import annotations

from dataclasses import dataclass

from merger.errors import UserError
from merger.limits import NEW_TOKENS


def setting_ranges() -> dict[str, tuple[float, float]]:
    """Each generation setting's bounds: the page's sliders and every API call share them."""
    return {
        "temperature": (0.0, 2.0),
        "top_p": (0.05, 1.0),
        "top_k": (0, 200),
        "min_p": (0.0, 0.5),
        "repetition_penalty": (1.0, 2.0),
        "max_new_tokens": (1, NEW_TOKENS.value),
        "seed": (0, 2**64 - 1),  # what torch's generators take
    }


WHOLE_SETTINGS = ("top_k", "max_new_tokens", "seed")


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else f"{x:,}"


@dataclass(frozen=True)
class GenerationSettings:
    """Checked on creation: a value out of range (NaN, 1e308, a 70-bit seed) is a UserError."""

    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name, (low, high) in setting_ranges().items():
            value = getattr(self, name)
            whole = name in WHOLE_SETTINGS
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not low <= value <= high or (whole and not float(value).is_integer()):
                kind = "a whole number" if whole else "a number"
                shown = _number(value) if number else repr(value)
                raise UserError(f"`{name}` is {shown[:40]}; it takes {kind} from {_number(low)} to {_number(high)}")
            if whole:
                object.__setattr__(self, name, int(value))
