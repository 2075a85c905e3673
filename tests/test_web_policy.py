"""Every web entry reads model references under the web policy: a visitor naming an absolute
folder outside FRANKENMERGE_LOCAL_DIRS is refused before anything is planned or loaded, whatever
the tab (the Lens once resolved references with the CLI's any-path policy and built them).

The folder named is a real model (tiny_llama), so an entry that resolved it permissively would
plan, build or measure it instead of refusing."""

from types import SimpleNamespace

import gradio as gr
import pytest
from gradio_client import Client

import app
import ui.models
from merger.recipe import passthrough
from merger.recipe.share_links import to_share_token
from merger.sources.catalog import LocalPolicy
from ui import chat, lens
from ui.recipe_state import empty_state, widget_edited

REFUSAL = "absolute paths are not allowed here"
VISITOR = SimpleNamespace(session_hash="web-policy-visitor", query_params={})


def no_progress(fraction, desc=None):
    pass


@pytest.fixture
def outside(tiny_llama, tmp_path, monkeypatch) -> str:
    """An absolute path to a real model, outside the allowed roots (an empty folder here)."""
    monkeypatch.setenv("FRANKENMERGE_LOCAL_DIRS", str(tmp_path))
    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy.for_web())
    ui.models.public_info.cache_clear()
    yield str(tiny_llama)
    ui.models.public_info.cache_clear()
    chat.SESSIONS.drop_session(VISITOR.session_hash)


def stack_of(ref: str) -> dict:
    return {
        "models": [{"ref": ref, "label": "tiny", "num_layers": 6}],
        "slices": [{"model": ref, "start": 0, "end": 4, "repeat": 1}, {"model": ref, "start": 2, "end": 6}],
    }


def yaml_of(ref: str) -> str:
    return passthrough((ref, 0, 4), (ref, 2, 6)).to_yaml()


SETTINGS = tuple(app.DEFAULT_SETTINGS.values())  # the share link's settings, the edit handlers' last inputs


def page_state(ref: str) -> dict:
    """The page's recipe after the stack widget showed stack_of(ref) (nothing resolved yet)."""
    return widget_edited(empty_state(), stack_of(ref))[0]


def opened_with(token: str) -> str:
    """The model message of a visit that opens a share link."""
    request = SimpleNamespace(session_hash="policy-visitor", query_params={"r": token})
    return app.open_page(request)[len(app.RecipeView._fields)]


# entry name -> call(ref) returning what the visitor reads (a gr.Error is caught by the test)
ENTRIES = {
    "preview": lambda ref: app.preview(yaml_of(ref)),
    "stack edit": lambda ref: app.on_stack_edit(stack_of(ref), empty_state(), VISITOR, None, *SETTINGS).preview,
    "apply YAML": lambda ref: app.apply_yaml(yaml_of(ref), empty_state(), VISITOR, None, *SETTINGS).yaml_note,
    "dtype": lambda ref: app.set_dtype("bfloat16", page_state(ref), VISITOR, None, *SETTINGS).preview,
    "add model column": lambda ref: app.find_column(ref, progress=no_progress)[1],
    "share link": lambda ref: opened_with(to_share_token(passthrough((ref, 0, 4)))),
    "build": lambda ref: app.build_page(page_state(ref), "", VISITOR, progress=no_progress),
    "export": lambda ref: app.export_merge("", "", "", False, "", progress=no_progress, state=page_state(ref)),
    "export endpoint": lambda ref: app.export_merge(yaml_of(ref), "bfloat16", "", False, "", progress=no_progress),
    "slim": lambda ref: app.slim(ref, "", False, "", progress=no_progress),
    "build endpoint": lambda ref: chat.build_model(yaml_of(ref), VISITOR, progress=no_progress),
    "comparison: a parent as it is": lambda ref: chat.build_comparison(ref, "", VISITOR, progress=no_progress),
    "comparison: a second recipe": lambda ref: chat.build_comparison(
        chat.SECOND_RECIPE, yaml_of(ref), VISITOR, progress=no_progress
    ),
    "lens: analyze": lambda ref: lens.analyze_model(ref, "", page_state(ref), no_progress),
    "lens: score the seams": lambda ref: lens.score_stack_seams(page_state(ref), "", no_progress),
    "lens: suggest": lambda ref: lens.suggest_blocks(ref, "", next(iter(lens.RANKINGS)), no_progress),
    "lens: put in the stack": lambda ref: app.put_suggestion("[2, 4)", ref, empty_state(), VISITOR, None, *SETTINGS),
    "lens: undo": lambda ref: (
        app.undo_put({**empty_state(), "undo": page_state(ref)}, VISITOR, None, *SETTINGS).preview
    ),
    "lens: sweep repeats": lambda ref: lens.sweep_block(ref, "[2, 4)", "", 3, no_progress),
    "lens: perplexity": lambda ref: lens.measure_perplexities(page_state(ref), "", no_progress),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_web_entry_refuses_an_absolute_folder_outside_the_allowed_roots(entry, outside):
    try:
        said = str(ENTRIES[entry](outside))
    except gr.Error as exc:
        said = str(exc)
    assert REFUSAL in said


def test_the_placement_beside_the_preview_shows_nothing_for_an_absolute_folder(outside):
    view = app.on_stack_edit(stack_of(outside), empty_state(), VISITOR, None, *SETTINGS)
    assert view.placement == "" and REFUSAL in view.preview  # the preview says why


def test_the_public_http_endpoints_refuse_an_absolute_folder(app_url, tiny_llama):
    client = Client(app_url, verbose=False)
    ref = str(tiny_llama)
    calls = {
        "/preview": (yaml_of(ref),),
        "/build": (yaml_of(ref),),
        "/build_comparison": (ref, ""),
        "/export": (yaml_of(ref), "bfloat16", "", False, ""),
        "/slim": (ref, "", False, ""),
        "/eval": (yaml_of(ref), ["hellaswag"], 2, False, []),
    }
    for endpoint, args in calls.items():
        with pytest.raises(Exception, match="bsolute paths are not allowed"):
            client.predict(*args, api_name=endpoint)
