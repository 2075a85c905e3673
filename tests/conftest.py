"""Shared fixtures: a local fake Hub (every test runs offline) and tiny models made once per
test session. The bundled models' real cache is reused, so their conversion runs once."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (tests/test_decode_kernel.py) run in Triton's interpreter, on CPU tensors. Set
    # before anything imports triton (torch._dynamo does), since @triton.jit reads it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import start_session_hub
from tiny import make_finetune, make_lora, make_tiny, with_dtype

# huggingface_hub reads HF_ENDPOINT and friends once, at import: start the fake Hub first.
HUB = start_session_hub()


@pytest.fixture
def hub():
    HUB.reset()
    return HUB


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", layers=6)


@pytest.fixture(scope="session")
def tiny_llama_b(tmp_path_factory) -> Path:
    """Same shape as tiny_llama, different weights: a second parent to interleave."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-b", "llama", layers=6, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_ft1(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama "fine-tuned": a task vector away from it (for task arithmetic, TIES, DARE)."""
    return make_finetune(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama-ft1", seed=11)


@pytest.fixture(scope="session")
def tiny_llama_ft2(tiny_llama, tmp_path_factory) -> Path:
    """A second, different fine-tune of tiny_llama."""
    return make_finetune(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama-ft2", seed=12, scale=0.03)


@pytest.fixture(scope="session")
def tiny_llama_lora(tiny_llama, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter for tiny_llama on q_proj, v_proj and down_proj (rank 4, alpha 8)."""
    path = tmp_path_factory.mktemp("adapters") / "tiny-llama-lora"
    return make_lora(tiny_llama, path, seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="session")
def tiny_llama_bf16(tiny_llama, tmp_path_factory) -> Path:
    return with_dtype(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama-bf16", "bfloat16")


@pytest.fixture(scope="session")
def tiny_llama_bf16_lora(tiny_llama_bf16, tmp_path_factory) -> Path:
    """An adapter of every kind of scaling for the bf16 parent: rsLoRA, a module of another rank
    and another alpha, and the (tied) embeddings, saved with PEFT's copy of the embedding layer."""
    return make_lora(
        tiny_llama_bf16,
        tmp_path_factory.mktemp("adapters") / "tiny-llama-bf16-lora",
        seed=22,
        dtype="bfloat16",
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "o_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"gate_proj": 4},
    )


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-gemma", "gemma3", layers=12, chat=False)


@pytest.fixture(scope="session")
def eval_tasks(tmp_path_factory) -> Iterator[Path]:
    """Local lm-eval tasks (tests/evalkit.py) in a folder the app and the CLI read them from
    (FRANKENMERGE_EVAL_TASKS), for the whole session."""
    from evalkit import write_tasks

    from merger.eval.suite import TASK_FOLDERS_VARIABLE

    folder = write_tasks(tmp_path_factory.mktemp("eval-tasks"))
    before = os.environ.get(TASK_FOLDERS_VARIABLE)
    os.environ[TASK_FOLDERS_VARIABLE] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(TASK_FOLDERS_VARIABLE, None)
    else:
        os.environ[TASK_FOLDERS_VARIABLE] = before


@pytest.fixture
def web_tiny_llama(tiny_llama, monkeypatch) -> str:
    """tiny_llama as a web visitor names it: the web policy admits the folder that holds it (as
    FRANKENMERGE_LOCAL_DIRS would), and the page refers to it by its name under that root."""
    import ui.models
    from merger.sources.catalog import LocalPolicy

    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=(tiny_llama.parent.resolve(),)))
    ui.models.public_info.cache_clear()
    yield tiny_llama.name
    ui.models.public_info.cache_clear()


@pytest.fixture(scope="session")
def space_app(tiny_llama, tiny_llama_b, tiny_gemma):
    """The app as a ZeroGPU Space runs it (tests/spacekit.py), in its own process, on tiny models
    published under the Space's model ids."""
    from spacekit import GATED_MODEL, SECOND_MODEL, SPACE_MODEL, start_space_app, stop_space_app

    app = start_space_app({SPACE_MODEL: tiny_llama, SECOND_MODEL: tiny_llama_b, GATED_MODEL: tiny_gemma})
    yield app
    stop_space_app(app)


@pytest.fixture(scope="session")
def app_url() -> Iterator[str]:
    """The real app, served in-process on a free port for HTTP and browser tests."""
    import socket

    from app import QUEUE_OPTIONS, demo
    from ui.chat import STOPS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(**QUEUE_OPTIONS).launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        for event in list(STOPS.values()):  # every reply in progress ends before the server goes
            event.set()
        demo.close()
        time.sleep(1)  # let generation threads see the stop before the interpreter exits
