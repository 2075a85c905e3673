"""The page's recipe, held in one place per browser session (the one owner).

A gr.State holds it as plain data (gr.State is deep-copied per session: never models)::

    {"recipe": {...},  # the whole recipe as a mergekit mapping: slices (or models), merge_method,
                       # base_model, parameters, dtype, tokenizer_source, chat_template, tokenizer,
                       # out_dtype...; it may be unfinished (an empty stack), and `read` says why
     "widget": {...},  # the stack widget's value as last drawn or edited (ui/stack.py): its columns,
                       # and what tells the widget's own edits from Python redrawing it
     "undo": {...}}    # while a replacement (a Lens suggestion) can be undone: the state it replaced

The widget edits the keys in STACK_KEYS; the others (dtype, tokenizer_source, ...) stay as pasted.
Every edit makes a new state here; `read` parses and plans it once, and each part of the page
(widget, YAML box, preview, placement, share link, Build, Export, Lens) is drawn from that reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from merger.errors import RecipeError, UserError
from merger.limits import SLICES
from merger.methods.specs import METHODS
from merger.plan import Plan
from merger.recipe import Recipe
from merger.recipe.mergekit_yaml import recipe_from_dict, recipe_from_yaml
from ui.models import plan_recipe
from ui.recipe_value import stack_mapping, value_from_recipe

State = dict[str, Any]
STACK_KEYS = ("slices", "models", "merge_method", "base_model", "parameters")  # what the widget edits
EMPTY_STACK = "the stack is empty: drag across a model's layers and press Add"


@dataclass(frozen=True)
class Reading:
    """What a state's recipe is, parsed and planned once."""

    recipe: Recipe | None  # None while the mapping is not a recipe
    plan: Plan | None  # None while it cannot be planned
    error: str | None  # why it cannot be built; None when it can
    yaml: str  # the recipe as mergekit runs it (an unfinished one as it stands)


def of_recipe(recipe: Recipe, columns: list[dict[str, Any]]) -> State:
    """A state that is `recipe`, whole (applied YAML, a share link, the default stack)."""
    return {"recipe": recipe.to_mergekit(), "widget": value_from_recipe(recipe, columns), "undo": None}


def empty_state(columns: list[dict[str, Any]] | None = None) -> State:
    return {"recipe": {"slices": []}, "widget": {"models": list(columns or []), "slices": []}, "undo": None}


def _parsed(mapping: dict[str, Any]) -> tuple[Recipe | None, str | None, str]:
    if not (mapping.get("slices") or mapping.get("models")):
        return None, EMPTY_STACK, _dump(mapping)
    try:
        recipe = recipe_from_dict(mapping)
    except UserError as exc:
        return None, str(exc), _dump(mapping)
    return recipe, None, recipe.to_yaml()


def _dump(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None)


def read(state: State) -> Reading:
    """Parse and plan the state's recipe (metadata only, under the web policy)."""
    recipe, error, text = _parsed(state["recipe"])
    if recipe is None:
        return Reading(None, None, error, text)
    try:
        plan = plan_recipe(recipe)
    except UserError as exc:
        return Reading(recipe, None, str(exc), text)
    return Reading(recipe, plan, None, text)


def plan_of(state: State) -> Plan:
    """The state's plan, for what builds or measures it; a recipe that cannot be built raises why."""
    reading = read(state)
    if reading.plan is None:
        raise RecipeError(reading.error or EMPTY_STACK)
    return reading.plan


def recipe_of(state: State) -> Recipe | None:
    """The state's recipe, parsed only (None while it is not one)."""
    return _parsed(state["recipe"])[0]


def yaml_of(state: State) -> str:
    """The state's recipe as the YAML box shows it (parsed only)."""
    return _parsed(state["recipe"])[2]


def widget_edited(state: State, value: dict[str, Any]) -> tuple[State, bool] | None:
    """The state after the widget sent `value`, and whether the widget must be redrawn (the edit
    took the last blend away, and its method went with it); None when `value` is no edit (Python
    redrew the widget, or drew seam scores on the same stack). The browser sends `value`: its slices
    are counted against the limit before anything reads them."""
    SLICES.check(len(value.get("slices") or []), "the stack")
    if stack_mapping(value) == stack_mapping(state["widget"]):
        return None
    widget = _without_blend_settings({k: v for k, v in value.items() if k != "seam_scores"})
    return _with_stack(state, widget), widget.get("merge_method") != value.get("merge_method")


def _with_stack(state: State, widget: dict[str, Any]) -> State:
    kept = {k: v for k, v in state["recipe"].items() if k not in STACK_KEYS}
    return {"recipe": {**stack_mapping(widget), **kept}, "widget": widget, "undo": None}


def _without_blend_settings(widget: dict[str, Any]) -> dict[str, Any]:
    """Once no slice blends, the blend method, its base model and its parameters go: a passthrough
    recipe with linear's `weight` left in it is one that mergekit refuses."""
    method = widget.get("merge_method") or "passthrough"
    if method == "passthrough" or any(s.get("blend") for s in widget.get("slices") or []):
        return widget
    spec = METHODS[method]

    def others(params: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (params or {}).items() if spec.param(k) is None}

    slices = []
    for s in widget.get("slices") or []:
        plain = {k: v for k, v in s.items() if k not in ("parameters", "slice_parameters")}
        for key in ("parameters", "slice_parameters"):
            if kept := others(s.get(key)):
                plain[key] = kept
        slices.append(plain)
    out = {k: v for k, v in widget.items() if k not in ("merge_method", "base_model", "parameters")}
    if kept := others(widget.get("parameters")):
        out["parameters"] = kept
    return {**out, "slices": slices}


def with_dtype(state: State, dtype: str) -> State:
    return {**state, "recipe": {**state["recipe"], "dtype": dtype}, "undo": None}


def with_columns(state: State, columns: list[dict[str, Any]]) -> State:
    return {**state, "widget": {**state["widget"], "models": columns}}


def stack_replaced(state: State, recipe: Recipe, columns: list[dict[str, Any]]) -> State:
    """The stack becomes `recipe`'s (its other keys, such as dtype and tokenizer, stay); the state
    it replaced is kept for `undone`."""
    replaced = _with_stack(state, value_from_recipe(recipe, columns))
    return {**replaced, "undo": {**state, "undo": None}}


def undone(state: State) -> State | None:
    """The state before the last replacement, or None when there is none to go back to."""
    return state.get("undo")


def unapplied(state: State, text: str | None) -> bool:
    """Whether the YAML box holds a recipe other than the state's (pasted, not applied)."""
    text = (text or "").strip()
    recipe, _, shown = _parsed(state["recipe"])
    if not text or text == shown.strip():
        return False
    try:
        pasted = recipe_from_yaml(text)
    except UserError:
        return True
    return recipe is None or pasted.compacted() != recipe.compacted()
