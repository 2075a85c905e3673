"""The app's public HTTP API through gradio_client: preview, build and chat, per session."""

import pytest
from gradio_client import Client

from merger.plan import make_plan
from merger.recipe import passthrough
from ui.chat import SESSIONS

from markdown_text import shown
from refs import ANY_PATH

SMOL = "bundled:smollm2-135m-instruct"
SPLICE = passthrough((SMOL, 0, 20), (SMOL, 10, 30)).to_yaml()
SHORT = passthrough((SMOL, 0, 6)).to_yaml()


def test_preview_endpoint_returns_exact_counts(app_url):
    counts = Client(app_url, verbose=False).predict(SPLICE, api_name="/preview")
    assert counts["total_params"] == 169_915_968
    assert counts["num_layers"] == 40
    assert counts["seams"] == [20]


def test_preview_endpoint_reports_recipe_mistakes(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="outside bundled:smollm2-135m-instruct"):
        client.predict(passthrough((SMOL, 20, 40)).to_yaml(), api_name="/preview")


def test_two_sessions_build_and_chat_with_their_own_models(app_url):
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    assert "40 layers" in a.predict(SPLICE, api_name="/build")
    with pytest.raises(Exception, match="Build the merge first"):
        b.predict("Hello", [], 0.0, 0.9, 8, api_name="/chat")
    assert "6 layers" in b.predict(SHORT, api_name="/build")
    assert SESSIONS.get(a.session_hash).model.config.num_hidden_layers == 40
    assert SESSIONS.get(b.session_hash).model.config.num_hidden_layers == 6
    for client in (a, b):
        history, speed = client.predict("What is 2+2?", [], 0.0, 0.9, 12, api_name="/chat")
        assert history[-1]["role"] == "assistant"
        assert history[-1]["content"]
        assert "tokens/s" in speed and "first text after" in speed


def test_same_seed_gives_the_same_sampled_reply(app_url):
    client = Client(app_url, verbose=False)
    client.predict(SHORT, api_name="/build")
    settings = (0.9, 0.95, 16, 40, 0.05, 1.1, 1234)
    first = client.predict("Tell me a story.", [], *settings, api_name="/chat")[0][-1]["content"]
    again = client.predict("Tell me a story.", [], *settings, api_name="/chat")[0][-1]["content"]
    assert first == again


def test_export_endpoint_offers_an_archive_and_publishes_with_the_given_token(app_url, hub, tmp_path):
    import zipfile

    hub.add_token("hf_good", "alice")
    client = Client(app_url, verbose=False)
    status, archive = client.predict(SHORT, "bfloat16", "smol-six", False, "hf_good", api_name="/export")
    assert "Published" in status and "alice/smol-six" in status
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert {"config.json", "model.safetensors", "README.md", "mergekit_config.yml"} <= names
    assert "model.safetensors" in hub.repo_files("alice/smol-six")


def test_export_endpoint_reports_a_refused_token(app_url, hub):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="refused this token"):
        client.predict(SHORT, "bfloat16", "smol-six", False, "hf_bad", api_name="/export")


def test_slim_endpoint_removes_a_redundant_head_of_a_hub_model_and_offers_the_copy(app_url, hub, tmp_path, tiny_llama):
    import zipfile

    from test_slim import write_variant

    bloated = write_variant(tiny_llama, tmp_path / "bloated", head="copy")
    for f in bloated.iterdir():
        hub.add_file("org/bloated", f.name, f.read_bytes())
    client = Client(app_url, verbose=False)
    status, archive = client.predict("org/bloated", "", False, "", api_name="/slim")
    assert "Removed lm_head.weight" in shown(status)
    with zipfile.ZipFile(archive) as z:
        assert "model.safetensors" in z.namelist()
    status, archive = client.predict(str(SMOL), "", False, "", api_name="/slim")
    assert "Nothing to remove" in status and archive is None


def text(message: dict) -> str:
    """A chatbot message's text (gradio returns content as text blocks, trimmed at the ends)."""
    from ui.chat import text_of

    return text_of(message["content"]).strip()


def expected_reply(recipe_yaml: str, message: str, settings: tuple) -> str:
    """The reply a build of the recipe gives outside the app, with the same settings."""
    from merger.chat.replies import stream_reply
    from merger.recipe.mergekit_yaml import recipe_from_yaml
    from merger.runtime.builds import build, prepare_for_chat
    from ui.chat import generation_settings

    built = prepare_for_chat(build(make_plan(recipe_from_yaml(recipe_yaml), ANY_PATH), device="cpu"))
    *_, reply = stream_reply(built, [{"role": "user", "content": message}], generation_settings(*settings))
    built.close()
    return reply.strip()


def test_side_by_side_replies_equal_separate_runs_with_the_same_seed(app_url):
    client = Client(app_url, verbose=False)
    client.predict(SPLICE, api_name="/build")
    assert "smollm2-135m-instruct" in shown(client.predict(SMOL, "", api_name="/build_comparison"))
    settings = (0.9, 0.95, 12, 40, 0.0, 1.1, 77)
    merge, parent, merge_speed, parent_speed = client.predict("Name a colour.", [], [], *settings, api_name="/compare")
    assert text(merge[-1]) == expected_reply(SPLICE, "Name a colour.", settings)
    assert text(parent[-1]) == expected_reply(passthrough((SMOL, 0, 30)).to_yaml(), "Name a colour.", settings)
    assert text(merge[-1]) != text(parent[-1])
    assert "tokens/s" in merge_speed and "tokens/s" in parent_speed


def test_an_evicted_visitor_is_told_why_their_model_is_gone(app_url, monkeypatch):
    from merger.runtime.devices import needed_bytes
    from ui.models import plan_for

    monkeypatch.setattr(SESSIONS, "budget_bytes", needed_bytes(plan_for(SHORT), "cpu"))
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    first.predict(SHORT, api_name="/build")
    second.predict(SHORT, api_name="/build")  # only one fits: the first visitor's model goes
    with pytest.raises(Exception, match="unloaded to make room for another visitor's build"):
        first.predict("Hello", [], 0.0, 0.9, 8, api_name="/chat")
    history, _ = second.predict("Hello", [], 0.0, 0.9, 8, api_name="/chat")
    assert history[-1]["content"]


def test_eight_concurrent_visitors_each_chat_with_their_own_model_within_the_budget(app_url, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from merger.runtime.devices import needed_bytes
    from ui.models import plan_for

    recipes = [passthrough((SMOL, 0, 2 + i)).to_yaml() for i in range(8)]
    budget = sum(needed_bytes(plan_for(r), "cpu") for r in recipes)
    monkeypatch.setattr(SESSIONS, "budget_bytes", budget)
    monkeypatch.setattr(SESSIONS, "peak_bytes", 0)
    settings = (0.0, 0.9, 8)

    def visit(recipe: str) -> tuple[str, int, str]:
        client = Client(app_url, verbose=False)
        counts = client.predict(recipe, api_name="/preview")
        client.predict(recipe, api_name="/build")
        history, _ = client.predict("Tell me about the sea.", [], *settings, api_name="/chat")
        layers = SESSIONS.get(client.session_hash).model.config.num_hidden_layers
        assert layers == counts["num_layers"]
        return text(history[-1]), layers, client.session_hash

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(visit, recipes))
    assert [layers for _, layers, _ in results] == [2 + i for i in range(8)]  # each saw its own model
    for recipe, (reply, _, _) in zip(recipes, results, strict=True):
        assert reply == expected_reply(recipe, "Tell me about the sea.", settings)
    assert len({session for *_, session in results}) == 8
    assert SESSIONS.peak_bytes <= budget
