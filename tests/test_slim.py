"""`python -m merger slim`: a tied checkpoint that also stores its head (as some mergekit merges
do) loses the copy and nothing else; anything else is left alone and nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merger.__main__ import main

ROOT = Path(__file__).parent.parent
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def write_variant(
    parent: Path, out: Path, *, head: str | None, tied: bool = True, shards: int = 1, head_alone: bool = False
) -> Path:
    """A copy of `parent` (tiny llama, tied, no head) written with safetensors directly: `head`
    None (none stored), "copy" (the embeddings again) or "random"; `shards` > 1 adds an index,
    with the head in the last shard, beside the final norm or (`head_alone`) on its own."""
    out.mkdir()
    for f in parent.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copyfile(f, out / f.name)
    config = json.loads((parent / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tied}, indent=2))
    tensors = load_file(parent / "model.safetensors")
    if head == "copy":
        tensors[HEAD] = tensors[EMBED].clone()
    elif head == "random":
        tensors[HEAD] = torch.randn_like(tensors[EMBED])
    names = sorted(tensors, key=lambda n: (n == HEAD, n == "model.norm.weight", n))
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    body = names[:-1] if head_alone else names
    per = -(-len(body) // (shards - head_alone))
    groups = [body[i * per : (i + 1) * per] for i in range(shards - head_alone)] + ([[HEAD]] if head_alone else [])
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def stored(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found |= load_file(shard)
    return found


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 20, 3, 7]])).logits


@pytest.mark.parametrize(("shards", "head_alone"), [(1, False), (3, False), (3, True)])
def test_slim_drops_a_redundant_head_and_keeps_the_logits(shards, head_alone, tmp_path, tiny_llama, capsys):
    bloated = write_variant(tiny_llama, tmp_path / "bloated", head="copy", shards=shards, head_alone=head_alone)
    out = tmp_path / "slim"
    assert main(["slim", str(bloated), str(out)]) == 0

    head = stored(bloated)[HEAD]
    printed = capsys.readouterr().out
    assert f"removed {HEAD}: {head.numel():,} parameters, {head.numel() * 4:,} bytes" in printed
    kept = stored(out)
    assert HEAD not in kept
    before = stored(bloated)
    assert sorted(kept) == sorted(n for n in before if n != HEAD)
    assert all(torch.equal(kept[n], before[n]) for n in kept)
    assert torch.equal(logits(out), logits(bloated))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (bloated / name).read_bytes()
    assert not list(tmp_path.glob(".slim.partial-*"))

    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert HEAD not in index["weight_map"]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in kept.values())
        for name, shard in index["weight_map"].items():
            with safe_open(out / shard, framework="pt") as f:
                assert name in f.keys()  # noqa: SIM118
        assert len(list(out.glob("*.safetensors"))) == (2 if head_alone else 3)  # a head-only shard goes


@pytest.mark.parametrize(
    ("head", "tied", "why"),
    [
        (None, True, "stores no lm_head.weight"),
        ("copy", False, "does not tie the head"),
        # transformers 5 loads a head that differs untied, whatever the config says
        ("random", True, "holds other values"),
    ],
)
def test_slim_with_nothing_redundant_says_so_and_writes_nothing(head, tied, why, tmp_path, tiny_llama):
    model = write_variant(tiny_llama, tmp_path / "model", head=head, tied=tied)
    out = tmp_path / "slim"
    done = subprocess.run(
        [sys.executable, "-m", "merger", "slim", str(model), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "nothing to remove" in done.stdout and why in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_slim_refuses_a_non_empty_output_folder(tmp_path, tiny_llama, capsys):
    bloated = write_variant(tiny_llama, tmp_path / "bloated", head="copy")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["slim", str(bloated), str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_slim_of_a_hub_model_downloads_weights_only_when_its_metadata_shows_a_stored_head(
    hub, tmp_path, tiny_llama, capsys
):
    for repo, head in (("org/lean", None), ("org/bloated", "copy")):
        folder = write_variant(tiny_llama, tmp_path / repo.replace("/", "-"), head=head)
        for f in folder.iterdir():
            hub.add_file(repo, f.name, f.read_bytes())

    assert main(["slim", "org/lean", str(tmp_path / "lean-slim")]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert not (tmp_path / "lean-slim").exists()
    # at most the header read (one 100,001-byte Range, which also covers some data of a small file)
    assert sum(hub.weight_bytes_served.values()) <= 100_001

    assert main(["slim", "org/bloated", str(tmp_path / "slim")]) == 0
    assert f"removed {HEAD}" in capsys.readouterr().out
    assert HEAD not in stored(tmp_path / "slim")
    assert torch.equal(logits(tmp_path / "slim"), logits(tmp_path / "org-bloated"))
