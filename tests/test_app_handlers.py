"""Page handlers without a browser: the one recipe (ui/recipe_state.py) and everything drawn from it
(stack widget, YAML box, preview, placement, dtype, share link, build status, export), pasted YAML,
model columns."""

import json
from types import SimpleNamespace

import gradio as gr
import pytest
import yaml

import app
from merger.recipe import passthrough
from merger.recipe.share_links import from_share_token
from ui import chat as bench

from markdown_text import shown

SMOL = "bundled:smollm2-135m-instruct"
GEMMA = "bundled:gemma3-270m"
SETTINGS = (0.7, 0.9, 200)  # temperature, top-p, max new tokens: what the share link carries
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
KEPT = {  # (`tokenizer:` is kept the same way; mergekit refuses a recipe that sets it and tokenizer_source)
    "dtype": "bfloat16",
    "tokenizer_source": SMOL,
    "chat_template": TEMPLATE,
    "out_dtype": "bfloat16",
}
PASTED = yaml.safe_dump({**yaml.safe_load(passthrough((SMOL, 0, 2), (SMOL, 1, 3)).to_yaml()), **KEPT})


def no_progress(fraction, desc=None):
    pass


@pytest.fixture
def visitor():
    request = SimpleNamespace(session_hash="page-visitor", query_params={})
    yield request
    bench.SESSIONS.drop_session("page-visitor")


def opened(request, token: str | None = None) -> app.RecipeView:
    request.query_params = {"r": token} if token else {}
    return app.RecipeView(*app.open_page(request)[: len(app.RecipeView._fields)])


def applied(request, text: str = PASTED) -> app.RecipeView:
    view = app.apply_yaml(text, opened(request).state, request, None, *SETTINGS)
    assert view.yaml_note == "", view.yaml_note
    return view


def edited(view: app.RecipeView, request, change) -> app.RecipeView:
    """The widget sends an edit of the stack it shows (as stack.js does: a new value, scores dropped)."""
    value = json.loads(json.dumps(view.state["widget"]))
    change(value)
    return app.on_stack_edit({**value, "seam_scores": None}, view.state, request, None, *SETTINGS)


def duplicate_first(value: dict) -> None:
    value["slices"].insert(1, dict(value["slices"][0]))


def test_a_pasted_recipe_keeps_every_key_through_stack_edits_into_preview_yaml_and_share_link(visitor):
    view = edited(applied(visitor), visitor, duplicate_first)
    in_box = yaml.safe_load(view.yaml)
    assert {k: in_box[k] for k in KEPT} == KEPT and len(in_box["slices"]) == 3
    assert "**6 layers** · bfloat16" in view.preview and view.dtype == "bfloat16"
    assert "export size 94.51 MiB" in view.preview  # 49,552,704 parameters at 2 bytes, not 4
    recipe, settings = from_share_token(view.share_token)
    assert {k: recipe.to_mergekit()[k] for k in KEPT} == KEPT and recipe.num_layers == 6
    assert settings == dict(zip(("temperature", "top_p", "max_new_tokens"), SETTINGS, strict=True))


def test_an_echo_of_the_stack_is_no_edit_and_changes_nothing(visitor):
    view = applied(visitor)
    echo = app.on_stack_edit(view.state["widget"], view.state, visitor, None, *SETTINGS)
    assert all(part == gr.skip() for part in echo)
    scored = {**view.state["widget"], "seam_scores": {"1": 0.2}}  # the Lens drawing scores is no edit either
    assert all(part == gr.skip() for part in app.on_stack_edit(scored, view.state, visitor, None, *SETTINGS))


def test_a_recipe_that_cannot_be_planned_shows_the_same_new_recipe_in_yaml_and_share_link(visitor):
    gemma = app.column(app.model_info(GEMMA))

    def stack_gemma_on_smollm(value):
        value["models"].append(gemma)
        value["slices"].append({"model": GEMMA, "start": 0, "end": 2, "repeat": 1})

    view = edited(applied(visitor), visitor, stack_gemma_on_smollm)
    assert shown(view.preview).startswith("⚠️ slice 3: cannot stack bundled:gemma3-270m")
    assert view.placement == ""
    in_box = yaml.safe_load(view.yaml)
    shared, _ = from_share_token(view.share_token)
    assert in_box["slices"][-1]["sources"][0]["model"] == GEMMA
    assert shared.to_mergekit() == yaml.safe_load(shared.to_yaml()) == in_box  # the box and the link: one recipe
    with pytest.raises(gr.Error, match="cannot stack bundled:gemma3-270m"):  # Build says why
        app.build_page(view.state, view.yaml, visitor, progress=no_progress)


