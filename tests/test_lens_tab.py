"""The Lens tab's handlers, below the page: seam scores land on the widget's seams, suggestions
become the duplication recipe, and bad input gets a message."""

import gradio as gr
import pytest

from merger.lens.capture import MAX_LENGTH, tokenize
from merger.lens.seams import score_seams
from merger.plan import make_plan
from merger.recipe.mergekit_yaml import recipe_from_dict
from merger.runtime.builds import load_tokenizer
from ui.lens import score_stack_seams, seam_scores_shown, suggestion_recipe, widget_seam_scores
from ui.models import model_info
from ui.recipe_state import widget_edited
from ui.recipe_value import stack_mapping

TEXT = "A small boat drifted past the harbour wall while gulls argued over the nets. " * 12


def no_progress(fraction, desc=None):
    pass


def stack(ref: str, *slices: tuple[int, int, int]) -> dict:
    return {
        "models": [{"ref": ref, "label": "tiny", "num_layers": 6}],
        "slices": [{"model": ref, "start": a, "end": b, "repeat": r} for a, b, r in slices],
    }


def test_widget_keys_each_join_and_repeat_seam_at_its_merged_depth():
    value = stack("m", (0, 4, 1), (2, 4, 3), (4, 6, 1))
    depths = list(range(12))  # depth d scores d / 100, so each key shows the depth it read
    scores = widget_seam_scores(value, [d / 100 for d in depths], [d / 10 for d in depths])
    assert scores == {
        "1": {"measured": 0.4, "predicted": 0.04},  # slice 1 starts at depth 4
        "1-rep-1": {"measured": 0.6, "predicted": 0.06},
        "1-rep-2": {"measured": 0.8, "predicted": 0.08},
    }  # slice 2 continues layer 3 -> 4: no seam


def page_state(value: dict) -> dict:
    """The page's recipe after the widget showed `value` (the state of a page that opened on it)."""
    state, _ = widget_edited({"recipe": {"slices": []}, "widget": {"slices": []}, "undo": None}, value)
    return state


def test_scoring_the_stack_colours_its_seam_with_the_lens_numbers(web_tiny_llama):
    value = stack(web_tiny_llama, (0, 4, 1), (2, 6, 1))
    state = page_state(value)
    scored, summary, figure = score_stack_seams(state, TEXT, no_progress)
    plan = make_plan(recipe_from_dict(stack_mapping(value)), model_info)
    chunks = tokenize(load_tokenizer(plan), TEXT, max_length=MAX_LENGTH, source="text")
    expected = score_seams(plan, chunks, device="cpu")
    shown = seam_scores_shown(state, scored)
    (key, got), *others = shown["seam_scores"].items()
    assert key == "1" and not others  # the one seam, before slice 1, at merged depth 4
    # the same numbers as the lens gives below the page (float32 forward passes: equal to 1e-4)
    assert got == {
        "measured": pytest.approx(expected.measured[4], rel=1e-4),
        "predicted": pytest.approx(expected.predicted[4], rel=1e-4),
    }
    assert expected.measured[4] > 0 and "depth 4" in summary and figure is not None
    assert shown["slices"] == value["slices"]
    edited, _ = widget_edited(state, stack(web_tiny_llama, (0, 6, 1)))
    assert seam_scores_shown(edited, scored) == gr.skip()  # an edit made meanwhile stays; the scores go


def test_a_stack_without_seams_is_told_so(web_tiny_llama):
    scored, summary, figure = score_stack_seams(page_state(stack(web_tiny_llama, (0, 6, 1))), TEXT, no_progress)
    assert "no seams" in summary and figure is None and scored is None


def test_a_suggestion_becomes_the_duplication_recipe(web_tiny_llama):
    columns = stack(web_tiny_llama, (0, 6, 1))["models"]
    recipe, shown = suggestion_recipe("[2, 4)", web_tiny_llama, columns)
    assert [(s.source.start, s.source.end) for s in recipe.slices] == [(0, 4), (2, 6)] and shown == columns
    with pytest.raises(gr.Error, match="Pick a suggested block"):
        suggestion_recipe(None, web_tiny_llama, columns)
