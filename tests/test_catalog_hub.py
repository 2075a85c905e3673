"""Hub references read metadata only (config, tokenizer files, safetensors headers), against a
local server that speaks the Hub's API; weights download only on build."""

import pytest
import torch

from merger.build.assemble import assemble
from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import passthrough

from hubserver import add_sharded_lazy_model, llama3_8b_config, llama3_8b_tensors
from refs import ANY_PATH


def test_llama3_8b_preview_is_exact_without_any_weight_bytes(hub):
    add_sharded_lazy_model(hub, "meta-llama/Meta-Llama-3-8B", llama3_8b_config(), llama3_8b_tensors())
    counts = count(make_plan(passthrough(("meta-llama/Meta-Llama-3-8B", 0, 32)), ANY_PATH))
    assert counts.total_params == 8_030_261_248
    assert counts.dtype == "bfloat16" and counts.bytes == 2 * 8_030_261_248
    assert sum(hub.weight_bytes_served.values()) == 0
    assert sum(hub.bytes_served.values()) > 0


def test_llama3_8b_self_merge_preview_counts_duplicated_layers(hub):
    add_sharded_lazy_model(hub, "meta-llama/Meta-Llama-3-8B", llama3_8b_config(), llama3_8b_tensors())
    ref = "meta-llama/Meta-Llama-3-8B"
    counts = count(make_plan(passthrough((ref, 0, 24), (ref, 8, 32)), ANY_PATH))
    per_layer = 218_112_000
    assert counts.num_layers == 48
    assert counts.total_params == 8_030_261_248 + 16 * per_layer
    assert sum(hub.weight_bytes_served.values()) == 0


def test_unknown_hub_repo_and_revision_are_named(hub):
    with pytest.raises(ModelRefError, match="'nobody/nothing' was not found on the Hub"):
        ANY_PATH("nobody/nothing")
    add_sharded_lazy_model(hub, "org/model", llama3_8b_config(), llama3_8b_tensors())
    with pytest.raises(ModelRefError, match="has no revision 'v9'"):
        ANY_PATH("org/model@v9")


def test_hub_repo_with_only_pickled_weights_is_refused(hub, tiny_llama):
    hub.add_file("org/pickled", "config.json", (tiny_llama / "config.json").read_bytes())
    hub.add_file("org/pickled", "pytorch_model.bin", b"\x80\x04pickle")
    with pytest.raises(UnsafeCheckpointError, match="pickled weights"):
        ANY_PATH("org/pickled")


def test_hub_model_builds_after_downloading_weights_and_equals_the_local_build(hub, tiny_llama):
    for f in tiny_llama.iterdir():
        hub.add_file("org/tiny", f.name, f.read_bytes())
    info = ANY_PATH("org/tiny")
    assert info.local_dir is None and info.num_layers == 6  # metadata only so far
    hub_plan = make_plan(passthrough(("org/tiny", 0, 4), ("org/tiny", 2, 6)), ANY_PATH)
    local_plan = make_plan(passthrough((str(tiny_llama), 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(assemble(hub_plan)(ids).logits, assemble(local_plan)(ids).logits)
