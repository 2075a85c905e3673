"""The visual layer-stack editor: a gr.HTML widget (no build step) whose value is the merge's slice list.

Value (JSON-able dict: the stack's part of the page's recipe, which ui/recipe_state.py owns, plus the columns)::

    {
      # the columns; "stacking" is equal for models whose layers stack and blend together (merger.plan.stacking_key)
      "models": [{"ref": "bundled:smollm2-135m-instruct", "label": "SmolLM2-135M-Instruct", "num_layers": 30,
                  "stacking": "4f1c0a9e2b7d5e31"}],
      "slices": [
        {"model": "bundled:smollm2-135m-instruct", "start": 0, "end": 20, "repeat": 1},  # end exclusive
        # a blended slice: the first source as above (it names the slice's place in the stack), the
        # others in "blend", each source's mergekit parameters (weight, density, ...) in "parameters"
        {"model": "a", "start": 20, "end": 30, "repeat": 1, "parameters": {"weight": 0.7},
         "blend": [{"model": "b", "start": 20, "end": 30, "parameters": {"weight": 0.3}}],
         "slice_parameters": {"t": 0.5}},  # optional: the slice's own parameters (slerp's or nearswap's t)
      ],
      "merge_method": "linear",  # optional (passthrough): how blended slices blend
      "base_model": "a",  # optional: the base, for the methods that take one (stack.js's METHODS)
      "parameters": {},  # optional: recipe-wide parameters, kept as they came
      "seam_scores": {"1": {"measured": 0.2, "predicted": 0.18}, "1-rep-1": 0.1},  # optional, dropped on edit: seam
      # damage (angular distance) before slice i, or where pass r of slice i begins; a bare number is allowed
    }

Python sets the value; assets/stack.js draws it and answers every user edit with a new value object (everything
but the slices copied through, a new slices list; the blend method and base when those are edited), which fires
the component's ``.change``. The widget edits a source's ``weight`` (slerp, nearswap: the slice's ``t``; neither
for methods without them) when it is a plain number; gradients and filters pasted as YAML are shown as "custom" and
kept. When an edit leaves no blended slice, ui/recipe_state.py drops the blend method, its base and its parameters
and redraws the widget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from merger.methods.specs import BLEND_METHODS, METHODS
from merger.plan import seam_depths
from merger.recipe import MAX_REPEAT

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# A static shell: stack.js draws everything inside it. Because the template never changes, Gradio's
# re-render-on-prop-change (a DOM diff of the template output) never touches what the JS drew.
HTML_TEMPLATE = '<div class="fs-root" data-testid="stack-widget"></div>'


# The slice's `t` box, for the methods that take one `t` per blended slice: where it starts, its
# bounds and what it means (the same letter means a position for slerp, a distance for nearswap).
SLICE_T = {
    "slerp": {"value": 0.5, "max": 1, "step": 0.05, "hint": "slerp position: 0 = base, 1 = the other model"},
    "nearswap": {
        "value": 0.001,
        "step": "any",
        "hint": "nearswap distance: entries of the other model closer than t to the base's are taken",
    },
}


def blend_method_facts() -> list[dict[str, Any]]:
    """The blend menu, in merger.methods.specs' order: each method's base policy and what the stack
    edits for it: a weight per source, one `t` per blended slice (SLICE_T), or neither."""
    facts = []
    for name in BLEND_METHODS:
        spec = METHODS[name]
        entry: dict[str, Any] = {"name": name, "base": spec.base, "weight": spec.param("weight") is not None}
        if spec.param("t") is not None:
            entry["t"] = SLICE_T[name]
        facts.append(entry)
    return facts


def empty_value() -> dict[str, Any]:
    return {"models": [], "slices": [], "seam_scores": {}}


def stack_widget(value: dict | None = None, **kwargs: Any) -> gr.HTML:
    """Build the layer-stack editor. ``kwargs`` go to gr.HTML (label, elem_id, visible, ...)."""
    kwargs.setdefault("apply_default_css", False)  # no "prose" typography inside the widget
    kwargs.setdefault("container", False)
    kwargs.setdefault("padding", False)
    return gr.HTML(
        blend_methods=blend_method_facts(),
        max_repeat=MAX_REPEAT,
        value=value if value is not None else empty_value(),
        html_template=HTML_TEMPLATE,
        css_template=(ASSETS / "stack.css").read_text(encoding="utf-8"),
        js_on_load=(ASSETS / "stack.js").read_text(encoding="utf-8"),
        **kwargs,
    )


def _slices(value: dict | None) -> list[dict]:
    return list((value or {}).get("slices") or [])


def merged_layer_count(value: dict) -> int:
    """Layers in the merged model: sum of (end - start) * repeat over the slices."""
    total = 0
    for s in _slices(value):
        span = max(0, int(s["end"]) - int(s["start"]))
        total += span * max(1, int(s.get("repeat", 1) or 1))
    return total


def seam_positions(value: dict) -> list[int]:
    """Indices of slices that begin with a seam, by the plan's seam rule (merger.plan.seam_depths, which
    the widget draws too): slice i > 0 starts with a seam unless it continues slice i - 1 exactly (same
    model, ``slices[i-1].end == slices[i].start``). Repeats add seams inside a slice; those are not listed."""
    sources: list[tuple[str, int]] = []
    starts = []
    for s in _slices(value):
        starts.append(len(sources))
        layers = range(int(s["start"]), int(s["end"]))
        sources += [(s["model"], layer) for _ in range(max(1, int(s.get("repeat", 1) or 1))) for layer in layers]
    seams = set(seam_depths(sources, sources[0][0] if sources else ""))
    return [i for i in range(1, len(starts)) if starts[i] in seams]
