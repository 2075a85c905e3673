"""Page handlers without a browser: pasted YAML, model columns, the stack's preview text."""

import gradio as gr

import app
from merger.recipe import passthrough

from markdown_text import shown

SMOL = "bundled:smollm2-135m-instruct"


def test_pasted_mergekit_yaml_becomes_the_stack_with_its_models_as_columns():
    yaml_text = passthrough((SMOL, 0, 20), (SMOL, 10, 30), (SMOL, 10, 30)).to_yaml()
    value, preview = app.apply_yaml(yaml_text, {"models": [], "slices": []})
    assert [c["ref"] for c in value["models"]] == [SMOL]
    assert value["slices"] == [
        {"model": SMOL, "start": 0, "end": 20, "repeat": 1},
        {"model": SMOL, "start": 10, "end": 30, "repeat": 2},  # repeated slices fold into `repeat`
    ]
    assert "240,717,888 parameters" in preview and "60 layers" in preview


def test_a_recipe_with_a_key_mergekit_ignores_previews_with_a_note():
    yaml_text = passthrough((SMOL, 0, 20), (SMOL, 10, 30)).to_yaml() + "tokenizer_source: base\nembed_slerp: true\n"
    counts = app.preview(yaml_text)
    assert counts["notes"] == ["`embed_slerp` is kept as written: mergekit 0.1.5 ignores it, and so does this app"]
    assert "Note: `embed_slerp` is kept as written" in app.preview_markdown(counts)
    assert app.preview(passthrough((SMOL, 0, 20)).to_yaml())["notes"] == []


def test_pasted_yaml_with_a_mistake_keeps_the_stack_and_says_why():
    value, preview = app.apply_yaml("slices: [", {"models": [], "slices": []})
    assert "malformed YAML at line 1" in preview
    assert value == gr.skip()  # the stack is left as it was


def test_stack_edits_update_yaml_and_the_exact_count():
    value = {
        "models": [],
        "slices": [
            {"model": SMOL, "start": 0, "end": 20, "repeat": 1},
            {"model": SMOL, "start": 10, "end": 30, "repeat": 1},
        ],
    }
    yaml_text, preview = app.on_stack_change(value)
    assert "layer_range: [10, 30]" in yaml_text
    assert "169,915,968 parameters" in preview and "40 layers" in preview


def test_empty_stack_explains_what_to_do():
    _, preview = app.on_stack_change({"models": [], "slices": []})
    assert "drag across a model's layers" in preview


def test_adding_a_model_column_shows_its_layers_and_refuses_unknown_models():
    value, message = app.add_model(SMOL, {"models": [], "slices": []})
    assert value["models"] == [{"ref": SMOL, "label": "smollm2-135m-instruct", "num_layers": 30}]
    assert "30 layers" in message
    _, message = app.add_model("bundled:nope", value)
    assert "unknown model 'bundled:nope'" in shown(message)


def test_preview_of_a_parent_as_it_is_has_no_seams():
    counts = app.preview(passthrough((SMOL, 0, 30)).to_yaml())
    assert counts["total_params"] == 134_515_008 and counts["seams"] == []


def test_placement_next_to_the_preview_names_the_device_or_the_refusal(monkeypatch):
    from merger import runtime

    value = {"models": [], "slices": [{"model": SMOL, "start": 0, "end": 20, "repeat": 1}]}
    value["slices"].append({"model": SMOL, "start": 10, "end": 30, "repeat": 1})
    placed = app.placement_preview(value)
    assert placed.startswith("**Placement**: one device, `cpu`, all 40 layers")
    monkeypatch.setattr(runtime, "free_memory", lambda device: 10 * 2**20)
    assert "but only 10.00 MiB is free" in shown(app.placement_preview(value))
    assert app.placement_preview({"models": [], "slices": []}) == ""  # the preview already says what is wrong
