"""The layer-stack widget's value <-> Recipe. The widget's value is the recipe in JSON form plus
the columns (parent models) it shows; see ui/stack.py for the contract."""

from __future__ import annotations

from typing import Any

from merger.catalog import ModelInfo
from merger.errors import RecipeError
from merger.recipe import Recipe, Source, recipe_from_dict


def column(info: ModelInfo) -> dict[str, Any]:
    return {"ref": info.ref, "label": info.label, "num_layers": info.num_layers}


def _source(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": entry.get("model"), "layer_range": [entry.get("start"), entry.get("end")]}
    if entry.get("parameters"):
        out["parameters"] = entry["parameters"]
    return out


def recipe_from_value(value: dict[str, Any], *, dtype: str | None = None) -> Recipe:
    """Validated exactly like pasted YAML, so the messages are the same."""
    slices = value.get("slices") or []
    if not slices:
        raise RecipeError("the recipe has no slices: drag across a model's layers and press Add")
    raw_slices = []
    for s in slices:
        raw: dict[str, Any] = {"sources": [_source(s)] + [_source(b) for b in s.get("blend") or []]}
        raw["repeat"] = s.get("repeat", 1)
        if s.get("slice_parameters"):
            raw["parameters"] = s["slice_parameters"]
        raw_slices.append(raw)
    data: dict[str, Any] = {"slices": raw_slices}
    for key in ("merge_method", "base_model", "parameters"):
        if value.get(key):
            data[key] = value[key]
    if dtype:
        data["dtype"] = dtype
    return recipe_from_dict(data)


def _entry(src: Source) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": src.model, "start": src.start, "end": src.end}
    if src.parameters:
        entry["parameters"] = dict(src.parameters)
    return entry


def value_from_recipe(recipe: Recipe, columns: list[dict[str, Any]]) -> dict[str, Any]:
    """The widget's value for a recipe; a whole-model blend shows as one blended slice over the
    models' full depth (the columns carry the layer counts)."""
    layer_counts = {c["ref"]: int(c["num_layers"]) for c in columns}
    slices = []
    for s in recipe.model_copy(update={"slices": recipe.as_slices(layer_counts)}).compacted().slices:
        shown = {**_entry(s.source), "repeat": s.repeat}
        if s.blended:
            shown["blend"] = [_entry(src) for src in s.sources[1:]]
        if s.parameters:
            shown["slice_parameters"] = dict(s.parameters)
        slices.append(shown)
    value: dict[str, Any] = {"models": columns, "slices": slices}
    if recipe.merge_method != "passthrough":
        value["merge_method"] = recipe.merge_method
    if recipe.base_model:
        value["base_model"] = recipe.base_model
    if recipe.parameters:
        value["parameters"] = dict(recipe.parameters)
    return value
