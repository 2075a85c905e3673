"""Files are checked one by one: every file the web app reads from an allowed folder (config,
shards, tokenizer, template) must resolve inside the allowed root, and a tensor's shape must be
whole numbers >= 0 that fit, whether the header comes from disk or from the Hub."""

import json
import shutil
import struct

import pytest

from merger.errors import ModelRefError
from merger.sources.catalog import LocalPolicy, resolve

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def roots(tiny_llama, tmp_path):
    """An allowed root holding a copy of tiny_llama, and a folder outside it."""
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(tiny_llama, root / "model")
    (root / "model" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return root, outside


@pytest.mark.parametrize("name", FILES)
def test_a_file_symlinked_out_of_an_allowed_folder_is_refused(roots, name):
    root, outside = roots
    moved = outside / name
    shutil.move(root / "model" / name, moved)
    (root / "model" / name).symlink_to(moved)
    with pytest.raises(ModelRefError, match=f"'model/{name}' leads outside the allowed folders"):
        resolve("model", LocalPolicy(allow_any_path=False, roots=(root.resolve(),)))
    # the CLI takes any path: the same folder opens there
    assert resolve(str(root / "model"), LocalPolicy.any_path()).num_layers == 6


def test_symlinks_that_stay_inside_the_root_are_followed(roots):
    root, _ = roots
    (root / "blobs").mkdir()
    shutil.move(root / "model" / "model.safetensors", root / "blobs" / "weights")
    (root / "model" / "model.safetensors").symlink_to(root / "blobs" / "weights")  # as the Hub cache lays out files
    assert resolve("model", LocalPolicy(allow_any_path=False, roots=(root.resolve(),))).num_layers == 6


def safetensors_bytes(shape: list, dtype: str = "F32", nbytes: int = 16) -> bytes:
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}
    header = json.dumps({"model.layers.0.mlp.up_proj.weight": entry})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * nbytes


HUB_CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 4}


@pytest.mark.parametrize(
    ("shape", "said"),
    [([-4], "a negative dimension in its shape \\[-4\\]"), ([2**40, 2**40], "larger than any tensor can be")],
)
def test_a_hub_header_with_a_negative_or_overflowing_shape_is_refused(hub, shape, said):
    hub.add_file("org/odd", "config.json", json.dumps(HUB_CONFIG).encode())
    hub.add_file("org/odd", "model.safetensors", safetensors_bytes(shape))
    with pytest.raises(ModelRefError, match=said):
        resolve("org/odd", LocalPolicy.any_path())


def test_a_hub_config_that_is_not_json_is_a_sentence(hub):
    hub.add_file("org/broken", "config.json", b"{not json")
    hub.add_file("org/broken", "model.safetensors", safetensors_bytes([4]))
    with pytest.raises(ModelRefError, match=r"the config\.json of 'org/broken' is not valid JSON"):
        resolve("org/broken", LocalPolicy.any_path())