def test_an_empty_stack_keeps_the_recipes_other_keys_and_explains_what_to_do(visitor):
    view = edited(applied(visitor), visitor, lambda value: value["slices"].clear())
    assert "drag across a model's layers" in view.preview and view.share_token == ""
    assert yaml.safe_load(view.yaml)["dtype"] == "bfloat16"
    view = edited(view, visitor, lambda value: value["slices"].append({"model": SMOL, "start": 0, "end": 4}))
    assert "**4 layers** · bfloat16" in view.preview


def test_yaml_pasted_but_not_applied_is_never_built_or_exported_and_is_pointed_out(visitor):
    view = opened(visitor)
    assert app.yaml_note(PASTED, view.state) == app.UNAPPLIED_NOTE
    with pytest.raises(gr.Error, match="you have not applied"):
        app.build_page(view.state, PASTED, visitor, progress=no_progress)
    with pytest.raises(gr.Error, match="you have not applied"):
        app.export_merge(PASTED, "", "", False, "", progress=no_progress, state=view.state)
    assert bench.SESSIONS.get(bench.slot(visitor)) is None
    same = yaml.safe_dump(yaml.safe_load(view.yaml), default_flow_style=True)  # reformatted, not another recipe
    assert app.yaml_note(same, view.state) == "" and app.yaml_note("", view.state) == ""
    assert app.discard_yaml(view.state) == (view.yaml, "")


def test_pasted_yaml_with_a_mistake_changes_nothing_and_says_why_by_the_box(visitor):
    view = app.apply_yaml("slices: [", opened(visitor).state, visitor, None, *SETTINGS)
    assert view.yaml_note.startswith("⚠️ Not applied: malformed YAML at line 1")
    assert all(part == gr.skip() for name, part in view._asdict().items() if name != "yaml_note")


def test_pasted_yaml_becomes_the_stack_with_its_models_as_columns_and_repeats_folded(visitor):
    text = passthrough((SMOL, 0, 20), (SMOL, 10, 30), (SMOL, 10, 30)).to_yaml()
    view = applied(visitor, text)
    assert [c["ref"] for c in view.widget["models"]] == [SMOL]
    assert view.widget["slices"] == [
        {"model": SMOL, "start": 0, "end": 20, "repeat": 1},
        {"model": SMOL, "start": 10, "end": 30, "repeat": 2},  # repeated slices fold into `repeat`
    ]
    assert "240,717,888 parameters" in view.preview and "60 layers" in view.preview
    assert view.placement.startswith("**Placement**: one device, `cpu`, all 60 layers")


def test_a_recipe_with_a_key_mergekit_ignores_previews_with_a_note(visitor):
    yaml_text = passthrough((SMOL, 0, 20), (SMOL, 10, 30)).to_yaml() + "tokenizer_source: base\nembed_slerp: true\n"
    counts = app.preview(yaml_text)
    assert counts["notes"] == ["`embed_slerp` is kept as written: mergekit 0.1.5 ignores it, and so does this app"]
    assert "Note: `embed_slerp` is kept as written" in app.preview_markdown(counts)
    assert app.preview(passthrough((SMOL, 0, 20)).to_yaml())["notes"] == []
    assert "Note: `embed_slerp` is kept as written" in applied(visitor, yaml_text).preview  # and on the page


def test_the_build_status_says_when_the_stack_no_longer_matches_the_built_model(visitor):
    view = applied(visitor)
    status, button = app.build_page(view.state, view.yaml, visitor, progress=no_progress)
    assert status.startswith("Built 4 layers (42,472,512 parameters, bfloat16)") and button.value == "Build"
    assert bench.SESSIONS.get(bench.slot(visitor)).plan.recipe.preserved["chat_template"] == TEMPLATE
    after = edited(view, visitor, duplicate_first)
    assert "has changed since the build" in after.build_status and after.build_button.value == "Rebuild"
    assert app.build_status_now(after.state, visitor)[1].value == "Rebuild"
    back = edited(after, visitor, lambda value: value["slices"].pop(1))  # the built recipe again
    assert back.build_status.startswith("Built 4 layers") and back.build_button.value == "Build"


