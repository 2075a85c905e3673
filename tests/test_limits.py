"""Limits checked before any work: recipes (text, YAML aliases and nesting, slices, depth, models,
blend parameters) and share links are refused in one sentence that names the limit and the
variable that raises it, structurally bounded (a generous guard only catches a hang)."""

import base64
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

import app
from merger import limits
from merger.errors import UserError
from merger.recipe.mergekit_yaml import recipe_from_yaml
from merger.recipe.share_links import from_share_token
from ui.recipe_state import empty_state

from bounded import run_within
from hostile_inputs import SMOL, filter_alias_bomb, million_layer_link, share_token, slice_alias_recipe
from markdown_text import shown

README = Path(__file__).parent.parent / "README.md"


def test_the_filter_alias_bomb_is_refused_while_it_loads():
    text = filter_alias_bomb()
    assert len(text) < 2500
    with pytest.raises(UserError, match=r"more than the 100,000 YAML nodes .*FRANKENMERGE_MAX_RECIPE_NODES"):
        run_within(30, recipe_from_yaml, text)


def test_the_filter_alias_bomb_is_refused_by_the_preview_endpoint():
    import gradio as gr

    with pytest.raises(gr.Error, match="100,000 YAML nodes"):
        run_within(30, app.preview, filter_alias_bomb())


def test_a_recipe_aliasing_one_slice_100000_times_is_refused(monkeypatch):
    text = slice_alias_recipe(100_000)
    assert len(text) > 400_000
    with pytest.raises(UserError, match=r"more than the 262,144 characters .*FRANKENMERGE_MAX_RECIPE_CHARS"):
        run_within(30, recipe_from_yaml, text)
    # with the text limit raised, the alias count still stops it while it loads
    monkeypatch.setenv("FRANKENMERGE_MAX_RECIPE_CHARS", "1000000")
    with pytest.raises(UserError, match="100,000 YAML nodes"):
        run_within(30, recipe_from_yaml, text)


def test_a_recipe_that_refers_to_itself_is_refused():
    with pytest.raises(UserError, match=r"alias \*a refers to itself"):
        recipe_from_yaml("parameters: &a {t: [*a]}\nslices: []\n")


@pytest.mark.parametrize("depth", [40, 5000])
def test_deep_nesting_is_a_sentence_not_a_recursion_error(depth):
    with pytest.raises(UserError, match="levels of nesting, more than the 32"):
        recipe_from_yaml("slices: " + "[" * depth + "]" * depth)


def test_a_share_link_nested_deeper_than_python_recurses_is_said_to_be_damaged():
    token = "v1." + base64.urlsafe_b64encode(zlib.compress(b"[" * 60_000, 9)).decode().rstrip("=")
    with pytest.raises(UserError, match="damaged"):
        from_share_token(token)


def test_a_short_share_link_of_1_25_million_layers_is_refused():
    token = million_layer_link()
    assert len(token) < 600  # 660 slices x 64 repeats x 30 layers = 1,267,200 layers
    with pytest.raises(UserError, match=r"1,267,200 layers, more than the 1,024 layers .*FRANKENMERGE_MAX_LAYERS"):
        run_within(30, from_share_token, token)


def visit(token: str):
    """What a visit to the share link opens on: the stack, the model message and the three settings."""
    opened = app.open_page(SimpleNamespace(query_params={"r": token}, session_hash="limits-visitor"))
    view = app.RecipeView(*opened[: len(app.RecipeView._fields)])
    return (view.state["widget"], *opened[len(app.RecipeView._fields) :])


def test_opening_the_million_layer_link_shows_the_limit_and_the_default_stack():
    value, notice, *_ = run_within(60, visit, million_layer_link())
    assert "more than the 1,024 layers" in shown(notice)
    assert [s["end"] for s in value["slices"]] == [30]  # the default stack


def test_a_link_with_a_layer_range_of_10_to_the_15_does_not_open_an_empty_stack():
    slices = [{"sources": [{"model": SMOL, "start": 0, "end": 10**15}]}]
    value, notice, *_ = visit(share_token({"recipe": {"slices": slices}, "settings": {}}))
    assert "Opened a shared recipe" not in notice
    assert "reaches layer about 10^15, more than the 1,024 layers" in shown(notice)
    assert value["slices"], "the default stack, not an empty one"


