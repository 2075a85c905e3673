"""Where models run and who owns them: device choice and the per-session cache of built models.

`gr.State` is deep-copied per session, so it holds ids, never models: built models live here,
keyed by the browser session, one per session (a new build frees the previous one).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from merger.errors import UserError
from merger.plan import Plan, make_plan
from merger.recipe import Recipe, passthrough


@dataclass
class Built:
    plan: Plan
    model: Any
    tokenizer: Any
    device: str
    seconds: float
    built_at: float = field(default_factory=time.time)


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_dtype(plan: Plan, device: str) -> str:
    """bfloat16 on CUDA (half the memory, full speed); the recipe's dtype on the CPU."""
    return "bfloat16" if device == "cuda" and plan.recipe.dtype is None else plan.dtype


# Beyond the weights, a build needs activations, the KV cache and allocator slack.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN_BYTES = 256 * 2**20


def free_memory(device: str) -> int:
    """Bytes a new build may use on `device`."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(plan: Plan, device: str, dtype: str) -> None:
    """Refuse, with the numbers, a build that cannot fit: estimated from the plan before any
    weight is read (shared layers count once)."""
    from merger.params import BYTES_PER_PARAM, count, human_bytes

    counts = count(plan)
    weights = counts.memory_bytes // BYTES_PER_PARAM[counts.dtype] * BYTES_PER_PARAM[dtype]
    needed = weights + max(int(weights * HEADROOM_FRACTION), HEADROOM_MIN_BYTES)
    free = free_memory(device)
    if needed > free:
        raise UserError(
            f"this merge needs about {human_bytes(needed)} on {device} ({human_bytes(weights)} of weights in "
            f"{dtype} plus working memory) but only {human_bytes(free)} is free; pick fewer or smaller layers"
        )


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    source = plan.tokenizer_model
    if source.tokenizer_dir is None:
        from merger.hub import download_weights

        source = download_weights(source)
    return AutoTokenizer.from_pretrained(source.tokenizer_dir)


def build(plan: Plan, *, device: str | None = None, progress: Callable[[float, str], None] | None = None) -> Built:
    from merger.assemble import assemble

    device = device or best_device()
    dtype = build_dtype(plan, device)
    check_fits(plan, device, dtype)
    start = time.perf_counter()
    model = assemble(plan, device=device, dtype=dtype, progress=progress)
    tokenizer = load_tokenizer(plan)
    return Built(plan=plan, model=model, tokenizer=tokenizer, device=device, seconds=time.perf_counter() - start)


def build_for_chat(recipe: Recipe | None, *, model_ref: str | None = None, device: str | None = None) -> Built:
    """A recipe's merge, or a single model as it is (all its layers in order)."""
    if recipe is None:
        from merger.catalog import resolve

        info = resolve(model_ref)
        recipe = passthrough((model_ref, 0, info.num_layers))
    return build(make_plan(recipe), device=device)


class SessionModels:
    """One built model per session id; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Built] = {}

    def get(self, session: str) -> Built | None:
        with self._lock:
            return self._models.get(session)

    def put(self, session: str, built: Built) -> None:
        with self._lock:
            old = self._models.pop(session, None)
            self._models[session] = built
        if old is not None:
            _free(old)

    def drop(self, session: str) -> None:
        with self._lock:
            old = self._models.pop(session, None)
        if old is not None:
            _free(old)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


def _free(built: Built) -> None:
    device = built.device
    del built.model
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
