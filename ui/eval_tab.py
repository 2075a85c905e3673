"""The Eval tab: the merge on screen scored beside the parents the visitor picks, on lm-eval tasks
(the quick suite, local task definitions, or any task name typed), on the same items with the same
settings; a table with standard errors and paired differences, a bar chart with error bars, every
item's outcome as JSONL. Model logic lives in merger/eval/.

An eval is heavy (it builds each model it scores), so evals share one queue slot (`concurrency_id
="eval"`, limit 1); it stops at its next request or token when the visitor presses Stop or leaves
(ui/guard.py). The session's built merge is scored as it is when it is the recipe on screen; any
other model is built in the session's `eval` slot for as long as it is scored. On ZeroGPU each
task's items are scored in GPU calls short enough for the duration limits (`eval_chunk_items`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.utils import get_upload_folder

from merger.eval.suite import QUICK_SUITE, LoadedTask, local_tasks, parse_task_names
from merger.host import on_zero_gpu
from merger.limits import EVAL_ITEMS
from merger.plan import Plan
from merger.runtime.zero_gpu import (
    ANONYMOUS_QUOTA_SECONDS,
    CALL_OVERHEAD_SECONDS,
    PESSIMISTIC_TOKENS_PER_SECOND,
    duration_factor,
    gpu_task,
    held_build,
)
from ui.chat import SESSIONS, build_into, slot
from ui.guard import check_current, stop_work, web_handler
from ui.models import as_visitor, model_info, plan_for
from ui.recipe_state import State, plan_of
from ui.text import md

if TYPE_CHECKING:
    from merger.eval.runner import Candidate, EvalReport, EvalSettings

EVAL_SLOT = "eval"
MULTIPLE_CHOICE_ITEMS_PER_SECOND = 4  # pessimistic, on ZeroGPU: one batched pass scores several items' choices
EXPLAIN = (
    "Score the merge on screen beside its parents on [lm-evaluation-harness](https://github.com/EleutherAI/"
    "lm-evaluation-harness) tasks, **on the same items with the same settings**: each score with its standard "
    "error, and the merge − parent difference item by item with a 95% interval (paired bootstrap; McNemar's "
    "exact p for pass/fail items), so noise can be told from damage. The quick suite covers the Open LLM "
    "Leaderboard's families: instruction following (IFEval), math (GSM8K), knowledge (MMLU-Pro) and reasoning "
    "(ARC-Challenge, HellaSwag); type any lm-eval task name too. Scores are kept per model and task: after a "
    "seam move only the merge is scored again."
)


def task_choices() -> tuple[gr.Dropdown, str]:
    """The tasks offered (the quick suite, then the tasks defined on this machine) and a note naming
    the local ones, which run without the Hub."""
    local = local_tasks()
    choices = [*(t.name for t in QUICK_SUITE), *local]
    if local:
        note = "Tasks defined on this machine (they run without the Hub): " + ", ".join(md(n) for n in local)
    else:
        note = "The tasks' data comes from the Hub; none are defined on this machine."
    return gr.Dropdown(choices=choices), note


def eval_parents(value: dict[str, Any]) -> gr.CheckboxGroup:
    """The stack's columns, offered to score beside the merge (all picked)."""
    refs = [(m.get("label") or m["ref"], m["ref"]) for m in value.get("models", [])]
    return gr.CheckboxGroup(choices=refs, value=[ref for _, ref in refs])


