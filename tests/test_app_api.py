"""The app's public HTTP API through gradio_client: preview, build and chat, per session."""

import pytest
from gradio_client import Client

import app
from merger.recipe import passthrough

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
    assert app.SESSIONS.get(a.session_hash).model.config.num_hidden_layers == 40
    assert app.SESSIONS.get(b.session_hash).model.config.num_hidden_layers == 6
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
    assert "Removed lm_head.weight" in status
    with zipfile.ZipFile(archive) as z:
        assert "model.safetensors" in z.namelist()
    status, archive = client.predict(str(SMOL), "", False, "", api_name="/slim")
    assert "Nothing to remove" in status and archive is None
