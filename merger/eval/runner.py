"""Scoring a merge beside its parents on the same items, with the same settings.

Each (model, task) is scored by lm-eval's `simple_evaluate` over our `BuiltLM`, on the task's first
N items (the same ids for every model), in chunks of items where a GPU call must stay short
(ZeroGPU); the per-item outcomes are kept, and each metric is aggregated from them as lm-eval
aggregates it (the task's own aggregation function, lm-eval's standard error). Scores are cached
per (model build identity, task, items, settings): moving a seam re-scores only the merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merger.errors import UserError
from merger.eval.paired import PairedDifference, item_value, paired_difference
from merger.eval.suite import LoadedTask, default_items, local_tasks, task_manager
from merger.limits import EVAL_ITEMS, EVAL_MODELS

if TYPE_CHECKING:
    from merger.plan import Plan
    from merger.runtime.builds import Built

STDERR_BOOTSTRAP = 1000  # lm-eval's bootstrap draws for a non-mean metric's standard error (its default: 100,000)
MERGE = "merge"


@dataclass(frozen=True)
class EvalSettings:
    """What every model is scored with. `items`: per task (None: each task's default, `default_items`)."""

    items: int | None = None
    chat_template: bool = False

    def items_of(self, task: LoadedTask) -> int:
        wanted = self.items if self.items is not None else default_items(task.name)
        if wanted < 1:
            raise UserError("the item count must be at least 1")
        EVAL_ITEMS.check(wanted, "the eval's item count")
        return min(wanted, task.size)


@dataclass(frozen=True, eq=False)
class Candidate:
    """A model to score: the merge, or a parent as it is. `identity` names its build: the recipe
    and the dtype it runs in (the same identity is the same model, whatever its label)."""

    label: str
    plan: Plan
    dtype: str
    is_merge: bool = False

    @property
    def identity(self) -> str:
        text = json.dumps([self.plan.recipe.compacted().to_mergekit(), self.dtype], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class TaskScore:
    """One model's scores on one task: each metric ("metric,filter") with its standard error, the
    per-item values behind them, and each item's outcome (for the JSONL)."""

    task: str
    items: int
    metrics: dict[str, tuple[float, float | None]]  # "metric,filter" -> (value, standard error or None)
    per_item: dict[str, dict[int, float]]  # "metric,filter" -> doc id -> value
    samples: list[dict[str, Any]]
    seconds: float


class ScoreCache:
    """TaskScores by (model identity, task, items, settings), least recently used dropped past `size`."""

    def __init__(self, size: int = 256) -> None:
        self._scores: OrderedDict[tuple, TaskScore] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def get(self, key: tuple) -> TaskScore | None:
        with self._lock:
            score = self._scores.get(key)
            if score is not None:
                self._scores.move_to_end(key)
            return score

    def put(self, key: tuple, score: TaskScore) -> None:
        with self._lock:
            self._scores[key] = score
            while len(self._scores) > self.size:
                self._scores.popitem(last=False)


CACHE = ScoreCache()
# (build, task, item ids, settings, report(done, total) as requests complete) -> lm-eval's samples, made plain
Scorer = Callable[["Built", LoadedTask, list[int], EvalSettings, Callable[[int, int], None]], list[dict[str, Any]]]


def score_items(
    built: Built,
    task_name: str,
    ids: list[int],
    settings: EvalSettings,
    report: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Items `ids` of the task scored on `built` by lm-eval: one plain dict per item and filter.
    `report` hears the requests done; `check()` runs at every generated token too (either may raise to stop)."""
    from lm_eval import simple_evaluate

    from merger.eval.lm import BuiltLM

    manager = task_manager(with_lm_eval_tasks=task_name not in local_tasks())
    result = simple_evaluate(
        model=BuiltLM(built, report=report, check=check),
        tasks=[task_name],
        samples={task_name: ids},
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=settings.chat_template,
        fewshot_as_multiturn=settings.chat_template,
        verbosity="ERROR",
    )
    return [plain_sample(s) for s in result["samples"][task_name]]


def plain_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """What we keep of lm-eval's logged sample: its id, filter, target, response and metric values, as JSON values."""
    response = sample.get("filtered_resps")
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    kept = {"doc_id": int(sample["doc_id"]), "filter": sample["filter"], "target": sample.get("target")}
    kept["response"] = response
    kept["metrics"] = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    return json.loads(json.dumps(kept, default=_json_value))


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def consolidate(task: LoadedTask, samples: list[dict[str, Any]], items: int, seconds: float) -> TaskScore:
    """Each metric of `task` aggregated from the per-item samples as lm-eval aggregates it (the
    task's aggregation; lm-eval's standard error: closed form for a mean, else a bootstrap)."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    metrics: dict[str, tuple[float, float | None]] = {}
    per_item: dict[str, dict[int, float]] = {}
    for filter_name in task.filters:
        rows = sorted((s for s in samples if s["filter"] == filter_name), key=lambda s: s["doc_id"])
        for metric in task.metrics:
            scored = [s for s in rows if metric in s["metrics"]]
            if not scored:
                continue
            values = [s["metrics"][metric] for s in scored]
            aggregate = task.aggregations.get(metric, mean)
            draws = min(STDERR_BOOTSTRAP, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else STDERR_BOOTSTRAP
            stderr_of = stderr_for_metric(metric=aggregate, bootstrap_iters=draws)
            stderr = float(stderr_of(values)) if stderr_of is not None and len(values) > 1 else None
            key = f"{metric},{filter_name}"
            metrics[key] = (float(aggregate(values)), stderr)
            with contextlib.suppress(
                TypeError, ValueError
            ):  # a corpus-level metric's items (bleu's pairs) are not scores
                per_item[key] = {s["doc_id"]: item_value(s["metrics"][metric]) for s in scored}
    return TaskScore(task=task.name, items=items, metrics=metrics, per_item=per_item, samples=samples, seconds=seconds)


@dataclass
class EvalReport:
    """Every model's scores on every task, and the merge's paired differences against each parent."""

    candidates: list[Candidate]
    tasks: list[LoadedTask]
    settings: EvalSettings
    scores: dict[tuple[str, str], TaskScore] = field(default_factory=dict)  # (label, task) -> score
    reused: list[tuple[str, str]] = field(default_factory=list)  # (label, task) taken from the cache

    @property
    def merge(self) -> Candidate | None:
        return next((c for c in self.candidates if c.is_merge), None)

    def headline(self, label: str, task: LoadedTask) -> tuple[float, float | None] | None:
        """(score, standard error) of the task's headline metric for one model."""
        metric, filter_name = task.headline
        return self.scores[(label, task.name)].metrics.get(f"{metric},{filter_name}")

    def paired(self) -> list[tuple[LoadedTask, Candidate, PairedDifference]]:
        """For each task and parent: the merge's paired difference on the headline metric."""
        merge = self.merge
        if merge is None:
            return []
        found = []
        for task in self.tasks:
            key = ",".join(task.headline)
            mine = self.scores[(merge.label, task.name)].per_item.get(key)
            for parent in self.candidates:
                theirs = self.scores[(parent.label, task.name)].per_item.get(key)
                if parent.is_merge or mine is None or theirs is None:
                    continue
                found.append((task, parent, paired_difference(mine, theirs)))
        return found

    def as_json(self) -> dict[str, Any]:
        """lm-eval's results layout for each model (results, n-samples, higher_is_better), the
        settings, and the paired differences."""
        models = {}
        for c in self.candidates:
            results = {}
            for task in self.tasks:
                score = self.scores[(c.label, task.name)]
                entry: dict[str, Any] = {"alias": task.name, "sample_len": score.items}
                for key, (value, stderr) in score.metrics.items():
                    metric, _, filter_name = key.partition(",")
                    entry[key] = value
                    entry[f"{metric}_stderr,{filter_name}"] = "N/A" if stderr is None else stderr
                results[task.name] = entry
            models[c.label] = {
                "model_identity": c.identity,
                "dtype": c.dtype,
                "recipe": c.plan.recipe.to_mergekit(),
                "results": results,
                "n-samples": {t.name: {"original": t.size, "effective": self.scores[(c.label, t.name)].items}
                              for t in self.tasks},
                "higher_is_better": {t.name: t.higher_is_better for t in self.tasks},
            }  # fmt: skip
        return {
            "settings": {"items": self.settings.items, "apply_chat_template": self.settings.chat_template},
            "models": models,
            "paired_differences": [
                {
                    "task": t.name,
                    "metric": ",".join(t.headline),
                    "merge": self.merge.label,
                    "parent": p.label,
                    **d.as_dict(),
                }
                for t, p, d in self.paired()
            ],
        }

    def jsonl(self) -> str:
        """Every item's outcome, one JSON object a line: model, task, then lm-eval's sample fields."""
        lines = []
        for c in self.candidates:
            for task in self.tasks:
                for sample in self.scores[(c.label, task.name)].samples:
                    lines.append(json.dumps({"model": c.label, "task": task.name, **sample}))
        return "\n".join(lines) + "\n"


Provider = Callable[[Candidate], AbstractContextManager["Built"]]


def candidates(plan: Plan, parents: Sequence[str], *, device: str, resolver: Callable[[str], Any]) -> list[Candidate]:
    """The merge (`plan`) and each named parent as it is, in the dtype a build on `device` runs
    in. A parent must be one of the recipe's models."""
    from merger.plan import as_it_is, make_plan
    from merger.runtime.devices import chat_dtype

    unknown = [p for p in parents if p not in plan.models]
    if unknown:
        raise UserError(
            f"the recipe has no model {', '.join(unknown)} to score as a parent; its models: {', '.join(plan.models)}"
        )
    found = [Candidate(MERGE, plan, chat_dtype(plan, device), is_merge=True)]
    for ref in dict.fromkeys(parents):
        parent = make_plan(as_it_is(ref, resolver), resolver)
        label = ref if ref != MERGE else f"{ref} (parent)"  # a folder named "merge" is not the merge
        found.append(Candidate(label, parent, chat_dtype(parent, device)))
    return found


@contextmanager
def built_here(candidate: Candidate, device: str) -> Iterator[Built]:
    """A candidate built on `device` (its decoder ready) for as long as it is scored, then freed."""
    import gc

    from merger.runtime.builds import build, prepare_for_chat

    built = prepare_for_chat(build(candidate.plan, device=device))
    try:
        yield built
    finally:
        built.close()
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def run_eval(
    candidates: Sequence[Candidate],
    tasks: Sequence[LoadedTask],
    settings: EvalSettings,
    *,
    provide: Provider,
    score: Scorer | None = None,
    chunk_items: Callable[[LoadedTask], int] | None = None,
    progress: Callable[[float, str], None] = lambda fraction, text: None,
    check: Callable[[], None] = lambda: None,
    cache: ScoreCache = CACHE,
) -> EvalReport:
    """Score every candidate on every task (the same first items of each task for all), reusing
    cached scores; `provide(candidate)` gives its build for the time it is scored. `chunk_items`
    (on ZeroGPU) cuts a task's items into calls of at most that many; `progress(fraction, text)`
    hears the item count and the time left; `check()` runs between requests and generated tokens
    and may raise to stop the run."""
    EVAL_MODELS.check(len(candidates), "the eval")
    score = score or _score_here(check)
    report = EvalReport(list(candidates), list(tasks), settings)
    counts = {t.name: settings.items_of(t) for t in tasks}

    def cached(c: Candidate, task: LoadedTask) -> bool:
        hit = cache.get((c.identity, task.name, counts[task.name], settings))
        if hit is not None:
            report.scores[(c.label, task.name)] = hit
            report.reused.append((c.label, task.name))
        return hit is not None

    todo = [(c, t) for c in candidates for t in tasks if not cached(c, t)]
    clock = _Clock(sum(counts[t.name] for _, t in todo), progress)
    for candidate in [c for c in candidates if any(c is d for d, _ in todo)]:
        # a model scored earlier in this run under another label (the merge of a whole parent) is not scored twice
        pending = [t for c, t in todo if c is candidate and not cached(c, t)]
        if not pending:
            continue
        clock.say(f"building {candidate.label}")
        with provide(candidate) as built:
            for task in pending:
                n = counts[task.name]
                chunk = chunk_items(task) if chunk_items else n
                result = _score_task(
                    built, f"{candidate.label}: {task.name}", task, n, chunk, settings, score, clock, check
                )
                cache.put((candidate.identity, task.name, n, settings), result)
                report.scores[(candidate.label, task.name)] = result
    return report


def _score_task(
    built: Built,
    what: str,
    task: LoadedTask,
    n: int,
    chunk: int,
    settings: EvalSettings,
    score: Scorer,
    clock: _Clock,
    check: Callable[[], None],
) -> TaskScore:
    """The first `n` items of `task` on `built`, `chunk` items a call, consolidated."""
    start = time.monotonic()
    samples: list[dict[str, Any]] = []
    for ids in _chunks(n, chunk):
        before = clock.done

        def report_requests(done: int, total: int, size: int = len(ids), before: float = before) -> None:
            check()
            clock.at(before + size * done / max(total, 1), what, n)

        samples.extend(score(built, task, ids, settings, report_requests))
        clock.at(before + len(ids), what, n)
    return consolidate(task, samples, n, time.monotonic() - start)


def _score_here(check: Callable[[], None]) -> Scorer:
    """Scoring in this process, `check()` between requests and generated tokens."""

    def score(built: Built, task: LoadedTask, ids: list[int], settings: EvalSettings, report) -> list[dict[str, Any]]:
        return score_items(built, task.name, ids, settings, report, check=check)

    return score


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    size = max(1, size)
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n)))


class _Clock:
    """Items scored of all to score, and the time left at the rate so far, said through `progress`."""

    def __init__(self, total: int, progress: Callable[[float, str], None]) -> None:
        self.total = max(total, 1)
        self.done = 0.0
        self.task_start = 0.0  # `done` when the current task began
        self.current = ""
        self.started = time.monotonic()
        self.progress = progress

    def say(self, text: str) -> None:
        self.progress(self.done / self.total, text)

    def at(self, done: float, what: str, task_items: int) -> None:
        if what != self.current:
            self.current, self.task_start = what, self.done
        self.done = done
        elapsed = time.monotonic() - self.started
        left = elapsed * (self.total - done) / done if done > 0 else math.nan
        in_task = min(task_items, int(done - self.task_start))
        eta = "" if math.isnan(left) else f" · about {_duration(left)} left"
        self.progress(
            done / self.total,
            f"{what}: item {in_task} of {task_items} · {int(done)} of {self.total} items in all{eta}",
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
