"""The recipe: what the user edits, and its text form (mergekit YAML).

A recipe is an ordered list of slices; each slice takes the layer range [start, end) of one
source model, optionally `repeat`ed. mergekit has no `repeat`: on the way out it is expanded
into the same slice written several times, so the YAML we write always runs in mergekit.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merger.errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16")

# mergekit keys we read but do not act on yet: kept verbatim and written back out.
PRESERVED_TOP_KEYS = ("parameters", "chat_template", "tokenizer", "out_dtype")
# mergekit keys whose meaning we do not implement: refusing them beats silently building
# something other than what the YAML says.
REFUSED_TOP_KEYS = {"models": "whole-model blends (`models:`) are not supported yet; use `slices:`"}
KNOWN_TOP_KEYS = {"slices", "merge_method", "dtype", "tokenizer_source", "base_model"}


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    start: int
    end: int

    @field_validator("model")
    @classmethod
    def _model_named(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("a slice names no model")
        return value

    @model_validator(mode="after")
    def _range_ordered(self) -> Source:
        if self.start < 0:
            raise ValueError(f"layer range [{self.start}, {self.end}) of {self.model} starts below 0")
        if self.end == self.start:
            raise ValueError(f"layer range [{self.start}, {self.end}) of {self.model} is empty")
        if self.end < self.start:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) of {self.model} is reversed: "
                "the end must be greater than the start"
            )
        return self

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source
    repeat: int = Field(default=1, ge=1, le=64)

    @property
    def num_layers(self) -> int:
        return len(self.source.layers) * self.repeat


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slices: tuple[Slice, ...]
    merge_method: str = "passthrough"
    dtype: str | None = None
    tokenizer_source: str | None = None
    base_model: str | None = None
    preserved: dict[str, Any] = Field(default_factory=dict)

    @field_validator("slices")
    @classmethod
    def _not_empty(cls, value: tuple[Slice, ...]) -> tuple[Slice, ...]:
        if not value:
            raise ValueError("the recipe has no slices: add at least one layer range")
        return value

    @field_validator("merge_method")
    @classmethod
    def _passthrough_only(cls, value: str) -> str:
        if value != "passthrough":
            raise ValueError(f"merge_method '{value}' is not supported yet; only 'passthrough' is")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"dtype '{value}' is not one of {', '.join(DTYPES)}")
        return value

    @property
    def models(self) -> list[str]:
        """Every model the recipe names, first use first."""
        names = [s.source.model for s in self.slices]
        for extra in (self.base_model, self.tokenizer_source):
            if extra:
                names.append(extra)
        return list(dict.fromkeys(names))

    @property
    def layer_sources(self) -> list[tuple[str, int]]:
        """(model, layer) for every depth of the merged stack, in order."""
        return [(s.source.model, layer) for s in self.slices for _ in range(s.repeat) for layer in s.source.layers]

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    @property
    def primary_model(self) -> str:
        """The model whose embeddings, final norm, head and config the merge takes."""
        return self.base_model or self.slices[0].source.model

    def to_mergekit(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slices": [
                {"sources": [{"model": s.source.model, "layer_range": [s.source.start, s.source.end]}]}
                for s in self.slices
                for _ in range(s.repeat)
            ],
            "merge_method": self.merge_method,
        }
        for key in ("base_model", "dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.preserved)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_mergekit(), sort_keys=False, default_flow_style=None)

    def compacted(self) -> Recipe:
        """Consecutive identical slices folded into one slice with a repeat count."""
        folded: list[Slice] = []
        for s in self.slices:
            if folded and folded[-1].source == s.source:
                folded[-1] = Slice(source=s.source, repeat=folded[-1].repeat + s.repeat)
            else:
                folded.append(s)
        return self.model_copy(update={"slices": tuple(folded)})


def _refuse_unknown(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise RecipeError(f"{where} has unknown key(s): {', '.join(sorted(map(str, unknown)))}")


def _parse_slice(raw: Any, index: int) -> Slice:
    where = f"slice {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with `sources:`")
    _refuse_unknown(raw, {"sources", "repeat"}, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where} has no `sources:` list")
    if len(sources) > 1:
        raise RecipeError(f"{where} blends {len(sources)} sources; blended slices are not supported yet")
    src = sources[0]
    if not isinstance(src, dict):
        raise RecipeError(f"{where}: each source must be a mapping with `model:` and `layer_range:`")
    _refuse_unknown(src, {"model", "layer_range"}, f"{where} source")
    layer_range = src.get("layer_range")
    if (
        not isinstance(layer_range, list)
        or len(layer_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
    ):
        raise RecipeError(f"{where}: `layer_range` must be two whole numbers [start, end]")
    if not isinstance(src.get("model"), str):
        raise RecipeError(f"{where} names no model")
    try:
        return Slice(
            source=Source(model=src["model"], start=layer_range[0], end=layer_range[1]),
            repeat=raw.get("repeat", 1),
        )
    except ValidationError as exc:
        raise RecipeError(f"{where}: {_first_message(exc)}") from None


def _first_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("greater_than_equal", "less_than_equal", "int_type", "int_parsing"):
        field = ".".join(str(p) for p in err["loc"])
        return f"`{field}` {msg.lower()}"
    return msg


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a mergekit-style mapping into a Recipe; every problem is a RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping with a `slices:` list")
    for key, why in REFUSED_TOP_KEYS.items():
        if key in data:
            raise RecipeError(f"`{key}`: {why}")
    unknown = set(data) - KNOWN_TOP_KEYS - set(PRESERVED_TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown key(s) in the recipe: {', '.join(sorted(map(str, unknown)))}")
    raw_slices = data.get("slices")
    if raw_slices is None:
        raise RecipeError("the recipe has no slices: add at least one layer range")
    if not isinstance(raw_slices, list):
        raise RecipeError("`slices` must be a list")
    slices = tuple(_parse_slice(raw, i) for i, raw in enumerate(raw_slices))
    try:
        return Recipe(
            slices=slices,
            merge_method=data.get("merge_method", "passthrough"),
            dtype=data.get("dtype"),
            tokenizer_source=data.get("tokenizer_source"),
            base_model=data.get("base_model"),
            preserved={k: data[k] for k in PRESERVED_TOP_KEYS if k in data},
        )
    except ValidationError as exc:
        raise RecipeError(_first_message(exc)) from None


def recipe_from_yaml(text: str) -> Recipe:
    """Parse mergekit YAML. Syntax errors name the line and column."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"malformed YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"malformed YAML: {exc}") from None
    if data is None:
        raise RecipeError("the recipe is empty: add at least one layer range")
    return recipe_from_dict(data)


