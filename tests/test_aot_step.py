"""The decode step compiled ahead of time (for ZeroGPU Spaces) gives plain `generate()`'s greedy
tokens; its package leaves the weights out, so one package serves every build of a structure with
that build's own weights, and it survives pickling (a ZeroGPU call returns it)."""

import pickle

import pytest
import torch

from merger.build.assemble import assemble
from merger.errors import AotLoadError
from merger.generate import aot as aot_step
from merger.generate.aot import AotStep, compile_step
from merger.generate.generator import FastGenerator
from merger.plan import make_plan
from merger.recipe import passthrough

from refs import ANY_PATH
from tiny import tiny_model

WINDOW = 48
PROMPT = torch.tensor([[1, 5, 9, 14]])


def duplicating_merge(tmp_path, seed: int):
    """[0,3)+[1,4) of a random 4-layer Llama: 6 layers, layers 1-2 repeated with shared tensors."""
    folder = tmp_path / f"parent-{seed}"
    tiny_model("llama", 4, seed, vocab_size=97, eos_token_id=None, pad_token_id=0).save_pretrained(folder)
    return assemble(make_plan(passthrough((str(folder), 0, 3), (str(folder), 1, 4)), ANY_PATH))


def greedy(model, new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, PROMPT.shape[1] :].tolist()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One merge and its step compiled ahead of time (tens of seconds on the CPU: once per file)."""
    model = duplicating_merge(tmp_path_factory.mktemp("aot"), seed=1)
    return model, compile_step(model, WINDOW)


def test_step_compiled_ahead_of_time_gives_generates_greedy_tokens(compiled):
    model, step = compiled
    fast = FastGenerator(model, context_tokens=WINDOW, aot_step=step)
    assert fast.ahead_of_time and not fast.compiled
    assert list(fast.generate(PROMPT, max_new_tokens=40)) == greedy(model, 40)
    assert list(fast.generate(PROMPT, max_new_tokens=40)) == greedy(model, 40)  # the cache reset in place


def test_one_package_serves_each_build_of_the_structure_with_its_own_weights(compiled, tmp_path):
    model, step = compiled
    other = duplicating_merge(tmp_path, seed=2)  # the same structure, other weights
    returned = pickle.loads(pickle.dumps(step))  # as a ZeroGPU call hands it back
    assert isinstance(returned, AotStep)
    replies = [
        list(FastGenerator(m, context_tokens=WINDOW, aot_step=returned).generate(PROMPT, max_new_tokens=24))
        for m in (other, model)
    ]
    assert replies == [greedy(other, 24), greedy(model, 24)] and replies[0] != replies[1]


def test_bound_step_reads_the_builds_own_tensors_without_a_copy(compiled, tmp_path):
    _, step = compiled
    model = duplicating_merge(tmp_path, seed=4)  # its own: this test changes its weights
    fast = FastGenerator(model, context_tokens=WINDOW, aot_step=step)
    before = greedy(model, 24)
    with torch.no_grad():  # after binding, in place: layer 3 repeats layer 1, so it changes too
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    after = greedy(model, 24)
    assert after != before
    assert list(fast.generate(PROMPT, max_new_tokens=24)) == after  # a copy would still give `before`


def test_a_package_that_fails_to_load_leaves_the_step_eager(compiled):
    model, _ = compiled
    fast = FastGenerator(model, context_tokens=WINDOW, aot_step=AotStep(b"not a package"))
    assert not fast.ahead_of_time and fast.compile_error
    assert list(fast.generate(PROMPT, max_new_tokens=12)) == greedy(model, 12)


def test_a_package_whose_loader_crashes_is_refused_with_the_signal(monkeypatch):
    # a stand-in for the H200's torch 2.11, whose loader segfaults on any CUDA package
    monkeypatch.setattr(aot_step, "LOAD_PACKAGE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(AotLoadError, match=r"crashed \(SIGSEGV\)"):
        aot_step.check_loads(b"any package")


def test_a_package_the_loader_refuses_is_refused_with_its_reason():
    with pytest.raises(AotLoadError, match=r"loader failed: .+"):
        aot_step.check_loads(b"not a package")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_compiled_ahead_of_time_on_cuda_gives_generates_greedy_tokens_or_is_refused_unloaded(tmp_path, dtype):
    model = duplicating_merge(tmp_path, seed=3).to("cuda", dtype)
    try:
        step = compile_step(model, WINDOW)
    except AotLoadError as exc:  # refused before this process loaded it: the run goes on
        pytest.xfail(f"this machine's AOTInductor cannot load the package: {exc}")
    fast = FastGenerator(model, context_tokens=WINDOW, aot_step=step)
    assert fast.ahead_of_time, fast.compile_error
    prompt = PROMPT.to("cuda")
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 4:].tolist()
    assert list(fast.generate(prompt, max_new_tokens=32)) == expected
