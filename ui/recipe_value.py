"""The layer-stack widget's value <-> Recipe. The widget's value is the recipe in JSON form plus
the columns (parent models) it shows; see ui/stack.py for the contract."""

from __future__ import annotations

from typing import Any

from merger.catalog import ModelInfo
from merger.errors import RecipeError
from merger.recipe import Recipe, recipe_from_dict


def column(info: ModelInfo) -> dict[str, Any]:
    return {"ref": info.ref, "label": info.label, "num_layers": info.num_layers}


def recipe_from_value(value: dict[str, Any], *, dtype: str | None = None) -> Recipe:
    """Validated exactly like pasted YAML, so the messages are the same."""
    slices = value.get("slices") or []
    if not slices:
        raise RecipeError("the recipe has no slices: drag across a model's layers and press Add")
    data: dict[str, Any] = {
        "slices": [
            {
                "sources": [{"model": s.get("model"), "layer_range": [s.get("start"), s.get("end")]}],
                "repeat": s.get("repeat", 1),
            }
            for s in slices
        ]
    }
    if dtype:
        data["dtype"] = dtype
    return recipe_from_dict(data)


def value_from_recipe(recipe: Recipe, columns: list[dict[str, Any]]) -> dict[str, Any]:
    compact = recipe.compacted()
    return {
        "models": columns,
        "slices": [
            {"model": s.source.model, "start": s.source.start, "end": s.source.end, "repeat": s.repeat}
            for s in compact.slices
        ],
    }
