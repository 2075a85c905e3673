"""Share links: a recipe (and the page's settings) as a compact, URL-safe, versioned token, and
back; a damaged or oversized link is one sentence, never a traceback."""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

from pydantic import ValidationError

from merger.errors import RecipeError, UserError
from merger.limits import SHARE_LINK_BYTES, SHARE_LINK_CHARS
from merger.recipe import Recipe, first_problem

SHARE_VERSION = "v1"


def to_share_token(recipe: Recipe, settings: dict[str, Any] | None = None) -> str:
    """Compact, URL-safe, versioned: 'v1.' + base64url(zlib(JSON of the mergekit form + settings))."""
    payload = {"recipe": recipe.compacted().model_dump(mode="json", exclude_defaults=True), "settings": settings or {}}
    raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
    return f"{SHARE_VERSION}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def from_share_token(token: str) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and settings a share link carries; a damaged link is a RecipeError."""
    damaged = "this share link is damaged or incomplete; showing the default stack"
    SHARE_LINK_CHARS.check(len(token), "this share link")
    version, _, body = token.partition(".")
    if version != SHARE_VERSION:
        raise RecipeError(f"this share link's format ('{version[:8]}') is not one this app reads")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, SHARE_LINK_BYTES.value)
        if inflater.unconsumed_tail:
            raise SHARE_LINK_BYTES.exceeded("this share link, unpacked,")
        payload = json.loads(text)
        recipe = Recipe.model_validate(payload["recipe"])
        settings = payload.get("settings") or {}
    except UserError:
        raise
    except ValidationError as exc:
        why = first_problem(exc)
        raise RecipeError(f"this share link's recipe cannot be used ({why}); showing the default stack") from None
    except (ValueError, KeyError, TypeError, RecursionError, zlib.error, binascii.Error):
        raise RecipeError(damaged) from None
    if not isinstance(settings, dict):
        raise RecipeError(damaged)
    return recipe, settings