def passthrough(*ranges: tuple[str, int, int], dtype: str | None = None) -> Recipe:
    """A recipe from (model, start, end) triples: the form tests and the CLI use most."""
    return Recipe(slices=tuple(Slice(source=Source(model=m, start=a, end=b)) for m, a, b in ranges), dtype=dtype)


SHARE_VERSION = "v1"
MAX_SHARE_CHARS = 8192  # a URL stays well under browsers' limits
MAX_SHARE_JSON = 64 * 1024


def to_share_token(recipe: Recipe, settings: dict[str, Any] | None = None) -> str:
    """Compact, URL-safe, versioned: 'v1.' + base64url(zlib(JSON of the mergekit form + settings))."""
    payload = {"recipe": recipe.compacted().model_dump(mode="json"), "settings": settings or {}}
    raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
    return f"{SHARE_VERSION}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def from_share_token(token: str) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and settings a share link carries; a damaged link is a RecipeError."""
    damaged = "this share link is damaged or incomplete; showing the default stack"
    if len(token) > MAX_SHARE_CHARS:
        raise RecipeError("this share link is too long; showing the default stack")
    version, _, body = token.partition(".")
    if version != SHARE_VERSION:
        raise RecipeError(f"this share link's format ('{version[:8]}') is not one this app reads")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, MAX_SHARE_JSON)
        if inflater.unconsumed_tail:
            raise RecipeError("this share link holds too much data; showing the default stack")
        payload = json.loads(text)
        recipe = Recipe.model_validate(payload["recipe"])
        settings = payload.get("settings") or {}
    except RecipeError:
        raise
    except (ValueError, KeyError, TypeError, zlib.error, binascii.Error):
        raise RecipeError(damaged) from None
    if not isinstance(settings, dict):
        raise RecipeError(damaged)
    return recipe, settings
