"""The streaming exporter: bytes equal to the parents' whichever copy path runs, and a build killed
midway leaves no output folder, only a temporary sibling that a retry replaces."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from benchmarks.export_vs_mergekit import write_random_llama
from merger.build.export import export_plan, write_metadata_files
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.sources import bundled

from refs import ANY_PATH

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def sharded_parent(tmp_path_factory) -> Path:
    """A small random bf16 llama spread over several files, so one export reads many of them."""
    return write_random_llama(
        tmp_path_factory.mktemp("models") / "sharded",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        layers=6,
        heads=4,
        kv_heads=2,
        tied=False,
        shard_bytes=40_000,
    )


@pytest.fixture(scope="module")
def big_parent(tmp_path_factory) -> Path:
    """8 layers of 29 MB (bf16, tied): [0,8) four times gives a 1 GB export, long enough to kill."""
    return write_random_llama(
        tmp_path_factory.mktemp("models") / "big",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        layers=8,
        heads=16,
        kv_heads=4,
        tied=True,
    )


def stored(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            found |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return found


def assert_export_holds_the_parents_bytes(out: Path, plan) -> None:
    written = stored(out)
    parents = {ref: stored(info.local_dir) for ref, info in plan.models.items()}
    assert set(written) == set(plan.tensors)
    for name, src in plan.tensors.items():
        assert torch.equal(written[name].view(torch.uint8), parents[src.model][src.name].view(torch.uint8)), name


def card_front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


@pytest.mark.parametrize("name", sorted(bundled.MODELS))
def test_exported_recipe_and_card_name_bundled_models_by_their_hub_ids(name, tmp_path):
    ref = f"bundled:{name}"
    recipe = passthrough((ref, 0, 2), (ref, 1, 3)).model_copy(update={"base_model": ref, "tokenizer_source": ref})
    plan = make_plan(recipe, ANY_PATH)
    write_metadata_files(plan, plan.models, tmp_path)
    hub_id = bundled.MODELS[name].hub_id
    exported = yaml.safe_load((tmp_path / "mergekit_config.yml").read_text())
    assert {src["model"] for s in exported["slices"] for src in s["sources"]} == {hub_id}
    assert exported["base_model"] == exported["tokenizer_source"] == hub_id
    assert card_front_matter(tmp_path)["base_model"] == [hub_id]
    assert "bundled:" not in (tmp_path / "README.md").read_text()


def test_a_card_names_no_local_folder_as_its_base_model(tmp_path, tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    write_metadata_files(plan, plan.models, tmp_path)
    assert "base_model" not in card_front_matter(tmp_path)  # the Hub's field names Hub repos only
    assert yaml.safe_load((tmp_path / "mergekit_config.yml").read_text())["slices"][0]["sources"][0]["model"] == ref


def test_export_from_a_sharded_parent_copies_every_tensor_byte_for_byte(tmp_path, sharded_parent):
    ref = str(sharded_parent)
    assert len(list(sharded_parent.glob("*.safetensors"))) > 2
    plan = make_plan(passthrough((ref, 0, 4), (ref, 1, 6)), ANY_PATH)
    out = export_plan(plan, tmp_path / "merged", shard_size=100_000).path
    assert len(list(out.glob("*.safetensors"))) > 1
    assert_export_holds_the_parents_bytes(out, plan)


def test_export_falls_back_to_read_write_when_the_kernel_refuses_copy_file_range(tmp_path, sharded_parent, monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device copy")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    ref = str(sharded_parent)
    plan = make_plan(passthrough((ref, 2, 6), (ref, 0, 3)), ANY_PATH)
    out = export_plan(plan, tmp_path / "merged").path
    assert len(calls) <= 1  # refused once, then the copier stops asking
    assert_export_holds_the_parents_bytes(out, plan)


def test_build_killed_midway_leaves_no_output_and_a_retry_succeeds(tmp_path, big_parent):
    from transformers import AutoModelForCausalLM

    ref = str(big_parent)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(passthrough(*[(ref, 0, 8)] * 4).to_yaml())
    out = tmp_path / "merged"
    build = [sys.executable, "-m", "merger", "build", str(recipe), str(out)]

    proc = subprocess.Popen(build, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # a guard against a hung build, not a timing check
        while proc.poll() is None and time.monotonic() < deadline:
            shards = [f for p in tmp_path.glob(".merged.partial-*") for f in p.glob("*.safetensors")]
            if sum(f.stat().st_size for f in shards) > 2**20:  # past the header, into the tensors
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed: enlarge big_parent"

    assert not out.exists()
    (partial,) = tmp_path.glob(".merged.partial-*")
    assert not (partial / "config.json").exists()  # metadata is written after every shard

    retry = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)
    assert retry.returncode == 0, retry.stderr
    assert not list(tmp_path.glob(".merged.partial-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 32
    with safe_open(big_parent / "model.safetensors", framework="pt") as f:
        assert torch.equal(
            model.model.layers[31].mlp.down_proj.weight, f.get_tensor("model.layers.7.mlp.down_proj.weight")
        )
        assert torch.equal(model.lm_head.weight, f.get_tensor("model.embed_tokens.weight"))
