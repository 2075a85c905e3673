"""On ZeroGPU, `spaces` runs each GPU call in a forked worker and reuses a handler's worker for its
next call while the GPU stays idle. A reused worker holds the built models as they were at its
fork, so it must never answer from them once they changed. A stand-in `spaces` that really forks
shows that it does not."""

import inspect
import multiprocessing
import sys

import gradio as gr
import pytest

from merger import runtime
from merger.plan import make_plan
from merger.recipe import passthrough

FORK = multiprocessing.get_context("fork")


class ForkingSpaces:
    """`spaces.GPU` as spaces 0.51 runs it: each call in a forked worker process; a handler's worker
    kept for its next call after a success (the GPU stayed idle) and dropped after an error; a
    gr.Error comes back as itself, any other exception as a gr.Error naming its class."""

    def __init__(self) -> None:
        self.forks = 0
        self.processes: list = []
        self.in_worker = False

    def GPU(self, duration):  # spaces.GPU
        def wrap(task):
            streams = inspect.isgeneratorfunction(task)
            kept: list = []

            def run(*args, **kwargs):
                if self.in_worker:  # a handler calling another, inside a worker
                    return task(*args, **kwargs)
                worker = kept.pop() if kept else None
                if worker is None or not worker[0].is_alive():
                    worker = self._fork(task, streams)
                worker[1].send((args, kwargs))
                ok, value = worker[1].recv()
                if not ok:
                    raise value
                kept.append(worker)
                return iter(value) if streams else value

            return run

        return wrap

    def _fork(self, task, streams):
        parent, child = FORK.Pipe()
        process = FORK.Process(target=self._serve, args=(task, streams, child), daemon=True)
        process.start()
        self.forks += 1
        self.processes.append(process)
        return process, parent

    def _serve(self, task, streams, conn):
        self.in_worker = True
        while True:
            args, kwargs = conn.recv()
            try:
                value = task(*args, **kwargs)
                conn.send((True, list(value) if streams else value))
            except gr.Error as exc:
                conn.send((False, exc))
            except Exception as exc:
                conn.send((False, gr.Error(type(exc).__name__)))


@pytest.fixture
def forking_spaces(monkeypatch):
    spaces = ForkingSpaces()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    yield spaces
    for process in spaces.processes:
        process.kill()


def first_weight_sum(built) -> float:
    return float(built.model.model.layers[0].mlp.up_proj.weight.detach().sum())


def test_a_reused_zero_gpu_worker_never_answers_from_a_build_replaced_since_its_fork(
    forking_spaces, tiny_llama, tiny_llama_b
):
    sessions = runtime.SessionModels()

    @runtime.gpu_task(10)
    def weight_of(key):
        return first_weight_sum(sessions.get(key))

    @runtime.gpu_task(10)
    def streamed_weight_of(key):
        yield first_weight_sum(sessions.get(key))

    def build(ref) -> float:
        sessions.put("visitor", runtime.build(make_plan(passthrough((str(ref), 0, 6))), device="cpu"))
        return first_weight_sum(sessions.get("visitor"))

    first = build(tiny_llama)
    assert weight_of("visitor") == first and list(streamed_weight_of("visitor")) == [first]
    assert weight_of("visitor") == first and forking_spaces.forks == 2  # nothing changed: reused
    second = build(tiny_llama_b)  # the visitor builds again: both workers hold the first build
    assert second != first
    assert weight_of("visitor") == second and list(streamed_weight_of("visitor")) == [second]
    assert forking_spaces.forks == 4  # each stale worker refused, its call made again in a fresh fork


def test_only_a_stale_workers_refusal_is_retried(forking_spaces):
    @runtime.gpu_task(10)
    def refuse():
        raise gr.Error("Build the merge first: press Build.")

    with pytest.raises(gr.Error, match="Build the merge first"):
        refuse()
    assert forking_spaces.forks == 1  # one call, in one worker: a visitor's mistake is not retried
