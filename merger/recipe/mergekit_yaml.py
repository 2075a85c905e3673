"""mergekit YAML (or its mapping) -> Recipe, within the recipe limits: every problem is a
RecipeError that names where it is (a line and column for malformed YAML)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from merger.errors import RecipeError
from merger.limits import RECIPE_CHARS, SLICES
from merger.methods.specs import PASSTHROUGH
from merger.recipe import (
    IGNORED_TOP_KEYS,
    KNOWN_TOP_KEYS,
    PRESERVED_TOP_KEYS,
    ModelEntry,
    Recipe,
    Settings,
    Slice,
    Source,
    bounded_yaml,
    first_problem,
)


def _refuse_unknown(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise RecipeError(f"{where} has unknown key(s): {', '.join(sorted(map(str, unknown)))}")


def _parameters_of(raw: dict, where: str) -> Settings:
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(k, str) for k in parameters):
        raise RecipeError(f"{where}: `parameters` must be a mapping of names to values")
    return parameters


def _parse_source(src: Any, where: str) -> Source:
    if not isinstance(src, dict):
        raise RecipeError(f"{where}: each source must be a mapping with `model:` and `layer_range:`")
    _refuse_unknown(src, {"model", "layer_range", "parameters"}, f"{where} source")
    layer_range = src.get("layer_range")
    if (
        not isinstance(layer_range, list)
        or len(layer_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
    ):
        raise RecipeError(f"{where}: `layer_range` must be two whole numbers [start, end]")
    if not isinstance(src.get("model"), str):
        raise RecipeError(f"{where} names no model")
    return Source(model=src["model"], start=layer_range[0], end=layer_range[1], parameters=_parameters_of(src, where))


def _parse_slice(raw: Any, index: int) -> Slice:
    where = f"slice {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with `sources:`")
    _refuse_unknown(raw, {"sources", "repeat", "parameters"}, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where} has no `sources:` list")
    try:
        return Slice(
            sources=tuple(_parse_source(src, where) for src in sources),
            parameters=_parameters_of(raw, where),
            repeat=raw.get("repeat", 1),
        )
    except ValidationError as exc:
        raise RecipeError(f"{where}: {first_problem(exc)}") from None


def _parse_model_entry(raw: Any, index: int) -> ModelEntry:
    where = f"models entry {index + 1}"
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"].strip():
        raise RecipeError(f"{where} must be a mapping with `model:`")
    _refuse_unknown(raw, {"model", "parameters"}, where)
    return ModelEntry(model=raw["model"].strip(), parameters=_parameters_of(raw, where))


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a mergekit-style mapping into a Recipe; every problem is a RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping with a `slices:` list")
    unknown = set(data) - KNOWN_TOP_KEYS - set(PRESERVED_TOP_KEYS) - set(IGNORED_TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown key(s) in the recipe: {', '.join(sorted(map(str, unknown)))}")
    raw_slices, raw_models = data.get("slices"), data.get("models")
    if raw_slices is None and raw_models is None:
        raise RecipeError("the recipe has no slices: add at least one layer range")
    if raw_slices is not None and not isinstance(raw_slices, list):
        raise RecipeError("`slices` must be a list")
    if raw_models is not None and not isinstance(raw_models, list):
        raise RecipeError("`models` must be a list of `- model: NAME` entries")
    if data.get("tokenizer_source") is not None and not isinstance(data["tokenizer_source"], str):
        raise RecipeError("`tokenizer_source` names a model, or is base or union")
    SLICES.check(len(raw_slices or raw_models or ()), "the recipe")
    slices = tuple(_parse_slice(raw, i) for i, raw in enumerate(raw_slices or []))
    entries = tuple(_parse_model_entry(raw, i) for i, raw in enumerate(raw_models or []))
    try:
        return Recipe(
            slices=slices,
            model_entries=entries,
            merge_method=data.get("merge_method", PASSTHROUGH),
            parameters=_parameters_of(data, "the recipe"),
            dtype=data.get("dtype"),
            tokenizer_source=data.get("tokenizer_source"),
            base_model=data.get("base_model"),
            preserved={k: data[k] for k in (*PRESERVED_TOP_KEYS, *IGNORED_TOP_KEYS) if k in data},
        )
    except ValidationError as exc:
        raise RecipeError(first_problem(exc)) from None


def recipe_from_yaml(text: str) -> Recipe:
    """Parse mergekit YAML within the recipe limits. Syntax errors name the line and column."""
    RECIPE_CHARS.check(len(text), "the recipe")
    try:
        data = bounded_yaml.load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"malformed YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"malformed YAML: {exc}") from None
    if data is None:
        raise RecipeError("the recipe is empty: add at least one layer range")
    return recipe_from_dict(data)