def test_a_stack_edit_with_more_slices_than_the_limit_is_refused_before_it_is_read():
    import gradio as gr

    value = {"models": [], "slices": [{"model": SMOL, "start": 0, "end": 1, "repeat": 1}] * 100_000}
    request = SimpleNamespace(query_params={}, session_hash="limits-visitor")
    settings = tuple(app.DEFAULT_SETTINGS.values())
    with pytest.raises(gr.Error, match=r"The stack has 100,000 slices, more than the 1,024 slices"):
        run_within(30, app.on_stack_edit, value, empty_state(), request, None, *settings)


@pytest.mark.parametrize(
    ("setting", "value", "said"),
    [
        ("temperature", float("nan"), "`temperature` is nan; it takes a number from 0 to 2"),
        ("top_p", 1e308, "`top_p` is 1e+308; it takes a number from 0.05 to 1"),
        ("max_new_tokens", 10**12, "`max_new_tokens` is 1,000,000,000,000; it takes a whole number from 1 to 1,024"),
    ],
)
def test_share_link_settings_out_of_the_sliders_range_never_reach_them(setting, value, said):
    slices = [{"sources": [{"model": SMOL, "start": 0, "end": 20}]}]
    value_, notice, temperature, top_p, max_new = visit(
        share_token({"recipe": {"slices": slices}, "settings": {setting: value}})
    )
    assert said in shown(notice)
    assert (temperature, top_p, max_new) == (0.7, 0.9, 200)  # the sliders keep their defaults
    assert [s["end"] for s in value_["slices"]] == [30]  # and the stack is the default one


@pytest.mark.parametrize("end", [10**30, 2**63])
def test_a_huge_layer_range_is_a_sentence_not_an_overflow(end):
    with pytest.raises(UserError, match="more than the 1,024 layers"):
        recipe_from_yaml(f"slices:\n- sources:\n  - {{model: {SMOL}, layer_range: [0, {end}]}}\n")


def test_slices_models_and_depth_have_limits():
    many = "slices:\n" + "".join(f"- sources: [{{model: {SMOL}, layer_range: [0, 1]}}]\n" for _ in range(1025))
    with pytest.raises(UserError, match=r"1,025 slices, more than the 1,024 slices .*FRANKENMERGE_MAX_SLICES"):
        recipe_from_yaml(many)
    models = "slices:\n" + "".join(f"- sources: [{{model: o/m{i}, layer_range: [0, 1]}}]\n" for i in range(17))
    with pytest.raises(UserError, match=r"17 models, more than the 16 models .*FRANKENMERGE_MAX_MODELS"):
        recipe_from_yaml(models)
    deep = f"slices:\n- sources: [{{model: {SMOL}, layer_range: [0, 30]}}]\n  repeat: 35\n"
    with pytest.raises(UserError, match="1,050 layers, more than the 1,024 layers"):
        recipe_from_yaml(deep)


def blend_with(weight: str) -> str:
    return (
        f"merge_method: linear\nslices:\n- sources:\n  - {{model: {SMOL}, layer_range: [0, 2], "
        f"parameters: {{weight: {weight}}}}}\n  - {{model: o/m, layer_range: [0, 2], parameters: {{weight: 1}}}}\n"
    )


def test_blend_parameters_are_bounded_in_size_and_depth():
    assert recipe_from_yaml(blend_with("[0.1, 0.5, 0.9]"))
    gradient = "[" + ", ".join(["0.5"] * 300) + "]"
    with pytest.raises(UserError, match=r"`weight` has more than the 256 values .*FRANKENMERGE_MAX_PARAMETER_VALUES"):
        recipe_from_yaml(blend_with(gradient))
    nested = "[{filter: a, value: [{filter: b, value: [{filter: c, value: [{filter: d, value: [1]}]}]}]}]"
    too_deep = r"`weight` has more than the 4 levels of nesting .*FRANKENMERGE_MAX_PARAMETER_DEPTH"
    with pytest.raises(UserError, match=too_deep):
        recipe_from_yaml(blend_with(nested))


def test_an_operator_raises_a_limit_with_its_variable(monkeypatch):
    monkeypatch.setenv("FRANKENMERGE_MAX_LAYERS", "2000000")
    recipe, _ = from_share_token(million_layer_link())
    assert recipe.num_layers == 1_267_200
    monkeypatch.setenv("FRANKENMERGE_MAX_LAYERS", "a lot")
    with pytest.raises(ValueError, match="FRANKENMERGE_MAX_LAYERS='a lot' is not a number of layers"):
        limits.LAYERS.value  # noqa: B018


def test_the_readme_lists_every_limit_with_its_default_and_variable():
    assert limits.markdown_table() in README.read_text()
