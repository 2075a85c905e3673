"""The CLI contract of DESIGN.md: last-line totals, JSON fields, exit codes, loadable builds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merger.__main__ import main
from merger.recipe import passthrough

from refs import ANY_PATH

ROOT = Path(__file__).parent.parent


def write_recipe(tmp_path: Path, *ranges, dtype=None) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(passthrough(*ranges, dtype=dtype).to_yaml())
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merger", *args], cwd=ROOT, capture_output=True, text=True)


def test_params_prints_the_total_on_the_last_line_without_importing_torch(tmp_path):
    ref = "bundled:smollm2-135m-instruct"
    recipe = write_recipe(tmp_path, (ref, 0, 20), (ref, 10, 30))
    probe = (
        "import sys; from merger.__main__ import main; main(['params', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(recipe)], cwd=ROOT, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "169915968"
    assert lines[-1] == "[]"


def test_params_json_has_the_contract_fields(tmp_path, capsys, tiny_llama):
    recipe = write_recipe(tmp_path, (str(tiny_llama), 0, 6), (str(tiny_llama), 3, 6), dtype="bfloat16")
    assert main(["params", str(recipe), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_layers"] == 9 and data["dtype"] == "bfloat16"
    assert data["bytes"] == data["total_params"] * 2


def test_whole_model_blend_counts_its_materialized_memory_and_builds(tmp_path, capsys, tiny_llama, tiny_llama_ft1):
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "blend.yml"
    recipe.write_text(
        f"models:\n- model: {tiny_llama_ft1}\n  parameters: {{weight: 0.3}}\n"
        f"merge_method: task_arithmetic\nbase_model: {tiny_llama}\n"
    )
    assert main(["params", str(recipe), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_layers"] == 6 and data["blend_bytes"] == data["memory_bytes"] == data["bytes"]
    assert main(["build", str(recipe), str(tmp_path / "out")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("slices: [", "malformed YAML at line 1"),
        ("slices:\n- sources:\n  - model: bundled:nope\n    layer_range: [0, 2]\n", "unknown model 'bundled:nope'"),
        ("models:\n- model: a/b\n- model: c/d\nmerge_method: ties\n", "merge_method ties needs `base_model:`"),
    ],
)
def test_user_mistakes_exit_2_with_one_sentence_and_no_traceback(tmp_path, content, message):
    recipe = tmp_path / "bad.yml"
    recipe.write_text(content)
    out = run_cli("params", str(recipe))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("slices: []\n# caf\xe9\n".encode("latin-1"), "is not UTF-8 text (line 2 holds a byte that is not)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
        (b"slices:\x00\x00\x00\x01", "is not a text file (it holds NUL bytes)"),
    ],
)
@pytest.mark.parametrize("command", ["params", "build", "chat", "analyze"])
def test_a_recipe_file_that_is_not_utf8_text_is_one_sentence_and_exit_2(tmp_path, capsys, content, message, command):
    recipe = tmp_path / "bad.yml"
    recipe.write_bytes(content)
    extra = {"build": [str(tmp_path / "out")], "analyze": ["--out", str(tmp_path / "lens.json")]}
    assert main([command, str(recipe), *extra.get(command, [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(recipe) in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file_is_a_user_mistake(tmp_path):
    out = run_cli("params", str(tmp_path / "nope.yml"))
    assert out.returncode == 2 and "cannot read recipe" in out.stderr


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_build_writes_a_folder_transformers_loads_with_the_in_memory_logits(tmp_path, tiny_llama, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merger.build.assemble import assemble
    from merger.plan import make_plan

    ref = str(tiny_llama)
    recipe = write_recipe(tmp_path, (ref, 0, 4), (ref, 1, 6), dtype=dtype)
    out_dir = tmp_path / "merged"
    assert main(["build", str(recipe), str(out_dir)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    built = assemble(make_plan(passthrough((ref, 0, 4), (ref, 1, 6), dtype=dtype), ANY_PATH))
    assert loaded.dtype == built.dtype == getattr(torch, dtype or "float32")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, built(ids).logits)
    assert loaded.config.num_hidden_layers == 9
    assert AutoTokenizer.from_pretrained(out_dir).chat_template
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_build_converts_dtype_and_shards_with_an_index(tmp_path, tiny_llama):
    from safetensors import safe_open

    ref = str(tiny_llama)
    recipe = write_recipe(tmp_path, (ref, 0, 6))
    out_dir = tmp_path / "bf16"
    assert main(["build", str(recipe), str(out_dir), "--dtype", "bfloat16", "--shard-size", "200K"]) == 0
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out_dir / s).is_file() for s in shards)
    with safe_open(out_dir / shards[0], framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118


def test_build_refuses_a_non_empty_output_folder(tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path, (str(tiny_llama), 0, 2))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    out = run_cli("build", str(recipe), str(tmp_path / "taken"))
    assert out.returncode == 2 and "not empty" in out.stderr


def test_chat_show_prompt_prints_the_roleplay_prompt_with_the_card_and_persona(tiny_llama):
    card = ROOT / "assets" / "characters" / "captain-mirela.json"
    out = run_cli("chat", str(tiny_llama), "--card", str(card), "--user", "Rin", "--prompt", "Hi!", "--show-prompt")
    assert out.returncode == 0, out.stderr
    assert "airship Gull's Errand" in out.stdout and "looks Rin up and down" in out.stdout
    assert out.stdout.rstrip().endswith("<|im_start|>assistant")
