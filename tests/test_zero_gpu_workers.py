"""On ZeroGPU, `spaces` runs each GPU call in a forked worker and reuses a handler's worker for its
next call while the GPU stays idle. A reused worker holds the built models as they were at its
fork, so it must never answer from a build replaced since, while another visitor's build must not
retire it. A stand-in `spaces` that really forks shows both (tests/test_space_zero_gpu.py runs the
real package); and the move onto the call's GPU keeps repeated layers shared."""

import inspect
import multiprocessing
import sys

import gradio as gr
import pytest
import torch

from merger.build.assemble import parameter_bytes
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import builds, zero_gpu
from merger.runtime.sessions import SessionModels

from refs import ANY_PATH

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


def test_a_reused_worker_never_answers_from_a_replaced_build_and_survives_others_builds(
    forking_spaces, tiny_llama, tiny_llama_b
):
    sessions = SessionModels()

    @zero_gpu.gpu_task(10)
    def weight_of(key, version):
        return first_weight_sum(zero_gpu.held_build(sessions, key, version))

    @zero_gpu.gpu_task(10)
    def streamed_weight_of(key, version):
        yield first_weight_sum(zero_gpu.held_build(sessions, key, version))

    def build(key, ref) -> float:
        sessions.put(key, builds.build(make_plan(passthrough((str(ref), 0, 6)), ANY_PATH), device="cpu"))
        return first_weight_sum(sessions.get(key))

    def ask(key):
        version = sessions.get(key).version
        return weight_of(key, version), list(streamed_weight_of(key, version))

    first = build("alice", tiny_llama)
    assert ask("alice") == (first, [first]) and ask("alice") == (first, [first])
    assert forking_spaces.forks == 2  # nothing changed: each handler's worker reused
    build("bob", tiny_llama_b)  # another visitor's build
    assert ask("alice") == (first, [first]) and forking_spaces.forks == 2  # still reused
    second = build("alice", tiny_llama_b)  # Alice builds again: both workers hold her first build
    assert second != first
    assert ask("alice") == (second, [second])
    assert forking_spaces.forks == 4  # each stale worker refused, its call made again in a fresh fork


def test_only_a_stale_workers_refusal_is_retried(forking_spaces):
    @zero_gpu.gpu_task(10)
    def refuse():
        raise gr.Error("Build the merge first: press Build.")

    with pytest.raises(gr.Error, match="Build the merge first"):
        refuse()
    assert forking_spaces.forks == 1  # one call, in one worker: a visitor's mistake is not retried


def test_moving_a_build_keeps_its_repeated_layers_and_tied_head_shared(tiny_llama):
    built = builds.build(
        make_plan(passthrough((str(tiny_llama), 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH), device="cpu"
    )
    model = built.model
    layers = model.model.layers
    assert layers[2].mlp.up_proj.weight is not layers[4].mlp.up_proj.weight  # distinct Parameters...
    assert layers[2].mlp.up_proj.weight.data_ptr() == layers[4].mlp.up_proj.weight.data_ptr()  # ...one tensor

    moved = zero_gpu.move_shared(model, "cpu", torch.bfloat16)  # a change of dtype shows every copy made
    up = [layer.mlp.up_proj.weight for layer in moved.model.layers]
    assert up[2].dtype == torch.bfloat16 and up[2].data_ptr() == up[4].data_ptr() != up[3].data_ptr()
    assert moved.lm_head.weight.data_ptr() == moved.model.embed_tokens.weight.data_ptr()
    assert parameter_bytes(moved) == parameter_bytes(model) // 2  # bf16 halves it; nothing copied twice
    assert layers[2].mlp.up_proj.weight.dtype == torch.float32  # the build itself is left as it was
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(moved(ids).logits.float(), model.to(torch.bfloat16)(ids).logits.float())
