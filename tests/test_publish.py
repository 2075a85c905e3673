"""Publishing an export to the Hub, against the local fake Hub: new repo, files, card; refusals."""

import pytest

from merger.build.export import export_plan
from merger.errors import UserError
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.sources.hub import push_folder

from refs import ANY_PATH


@pytest.fixture
def exported(tmp_path, tiny_llama):
    ref = str(tiny_llama)
    return export_plan(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH), tmp_path / "merge").path


def test_push_creates_a_repo_in_the_users_namespace_with_weights_and_card(hub, exported):
    hub.add_token("hf_good", "alice")
    url = push_folder(exported, "tiny-franken", token="hf_good", private=True)
    assert "alice/tiny-franken" in url
    files = hub.repo_files("alice/tiny-franken")
    assert files["model.safetensors"] == (exported / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "merge" in card and "mergekit" in card and "layer_range" in card
    assert {"config.json", "tokenizer.json", "mergekit_config.yml"} <= set(files)


def test_push_with_a_refused_token_says_so_and_creates_nothing(hub, exported):
    with pytest.raises(UserError, match="refused this token"):
        push_folder(exported, "tiny-franken", token="hf_wrong")
    assert not hub.commits


def test_push_to_an_existing_name_is_refused(hub, exported):
    hub.add_token("hf_good", "alice")
    push_folder(exported, "taken", token="hf_good")
    with pytest.raises(UserError, match="'alice/taken' already exists"):
        push_folder(exported, "alice/taken", token="hf_good")


def test_push_refuses_an_invalid_repo_name(hub, exported):
    hub.add_token("hf_good", "alice")
    with pytest.raises(UserError, match="not a valid repo name"):
        push_folder(exported, "bad name!", token="hf_good")
