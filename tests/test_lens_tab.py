"""The Lens tab's handlers, below the page: seam scores land on the widget's seams, suggestions
become the duplication recipe, and bad input gets a message."""

import gradio as gr
import pytest

from merger.lens import MAX_LENGTH, score_seams, tokenize
from merger.plan import make_plan
from merger.runtime import load_tokenizer
from ui.lens import apply_suggestion, score_stack_seams, widget_seam_scores
from ui.models import model_info
from ui.recipe_value import recipe_from_value

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


def test_scoring_the_stack_colours_its_seam_with_the_lens_numbers(web_tiny_llama):
    value = stack(web_tiny_llama, (0, 4, 1), (2, 6, 1))
    scored, summary, figure = score_stack_seams(value, TEXT, no_progress)
    plan = make_plan(recipe_from_value(value), model_info)
    chunks = tokenize(load_tokenizer(plan), TEXT, max_length=MAX_LENGTH, source="text")
    expected = score_seams(plan, chunks, device="cpu")
    (key, got), *others = scored["seam_scores"].items()
    assert key == "1" and not others  # the one seam, before slice 1, at merged depth 4
    # the same numbers as the lens gives below the page (float32 forward passes: equal to 1e-4)
    assert got == {
        "measured": pytest.approx(expected.measured[4], rel=1e-4),
        "predicted": pytest.approx(expected.predicted[4], rel=1e-4),
    }
    assert expected.measured[4] > 0 and "depth 4" in summary and figure is not None
    assert scored["slices"] == value["slices"]


def test_a_stack_without_seams_is_told_so(web_tiny_llama):
    value = stack(web_tiny_llama, (0, 6, 1))
    scored, summary, figure = score_stack_seams(value, TEXT, no_progress)
    assert "no seams" in summary and figure is None and "seam_scores" not in scored


def test_a_suggestion_becomes_the_duplication_recipe(web_tiny_llama):
    ref = web_tiny_llama
    value = apply_suggestion("[2, 4)", ref, stack(ref, (0, 6, 1)))
    assert [(s["start"], s["end"]) for s in value["slices"]] == [(0, 4), (2, 6)]
    with pytest.raises(gr.Error, match="Pick a suggested block"):
        apply_suggestion(None, ref, value)
