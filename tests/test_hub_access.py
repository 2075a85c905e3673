"""Hub access as a visitor: a Hub that does not answer is one sentence (web and CLI), and gated
metadata read with one visitor's token is never served to another."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr
import huggingface_hub.constants
import huggingface_hub.utils._http
import pytest

from merger.errors import HubUnavailableError
from merger.recipe import passthrough
from merger.sources import hub as hub_module
from merger.sources.hub import current_token, download_weights, hub_token, push_folder, read_hub
from merger.sources.model_info import ModelInfo
from ui import models

from spacekit import publish

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "the Hub did not answer: try again"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_hub(monkeypatch):
    """HF_ENDPOINT at a port where nothing listens (connections refused at once); huggingface_hub's
    retries (about 23 s of backoff before it gives up) do not sleep."""
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    return url


@pytest.fixture
def silent_hub(monkeypatch):
    """A Hub that accepts connections and never answers, and a short timeout for it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub_module, "HUB_TIMEOUT_SECONDS", 0.5)
    yield
    server.close()


def test_a_hub_that_refuses_connections_is_one_sentence_for_every_call(dead_hub, tmp_path):
    with pytest.raises(HubUnavailableError, match=SENTENCE):
        read_hub("org/model")
    unread = ModelInfo(ref="org/model", config={}, tensors={}, repo_id="org/model", commit="0" * 40)
    with pytest.raises(HubUnavailableError, match=SENTENCE):
        download_weights(unread)
    with pytest.raises(HubUnavailableError, match=SENTENCE):
        push_folder(tmp_path, "merge", token="hf_any")


def test_a_hub_that_never_answers_times_out_into_the_same_sentence(silent_hub):
    with pytest.raises(HubUnavailableError, match=SENTENCE):
        read_hub("org/model")


def test_the_page_says_the_hub_did_not_answer(dead_hub):
    from app import preview

    models.public_info.cache_clear()
    with pytest.raises(gr.Error, match=f"T{SENTENCE[1:]}"):  # the page says it as a sentence
        preview(passthrough(("org/unreachable", 0, 2)).to_yaml())


def test_the_cli_says_the_hub_did_not_answer_in_one_line_and_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(passthrough(("org/model", 0, 2)).to_yaml())
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "merger", "params", str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {SENTENCE}"]


def test_gated_metadata_read_with_one_visitors_token_is_served_to_no_one_else(hub, tiny_llama):
    hub.add_token("hf_alice", "alice")
    hub.add_token("hf_bob", "bob")
    publish(hub, "org/gated", tiny_llama, gated=True, allowed=("alice",))
    models.public_info.cache_clear()
    with hub_token("hf_alice"):
        assert models.model_info("org/gated").num_layers == 6
    for someone_else in ("hf_bob", False):
        with hub_token(someone_else), pytest.raises(Exception, match="is gated"):
            models.model_info("org/gated")


def test_on_a_space_no_hub_call_falls_back_to_the_spaces_own_token(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "org/space")
    assert current_token() is False  # e.g. the Lens, which names no visitor: no token, not HF_TOKEN
    with hub_token("hf_visitor"):
        assert current_token() == "hf_visitor"
    monkeypatch.delenv("SPACE_ID")
    assert current_token() is None  # locally: the machine's own saved login