def test_one_dtype_is_counted_and_exported_and_the_export_reports_its_whole_time(visitor, monkeypatch):
    view = app.set_dtype("bfloat16", opened(visitor).state, visitor, None, *SETTINGS)
    assert "**30 layers** · bfloat16 · export size 256.57 MiB" in view.preview
    assert yaml.safe_load(view.yaml)["dtype"] == "bfloat16"
    clock = [1000.0]
    written = {}

    def deliver(folder, nbytes, repo_name, private, token, progress):
        written["config"] = json.loads((folder / "config.json").read_text())
        written["recipe"] = yaml.safe_load((folder / "mergekit_config.yml").read_text())
        clock[0] += 30.0  # packing the archive takes its time
        return ["Download it below."], None

    monkeypatch.setattr(app.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(app, "deliver", deliver)
    status, _ = app.export_merge(view.yaml, "float32", "", False, "", progress=no_progress, state=view.state)
    assert written["config"]["dtype"] == written["recipe"]["dtype"] == "bfloat16"
    assert status.startswith("Exported 256.57 MiB of bfloat16 in 1 shard(s), written in ")
    assert status.endswith("Download it below. 30.0 s in all.")


def test_an_edit_clears_an_export_of_the_earlier_recipe_and_a_redraw_does_not(visitor):
    view = opened(visitor)
    changed = app.set_dtype("bfloat16", view.state, visitor, None, *SETTINGS)
    assert changed.export_status == "" and changed.export_file is None
    same = app.set_dtype("bfloat16", changed.state, visitor, None, *SETTINGS)
    assert same.export_status == gr.skip() and same.export_file == gr.skip()


def test_a_lens_suggestion_put_in_the_stack_says_what_it_replaced_and_undo_brings_it_back(visitor):
    view = applied(visitor)
    put = app.put_suggestion("[2, 4)", SMOL, view.state, visitor, None, *SETTINGS)
    assert [(s["start"], s["end"]) for s in put.widget["slices"]] == [(0, 4), (2, 30)]
    assert "It replaced the stack you had (2 slice(s), 4 layers)" in put.lens_note
    assert put.lens_undo.visible and "**32 layers** · bfloat16" in put.preview  # the recipe's dtype stays
    back = app.undo_put(put.state, visitor, None, *SETTINGS)
    assert back.state == view.state and back.widget == view.state["widget"] and back.yaml == view.yaml
    assert not back.lens_undo.visible and "back as it was" in back.lens_note
    later = edited(put, visitor, duplicate_first)  # another edit: the replacement can no longer be undone
    assert not later.lens_undo.visible and later.lens_note == ""
    with pytest.raises(gr.Error, match="nothing to undo"):
        app.undo_put(later.state, visitor, None, *SETTINGS)


def test_adding_a_model_column_shows_its_layers_and_refuses_unknown_models(visitor):
    state = opened(visitor).state
    found, message = app.find_column(GEMMA, progress=no_progress)
    assert "18 layers" in message
    after, widget = app.add_column(found, state)
    assert [c["ref"] for c in widget["models"]] == [SMOL, GEMMA] and after["recipe"] == state["recipe"]
    found, message = app.find_column("bundled:nope", progress=no_progress)
    assert found is None and "unknown model 'bundled:nope'" in shown(message)
    assert app.add_column(found, after) == (gr.skip(), gr.skip())


def test_blend_is_offered_only_between_columns_whose_layers_fit():
    smol, gemma = (app.column(app.model_info(ref)) for ref in (SMOL, GEMMA))
    assert smol["stacking"] != gemma["stacking"]  # what stack.js compares before offering "+ blend"
    assert app.column(app.model_info(SMOL))["stacking"] == smol["stacking"]


def test_preview_of_a_parent_as_it_is_has_no_seams():
    counts = app.preview(passthrough((SMOL, 0, 30)).to_yaml())
    assert counts["total_params"] == 134_515_008 and counts["seams"] == []


def test_placement_next_to_the_preview_names_the_device_or_the_refusal(monkeypatch):
    from merger.plan import make_plan
    from merger.runtime import devices

    plan = make_plan(passthrough((SMOL, 0, 20), (SMOL, 10, 30)), app.model_info)
    assert app.placement_preview(plan).startswith("**Placement**: one device, `cpu`, all 40 layers")
    monkeypatch.setattr(devices, "free_memory", lambda device: 10 * 2**20)
    assert "but only 10.00 MiB is free" in shown(app.placement_preview(plan))


def test_the_lens_notice_names_a_model_as_text(visitor, tmp_path, monkeypatch):
    import ui.models
    from merger.sources.catalog import LocalPolicy

    from tiny import make_tiny

    name = "![x](evil.test)"  # an allowed folder named like a Markdown image
    make_tiny(tmp_path / name, "llama", layers=2)
    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=(tmp_path.resolve(),)))
    ui.models.public_info.cache_clear()
    try:
        put = app.put_suggestion("[0, 1)", name, opened(visitor).state, visitor, None, *SETTINGS)
    finally:
        ui.models.public_info.cache_clear()
    assert f"duplicates layers [0, 1) of {name} (3 layers)" in shown(put.lens_note)
    assert name not in put.lens_note  # escaped: no image is made of it
