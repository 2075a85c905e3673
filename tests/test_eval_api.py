"""The /eval endpoint through gradio_client: a recipe scored beside its parent on local tasks."""

import json
from pathlib import Path

import pytest
from evalkit import GEN_TASK, MC_TASK
from gradio_client import Client

from merger.recipe import passthrough


def test_eval_endpoint_scores_the_merge_and_its_parent_on_the_same_items(app_url, eval_tasks, web_tiny_llama):
    ref = web_tiny_llama
    recipe = passthrough((ref, 0, 4), (ref, 2, 6)).to_yaml()
    client = Client(app_url, verbose=False)
    summary, results, items = client.predict(recipe, [MC_TASK, GEN_TASK], 3, False, [ref], api_name="/eval")
    assert summary.startswith("Scored merge, ") and "on 2 task(s)" in summary
    assert list(results["models"]) == ["merge", ref]
    assert all(m["results"][MC_TASK]["sample_len"] == 3 for m in results["models"].values())
    assert {(p["task"], p["parent"], p["items"]) for p in results["paired_differences"]} == {
        (MC_TASK, ref, 3),
        (GEN_TASK, ref, 3),
    }
    rows = [json.loads(line) for line in Path(items).read_text().splitlines()]
    assert sorted((r["model"], r["task"], r["doc_id"]) for r in rows) == sorted(
        (model, task, i) for model in ("merge", ref) for task in (MC_TASK, GEN_TASK) for i in range(3)
    )
    # the same request again: every score is taken from the first run
    summary, again, _ = client.predict(recipe, [MC_TASK], 3, False, [ref], api_name="/eval")
    assert "were reused" in summary
    assert again["models"]["merge"]["results"][MC_TASK] == results["models"]["merge"]["results"][MC_TASK]


def test_eval_endpoint_refuses_a_parent_outside_the_recipe_in_a_sentence(app_url, eval_tasks, web_tiny_llama):
    recipe = passthrough((web_tiny_llama, 0, 4)).to_yaml()
    with pytest.raises(Exception, match="The recipe has no model elsewhere/model to score as a parent"):
        Client(app_url, verbose=False).predict(recipe, [MC_TASK], 2, False, ["elsewhere/model"], api_name="/eval")
