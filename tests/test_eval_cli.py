"""`python -m merger eval`: a recipe scored beside its parent on local tasks, written as lm-eval's
results per model plus the paired differences; a mistake is one sentence and exit code 2."""

import json

from evalkit import GEN_TASK, MC_TASK

from merger.__main__ import main
from merger.recipe import passthrough


def test_eval_writes_each_models_results_and_the_paired_differences(tmp_path, capsys, eval_tasks, tiny_llama):
    ref = str(tiny_llama)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(passthrough((ref, 0, 4), (ref, 2, 6)).to_yaml())
    out, samples = tmp_path / "eval.json", tmp_path / "items.jsonl"
    args = [
        "eval",
        str(recipe),
        "--tasks",
        MC_TASK,
        GEN_TASK,
        "--limit",
        "2",
        "--out",
        str(out),
        "--samples",
        str(samples),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["merge", ref]
    for model in result["models"].values():
        assert set(model["results"]) == {MC_TASK, GEN_TASK}
        assert model["results"][MC_TASK]["sample_len"] == 2
        assert {"acc,none", "acc_stderr,none", "acc_norm,none"} <= set(model["results"][MC_TASK])
    pairs = {(p["task"], p["parent"]): p for p in result["paired_differences"]}
    assert set(pairs) == {(MC_TASK, ref), (GEN_TASK, ref)}
    assert pairs[(MC_TASK, ref)]["items"] == 2 and pairs[(MC_TASK, ref)]["low"] <= pairs[(MC_TASK, ref)]["high"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 8 and {r["model"] for r in rows} == {"merge", ref}
    printed = capsys.readouterr().out
    assert f"{MC_TASK}: merge - {ref} = " in printed and "CI [" in printed


def test_eval_of_a_parent_not_in_the_recipe_is_one_sentence_and_exit_2(tmp_path, capsys, eval_tasks, tiny_llama):
    ref = str(tiny_llama)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(passthrough((ref, 0, 4)).to_yaml())
    args = ["eval", str(recipe), "--tasks", MC_TASK, "--parents", "elsewhere/model", "--out", str(tmp_path / "o.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: the recipe has no model elsewhere/model to score as a parent; its models: {ref}"
