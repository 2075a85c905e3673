"""JSON from files we did not write (configs, safetensors headers): a JSON object, or one
sentence saying what is wrong with it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from merger.errors import UserError


def json_object(read: Callable[[], bytes | str], what: str, error: type[UserError]) -> dict[str, Any]:
    """`read()` parsed as a JSON object; an unreadable file, text that is not JSON (or not
    UTF-8, or nested past Python's recursion limit) or JSON that is not an object is `error`."""
    try:
        data = json.loads(read())
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror}") from None
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 too
        raise error(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object (it holds a {type(data).__name__})")
    return data
