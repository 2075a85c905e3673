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
from merger.catalog import LocalPolicy
from merger.recipe import passthrough, to_share_token
from ui import chat, lens

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


# entry name -> call(ref) returning what the visitor reads (a gr.Error is caught by the test)
ENTRIES = {
    "preview": lambda ref: app.preview(yaml_of(ref)),
    "stack edit": lambda ref: app.on_stack_change(stack_of(ref))[1],
    "apply YAML": lambda ref: app.apply_yaml(yaml_of(ref), stack_of(ref))[1],
    "add model column": lambda ref: app.add_model(ref, {"models": [], "slices": []}, progress=no_progress)[1],
    "share link": lambda ref: app.initial_state(
        SimpleNamespace(session_hash="policy-visitor", query_params={"r": to_share_token(passthrough((ref, 0, 4)))})
    )[1],
    "export": lambda ref: app.export_merge(yaml_of(ref), "bfloat16", "", False, "", progress=no_progress),
    "slim": lambda ref: app.slim(ref, "", False, "", progress=no_progress),
    "build": lambda ref: chat.build_model(yaml_of(ref), VISITOR, progress=no_progress),
    "comparison: a parent as it is": lambda ref: chat.build_comparison(ref, "", VISITOR, progress=no_progress),
    "comparison: a second recipe": lambda ref: chat.build_comparison(
        chat.SECOND_RECIPE, yaml_of(ref), VISITOR, progress=no_progress
    ),
    "lens: analyze": lambda ref: lens.analyze_model(ref, "", stack_of(ref), no_progress),
    "lens: score the seams": lambda ref: lens.score_stack_seams(stack_of(ref), "", no_progress),
    "lens: suggest": lambda ref: lens.suggest_blocks(ref, "", next(iter(lens.RANKINGS)), no_progress),
    "lens: put in the stack": lambda ref: lens.apply_suggestion("[2, 4)", ref, stack_of(ref)),
    "lens: sweep repeats": lambda ref: lens.sweep_block(ref, "[2, 4)", "", 3, no_progress),
    "lens: perplexity": lambda ref: lens.measure_perplexities(stack_of(ref), "", no_progress),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_web_entry_refuses_an_absolute_folder_outside_the_allowed_roots(entry, outside):
    try:
        said = str(ENTRIES[entry](outside))
    except gr.Error as exc:
        said = str(exc)
    assert REFUSAL in said


def test_the_placement_beside_the_preview_shows_nothing_for_an_absolute_folder(outside):
    assert app.placement_preview(stack_of(outside)) == ""  # the preview says why


def test_the_public_http_endpoints_refuse_an_absolute_folder(app_url, tiny_llama):
    client = Client(app_url, verbose=False)
    ref = str(tiny_llama)
    calls = {
        "/preview": (yaml_of(ref),),
        "/build": (yaml_of(ref),),
        "/build_comparison": (ref, ""),
        "/export": (yaml_of(ref), "bfloat16", "", False, ""),
        "/slim": (ref, "", False, ""),
    }
    for endpoint, args in calls.items():
        with pytest.raises(Exception, match="bsolute paths are not allowed"):
            client.predict(*args, api_name=endpoint)
