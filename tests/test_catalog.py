import json
import shutil

import pytest

from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.sources.catalog import LocalPolicy, list_allowed_folders, resolve


@pytest.fixture
def web_root(tmp_path, tiny_llama):
    root = tmp_path / "allowed"
    root.mkdir()
    shutil.copytree(tiny_llama, root / "tiny")
    return root


def test_web_policy_resolves_folders_under_the_allowed_root(web_root):
    policy = LocalPolicy(allow_any_path=False, roots=(web_root.resolve(),))
    assert resolve("tiny", policy).num_layers == 6
    assert list_allowed_folders(policy) == ["tiny"]


@pytest.mark.parametrize("ref", ["/etc", "~/secrets", "tiny/../../outside", "../allowed/tiny"])
def test_web_policy_refuses_absolute_paths_and_dotdot(web_root, ref):
    policy = LocalPolicy(allow_any_path=False, roots=(web_root.resolve(),))
    with pytest.raises(ModelRefError, match="not allowed"):
        resolve(ref, policy)


def test_web_policy_refuses_symlinks_out_of_the_root(web_root, tmp_path, tiny_llama):
    (web_root / "escape").symlink_to(tiny_llama)
    policy = LocalPolicy(allow_any_path=False, roots=(web_root.resolve(),))
    with pytest.raises(ModelRefError, match="outside the allowed folders"):
        resolve("escape", policy)


def test_web_policy_reads_the_allow_list_from_the_environment(monkeypatch, web_root):
    monkeypatch.setenv("FRANKENMERGE_LOCAL_DIRS", str(web_root))
    assert LocalPolicy.for_web().roots == (web_root.resolve(),)


def test_pickled_checkpoints_are_refused_never_loaded(tmp_path, tiny_llama):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpointError, match=r"pickled weights .*pytorch_model\.bin"):
        resolve(str(folder), LocalPolicy.any_path())


def test_remote_code_models_are_refused(tmp_path, tiny_llama):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelRefError, match="never run remote code"):
        resolve(str(folder), LocalPolicy.any_path())


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelRefError, match=r"no config\.json"):
        resolve(str(tmp_path), LocalPolicy.any_path())
