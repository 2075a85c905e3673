"""Our lm-eval LM against lm-eval's own `hf` backend on the same tiny model and local task items,
the aggregation of per-item outcomes against lm-eval's, and a re-run that re-scores only what changed."""

from contextlib import contextmanager

import lm_eval
import pytest
from evalkit import GEN_TASK, MC_TASK
from lm_eval.models.huggingface import HFLM

from merger.eval.lm import BuiltLM
from merger.eval.runner import EvalSettings, ScoreCache, built_here, candidates, consolidate, plain_sample, run_eval
from merger.eval.suite import load_tasks, task_manager
from merger.plan import as_it_is, make_plan
from merger.recipe import passthrough
from merger.runtime.builds import build

from refs import ANY_PATH


@pytest.fixture(scope="module")
def tiny_built(tiny_llama):
    built = build(make_plan(as_it_is(str(tiny_llama), ANY_PATH), ANY_PATH), device="cpu")
    yield built
    built.close()


def evaluate(lm, tasks, *, chat: bool = False) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(with_lm_eval_tasks=False),
        log_samples=True,
        bootstrap_iters=100,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        verbosity="ERROR",
    )


def outcomes(result: dict, task: str) -> list:
    return [(s["doc_id"], s["filter"], s["resps"], {m: s[m] for m in s["metrics"]}) for s in result["samples"][task]]


def test_our_lm_scores_every_item_as_the_hf_backend_does(eval_tasks, tiny_llama, tiny_built):
    hf = HFLM(pretrained=str(tiny_llama), batch_size=1, device="cpu")
    ours = evaluate(BuiltLM(tiny_built, batch_tokens=64), [MC_TASK, GEN_TASK])  # several batches, shared rows
    theirs = evaluate(hf, [MC_TASK, GEN_TASK])
    for task in (MC_TASK, GEN_TASK):
        assert {k: v for k, v in ours["results"][task].items() if "," in k} == {
            k: v for k, v in theirs["results"][task].items() if "," in k
        }
    mine, hf_items = outcomes(ours, MC_TASK), outcomes(theirs, MC_TASK)
    assert [(i, f, m) for i, f, _, m in mine] == [(i, f, m) for i, f, _, m in hf_items]  # each item's acc, acc_norm
    for (*_, resps, _), (*_, hf_resps, _) in zip(mine, hf_items, strict=True):
        for (ll, greedy), (hf_ll, hf_greedy) in ((r[0], h[0]) for r, h in zip(resps, hf_resps, strict=True)):
            assert ll == pytest.approx(hf_ll, abs=1e-4) and greedy == hf_greedy
    assert outcomes(ours, GEN_TASK) == outcomes(theirs, GEN_TASK)  # the same generated text, item by item
    # through the chat template, as lm-eval's hf backend applies it
    chat_ours = evaluate(BuiltLM(tiny_built), [GEN_TASK], chat=True)
    chat_theirs = evaluate(hf, [GEN_TASK], chat=True)
    assert outcomes(chat_ours, GEN_TASK) == outcomes(chat_theirs, GEN_TASK)
    assert chat_ours["samples"][GEN_TASK][0]["arguments"][0][0].startswith("<|im_start|>user")
    # our aggregation of the per-item outcomes is lm-eval's (the value and a mean's standard error)
    mc = next(t for t in load_tasks([MC_TASK]) if t.name == MC_TASK)
    consolidated = consolidate(mc, [plain_sample(s) for s in theirs["samples"][MC_TASK]], 6, 0.0)
    for key, (value, stderr) in consolidated.metrics.items():
        metric, _, filter_name = key.partition(",")
        assert value == pytest.approx(theirs["results"][MC_TASK][key])
        assert stderr == pytest.approx(theirs["results"][MC_TASK][f"{metric}_stderr,{filter_name}"])


def test_a_rerun_after_a_seam_move_rescores_only_the_merge(eval_tasks, tiny_llama):
    ref = str(tiny_llama)
    tasks = load_tasks([MC_TASK])
    cache = ScoreCache()
    built_models = []

    @contextmanager
    def provide(candidate):
        built_models.append(candidate.label)
        with built_here(candidate, "cpu") as built:
            yield built

    def run(recipe):
        plan = make_plan(recipe, ANY_PATH)
        models = candidates(plan, [ref], device="cpu", resolver=ANY_PATH)
        return run_eval(models, tasks, EvalSettings(items=3), provide=provide, cache=cache)

    first = run(passthrough((ref, 0, 4), (ref, 2, 6)))
    second = run(passthrough((ref, 0, 5), (ref, 3, 6)))  # the seam moved: a new merge, the same parent
    assert built_models == ["merge", ref, "merge"]
    assert second.reused == [(ref, MC_TASK)]
    assert second.scores[(ref, MC_TASK)] is first.scores[(ref, MC_TASK)]
    (task, parent, difference), *_ = second.paired()
    assert (task.name, parent.label, difference.items) == (MC_TASK, ref, 3)
    assert [line.count('"doc_id"') for line in second.jsonl().splitlines()] == [1] * 6


def test_items_scored_in_chunks_as_on_zero_gpu_give_the_scores_of_one_call(eval_tasks, tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    tasks = load_tasks([MC_TASK, GEN_TASK])

    def run(chunk_items):
        models = candidates(plan, [], device="cpu", resolver=ANY_PATH)
        provide = lambda c: built_here(c, "cpu")  # noqa: E731
        return run_eval(models, tasks, EvalSettings(), provide=provide, chunk_items=chunk_items, cache=ScoreCache())

    whole, chunked = run(None), run(lambda task: 2)  # 6 and 3 items: calls of 2, 2, 2 and 2, 1
    for task in tasks:
        a, b = whole.scores[("merge", task.name)], chunked.scores[("merge", task.name)]
        assert a.metrics == b.metrics and a.per_item == b.per_item
    text = [[s["response"] for s in report.scores[("merge", GEN_TASK)].samples] for report in (whole, chunked)]
    assert text[0] == text[1]