def eval_chunk_items(task: LoadedTask) -> int:
    """Items of `task` per ZeroGPU call: as many as fit an anonymous visitor's whole quota, at
    pessimistic speeds (a generation's every item taking all its new tokens)."""
    seconds = ANONYMOUS_QUOTA_SECONDS / duration_factor() - CALL_OVERHEAD_SECONDS
    if task.max_gen_toks:
        return max(1, int(seconds * PESSIMISTIC_TOKENS_PER_SECOND) // task.max_gen_toks)
    return max(1, int(seconds * MULTIPLE_CHOICE_ITEMS_PER_SECOND))


def eval_call_seconds(key: str, version: int, task: str, ids: list[int], settings: Any, max_gen_toks: int) -> int:
    """ZeroGPU's duration for `eval_call`: the weights moved on, then each item at pessimistic speed."""
    if max_gen_toks:
        wanted = CALL_OVERHEAD_SECONDS + len(ids) * max_gen_toks // PESSIMISTIC_TOKENS_PER_SECOND
    else:
        wanted = CALL_OVERHEAD_SECONDS + len(ids) // MULTIPLE_CHOICE_ITEMS_PER_SECOND
    return min(wanted, int(ANONYMOUS_QUOTA_SECONDS / duration_factor()))


@gpu_task(eval_call_seconds)
def eval_call(
    key: str, version: int, task: str, ids: list[int], settings: EvalSettings, max_gen_toks: int
) -> list[dict[str, Any]]:
    """In a GPU call: items `ids` of `task` scored on the build under `key` (moved onto the call's GPU)."""
    from merger.eval.runner import score_items

    return score_items(held_build(SESSIONS, key, version), task, ids, settings)


def evaluate(
    plan: Plan,
    tasks: str | Sequence[str],
    items: float,
    chat_template: bool,
    parents: Sequence[str] | None,
    request: gr.Request | None,
    progress: gr.Progress,
) -> EvalReport:
    """The merge `plan` and the picked parents scored on the tasks (see the module's docstring)."""
    from merger.eval.runner import EvalSettings, candidates, run_eval
    from merger.eval.suite import load_tasks
    from merger.runtime.devices import best_device

    names = parse_task_names(tasks or [])
    progress(0.0, desc="loading the tasks' data")
    loaded = load_tasks(names)
    check_current()
    models = candidates(plan, list(parents or []), device=best_device(), resolver=model_info)
    settings = EvalSettings(items=int(items or 0) or None, chat_template=bool(chat_template))
    held: dict[str, str] = {}  # the SESSIONS key of the model being scored

    @contextmanager
    def provide(candidate: Candidate) -> Iterator[Any]:
        merge = SESSIONS.get(slot(request))
        if candidate.is_merge and merge is not None and _same_recipe(merge.plan, candidate.plan):
            held["key"] = slot(request)
            yield merge
            return
        held["key"] = key = slot(request, EVAL_SLOT)
        try:
            yield build_into(key, candidate.plan, progress)
        finally:
            SESSIONS.drop(key)

    def on_gpu(built: Any, task: LoadedTask, ids: list[int], settings: EvalSettings, report: Any) -> list[dict]:
        return eval_call(held["key"], built.version, task.name, ids, settings, task.max_gen_toks or 0)

    zero = on_zero_gpu()
    return run_eval(
        models,
        loaded,
        settings,
        provide=provide,
        score=on_gpu if zero else None,
        chunk_items=eval_chunk_items if zero else None,
        progress=lambda fraction, text: progress(fraction, desc=text),
        check=check_current,
    )


def _same_recipe(a: Plan, b: Plan) -> bool:
    return a.recipe.compacted() == b.recipe.compacted()


@web_handler(work="the eval", model_code=True)
@as_visitor
def run_page_eval(
    tasks: list[str] | None,
    items: float,
    chat_template: bool,
    parents: list[str] | None,
    state: State,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, str, Any, str]:
    """The Eval tab's Run: the page's recipe and the picked parents; a summary, the table, the chart
    and the per-item JSONL."""
    from merger.eval.figure import eval_figure

    start = time.monotonic()
    report = evaluate(plan_of(state), tasks or [], items, chat_template, parents, request, progress)
    return summary(report, time.monotonic() - start), table(report), eval_figure(report), write_samples(report)


@web_handler(work="the eval", model_code=True)
@as_visitor
def eval_api(
    recipe_yaml: str,
    tasks: str | list[str],
    items: float,
    chat_template: bool,
    parents: list[str] | None,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, dict[str, Any], str]:
    """The /eval endpoint: a recipe's YAML scored with the named parents (refs among its models);
    a summary, the results JSON (lm-eval's per model, and the paired differences) and the per-item JSONL."""
    start = time.monotonic()
    report = evaluate(plan_for(recipe_yaml), tasks, items, chat_template, parents, request, progress)
    return summary(report, time.monotonic() - start), report.as_json(), write_samples(report)


def summary(report: EvalReport, seconds: float) -> str:
    models = ", ".join(md(c.label.removeprefix("bundled:")) for c in report.candidates)
    text = f"Scored {models} on {len(report.tasks)} task(s) in {seconds:.1f} s."
    if report.reused:
        reused = ", ".join(f"{md(label.removeprefix('bundled:'))} on {md(task)}" for label, task in report.reused)
        text += f" Scores already made (the same model, items and settings) were reused: {reused}."
    return text


def table(report: EvalReport) -> str:
    """Each task's headline score per model (± standard error), and the merge − parent paired difference."""
    labels = [md(c.label.removeprefix("bundled:")) for c in report.candidates]
    differences: dict[tuple[str, str], str] = {}
    for task, parent, d in report.paired():
        better = task.higher_is_better.get(task.headline[0], True)
        verdict = "" if not d.significant else (" **better**" if (d.mean > 0) == better else " **worse**")
        differences[(task.name, parent.label)] = f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{verdict}"
    parents = [c for c in report.candidates if not c.is_merge] if report.merge else []
    head = ["task (metric)", "items", *labels, *(f"merge − {md(p.label.removeprefix('bundled:'))}" for p in parents)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in report.tasks:
        items = report.scores[(report.candidates[0].label, task.name)].items
        cells = [f"{md(task.name)} ({md(','.join(task.headline))})", str(items)]
        for c in report.candidates:
            score = report.headline(c.label, task)
            cells.append(
                "n/a" if score is None else f"{score[0]:.4f}" + ("" if score[1] is None else f" ± {score[1]:.4f}")
            )
        cells.extend(differences.get((task.name, p.label), "n/a") for p in parents)
        rows.append("| " + " | ".join(cells) + " |")
    note = "\n\nDifferences: the mean over the same items with its 95% interval (paired bootstrap)."
    return "\n".join(rows) + (note if parents else "")


def write_samples(report: EvalReport) -> str:
    """Every item's outcome as JSONL in Gradio's cache (served from there; its `delete_cache` removes it)."""
    folder = Path(get_upload_folder()) / "frankenmerge-evals"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"eval-items-{uuid.uuid4().hex[:12]}.jsonl"
    path.write_text(report.jsonl())
    return str(path)


def build_eval_tab() -> dict[str, Any]:
    gr.Markdown(EXPLAIN)
    with gr.Row():
        tasks = gr.Dropdown(
            choices=[t.name for t in QUICK_SUITE],
            value=[t.name for t in QUICK_SUITE],
            multiselect=True,
            allow_custom_value=True,
            label="Tasks (the quick suite; type any lm-eval task name)",
            elem_id="eval-tasks",
            scale=3,
        )
        items = gr.Slider(
            0,
            EVAL_ITEMS.value,
            step=1,
            value=0,
            label="Items per task (0: the suite sizes: 10 a generation task, 40 multiple choice, 20 a typed task)",
            elem_id="eval-items",
            scale=2,
        )
    with gr.Row():
        parents = gr.CheckboxGroup(
            label="Score beside the merge (each parent as it is)", elem_id="eval-parents", scale=3
        )
        chat = gr.Checkbox(label="Prompt through the model's chat template", value=False, elem_id="eval-chat", scale=1)
    local_note = gr.Markdown(elem_id="eval-local-tasks")
    with gr.Row():
        run = gr.Button("Run eval", variant="primary", elem_id="eval-run")
        stop = gr.Button("Stop", elem_id="eval-stop")
    status = gr.Markdown(elem_id="eval-status")
    results = gr.Markdown(elem_id="eval-table")
    plot = gr.Plot(elem_id="eval-plot", show_label=False)
    samples = gr.File(label="Every item's outcome (JSONL)", elem_id="eval-samples")
    api_results = gr.JSON(visible=False)  # /eval's results JSON (the page shows the table and chart instead)
    # /eval names parents by reference: any text, checked against the recipe's models (the page offers them)
    api_parents = gr.Dropdown(multiselect=True, allow_custom_value=True, visible=False)
    return {
        "tasks": tasks,
        "items": items,
        "parents": parents,
        "chat": chat,
        "local_note": local_note,
        "run": run,
        "stop": stop,
        "status": status,
        "results": results,
        "plot": plot,
        "samples": samples,
        "api_results": api_results,
        "api_parents": api_parents,
    }


def wire_eval_tab(tab: dict[str, Any], opened: gr.Tab, stack: gr.HTML, recipe_state: gr.State, yaml_box: Any) -> None:
    """`opened`: the tab (the task list is read when it opens); `yaml_box`: the recipe /eval takes."""
    private = {"api_visibility": "private"}
    opened.select(task_choices, outputs=[tab["tasks"], tab["local_note"]], **private)
    stack.change(eval_parents, stack, tab["parents"], **private)
    heavy = {"concurrency_limit": 1, "concurrency_id": "eval"}
    inputs = [tab["tasks"], tab["items"], tab["chat"], tab["parents"]]
    outputs = [tab["status"], tab["results"], tab["plot"], tab["samples"]]
    tab["run"].click(run_page_eval, [*inputs, recipe_state], outputs, **heavy, **private)
    # the HTTP API takes a recipe's YAML (no page state): an endpoint without a trigger on the page
    api_outputs = [tab["status"], tab["api_results"], tab["samples"]]
    api_inputs = [yaml_box, tab["tasks"], tab["items"], tab["chat"], tab["api_parents"]]
    gr.on([], eval_api, api_inputs, api_outputs, api_name="eval", **heavy)
    # not in the eval slot: it must run while an eval holds it
    tab["stop"].click(stop_work, api_visibility="private", concurrency_limit=None)
