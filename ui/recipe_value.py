"""The layer-stack widget's value <-> the recipe's mergekit keys. The widget's value holds the part
of the recipe the stack edits plus the columns (parent models) it shows; see ui/stack.py for the
contract and ui/recipe_state.py for the recipe that owns it."""

from __future__ import annotations

from typing import Any

from merger.plan import stacking_key
from merger.recipe import Recipe, Source
from merger.sources.model_info import ModelInfo


def column(info: ModelInfo) -> dict[str, Any]:
    """A parent model as the widget shows it; `stacking` tells which columns it may blend with."""
    return {"ref": info.ref, "label": info.label, "num_layers": info.num_layers, "stacking": stacking_key(info)}


def _source(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": entry.get("model"), "layer_range": [entry.get("start"), entry.get("end")]}
    if entry.get("parameters"):
        out["parameters"] = entry["parameters"]
    return out


def stack_mapping(value: dict[str, Any]) -> dict[str, Any]:
    """The mergekit keys the widget's value sets (slices, merge_method, base_model, parameters), as
    they stand: not validated, so an unfinished stack is kept as it is."""
    raw_slices = []
    for s in value.get("slices") or []:
        raw: dict[str, Any] = {"sources": [_source(s)] + [_source(b) for b in s.get("blend") or []]}
        raw["repeat"] = s.get("repeat", 1)
        if s.get("slice_parameters"):
            raw["parameters"] = s["slice_parameters"]
        raw_slices.append(raw)
    data: dict[str, Any] = {"slices": raw_slices}
    for key in ("merge_method", "base_model", "parameters"):
        if value.get(key):
            data[key] = value[key]
    return data


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
