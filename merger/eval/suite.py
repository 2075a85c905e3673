"""Which tasks an eval runs: the quick suite, any lm-eval task name, and task definitions kept on
this machine (the folders in FRANKENMERGE_EVAL_TASKS, lm-eval YAML files that an operator trusts).

lm-eval's own tasks load their data from the Hub through `datasets`; where the Hub cannot be
reached, a task that cannot load is named with the reason, beside the tasks defined locally.
Groups (e.g. `leaderboard_bbh`) are expanded into their tasks, each scored on its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.errors import UserError, exception_line
from merger.limits import EVAL_TASKS

TASK_FOLDERS_VARIABLE = "FRANKENMERGE_EVAL_TASKS"


@dataclass(frozen=True)
class SuiteTask:
    name: str  # lm-eval's task name
    family: str  # what mergers watch it for
    items: int  # items the quick suite scores by default (sized so the suite fits a few minutes)


# The Open LLM Leaderboard's families, at sizes that fit minutes per model on one GPU: generation
# (IFEval's up to 1,280 tokens an item, GSM8K's 256) costs far more per item than a multiple-choice
# question, which is one batched forward pass.
QUICK_SUITE = (
    SuiteTask("leaderboard_ifeval", "instruction following", 10),
    SuiteTask("gsm8k", "math", 10),
    SuiteTask("leaderboard_mmlu_pro", "knowledge (multiple choice)", 40),
    SuiteTask("arc_challenge", "reasoning (multiple choice)", 40),
    SuiteTask("hellaswag", "reasoning (multiple choice)", 40),
)
TYPED_TASK_ITEMS = 20  # a task typed by name, when no item count is given


def default_items(task: str) -> int:
    return next((t.items for t in QUICK_SUITE if t.name == task), TYPED_TASK_ITEMS)


@dataclass
class LoadedTask:
    """One lm-eval task ready to score: its name, how many items it has, and what lm-eval
    aggregates of it (per metric: the aggregation function and whether higher is better)."""

    name: str
    size: int
    output_type: str
    metrics: list[str]  # in the task's order; the first is its headline
    filters: list[str]  # filter names ("none" without a filter list); the first is the headline's
    aggregations: dict[str, Callable[[list[Any]], float]] = field(repr=False)
    higher_is_better: dict[str, bool] = field(repr=False)
    max_gen_toks: int | None = None  # generation tasks: new tokens an item may take

    @property
    def headline(self) -> tuple[str, str]:
        """(metric, filter) the table and the paired differences report."""
        return self.metrics[0], self.filters[0]


def task_folders() -> tuple[Path, ...]:
    """The operator's folders of lm-eval task YAML (FRANKENMERGE_EVAL_TASKS, separated by ':')."""
    raw = os.environ.get(TASK_FOLDERS_VARIABLE, "")
    return tuple(Path(p).expanduser().resolve() for p in raw.split(":") if p.strip())


_managers: dict[tuple[tuple[Path, ...], bool], Any] = {}
_managers_lock = threading.Lock()


def task_manager(*, with_lm_eval_tasks: bool) -> Any:
    """lm-eval's TaskManager over the local folders, with lm-eval's own thousands of tasks or
    without them (indexing those takes about 20 s on a small CPU: done once per process, only when a
    name is not local)."""
    from lm_eval.tasks import TaskManager

    key = (task_folders(), with_lm_eval_tasks)
    with _managers_lock:
        if key not in _managers:
            folders = [str(p) for p in key[0] if p.is_dir()]
            _managers[key] = TaskManager(include_path=folders or None, include_defaults=with_lm_eval_tasks)
        return _managers[key]


def local_tasks() -> list[str]:
    """Tasks defined in the local folders (what runs without the Hub)."""
    if not task_folders():
        return []
    manager = task_manager(with_lm_eval_tasks=False)
    return sorted(name for name in manager.all_subtasks if not name.startswith("__"))


def parse_task_names(text: str | Sequence[str]) -> list[str]:
    """Task names from a comma- or space-separated text (or a list), in order, once each, within the limit."""
    parts = text.replace(",", " ").split() if isinstance(text, str) else [p.strip() for p in text]
    names = list(dict.fromkeys(p for p in parts if p))
    if not names:
        raise UserError("name at least one task to evaluate")
    EVAL_TASKS.check(len(names), "the eval")
    for name in names:
        if not all(c.isalnum() or c in "_-." for c in name):
            raise UserError(f"'{name[:80]}' is not an lm-eval task name (letters, digits, '_', '-' and '.')")
    return names


def load_tasks(names: Sequence[str]) -> list[LoadedTask]:
    """Each named task (a group's tasks in its place) loaded with its data; a name lm-eval does not
    know, or a task whose data cannot load, is refused in one sentence that names them all and the
    tasks defined on this machine."""
    local = set(local_tasks())
    manager = task_manager(with_lm_eval_tasks=not set(names) <= local)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval has no task named {', '.join(unknown)}{_local_offer(local)}")
    loaded: list[LoadedTask] = []
    failed: list[str] = []
    for name in names:
        try:
            loaded.extend(_leaves(name, manager))
        except UserError:
            raise
        except Exception as exc:  # the data did not load: offline, a gated dataset, a task that runs code
            failed.append(f"{name} ({why_not_loaded(exc, on_hub=name not in local)})")
    if failed:
        raise UserError(f"these tasks could not load: {'; '.join(failed)}{_local_offer(local)}")
    EVAL_TASKS.check(len(loaded), "the eval, its groups expanded,")
    return loaded


def why_not_loaded(exc: Exception, *, on_hub: bool) -> str:
    """Why a task did not load: for an lm-eval task, whose data is on the Hub, that the Hub cannot be
    reached (HF_HUB_OFFLINE) when so; else the error."""
    if on_hub and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "its data is on the Hub, which cannot be reached from here"
    return exception_line(exc)[:300]


def _local_offer(local: set[str]) -> str:
    if not local:
        return "; no tasks are defined on this machine (an operator can list folders of task YAML in " + (
            f"{TASK_FOLDERS_VARIABLE})"
        )
    return f"; tasks defined on this machine: {', '.join(sorted(local))}"


def _leaves(name: str, manager: Any) -> list[LoadedTask]:
    from lm_eval.tasks import get_task_dict

    return [_loaded(task) for task in _flatten(get_task_dict([name], manager))]


def _flatten(tasks: dict) -> list[Any]:
    found = []
    for value in tasks.values():
        found.extend(_flatten(value) if isinstance(value, dict) else [value])
    return found


def _loaded(task: Any) -> LoadedTask:
    config = task.config
    filters = [f["name"] for f in (config.filter_list or [])] or ["none"]
    metrics = list(task.aggregation())
    generation = config.generation_kwargs or {}
    return LoadedTask(
        name=config.task,
        size=len(task.eval_docs),
        output_type=task.OUTPUT_TYPE,
        metrics=metrics,
        filters=filters,
        aggregations=dict(task.aggregation()),
        higher_is_better=dict(task.higher_is_better()),
        max_gen_toks=int(generation.get("max_gen_toks", 256)) if task.OUTPUT_TYPE == "generate_until" else None,
    )
