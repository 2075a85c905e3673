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
from typing import TYPE_CHECKING, Any

from merger.plan import Plan, make_plan
from merger.recipe import Recipe, passthrough

if TYPE_CHECKING:
    from merger.placement import Placement


@dataclass
class Built:
    plan: Plan
    model: Any
    tokenizer: Any
    device: str  # where inputs go (with a split placement: its first device)
    seconds: float
    built_at: float = field(default_factory=time.time)
    placement: Placement | None = None


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_dtype(plan: Plan, device: str) -> str:
    """bfloat16 on CUDA (half the memory, full speed); the recipe's dtype on the CPU."""
    return "bfloat16" if device == "cuda" and plan.recipe.dtype is None else plan.dtype


def free_memory(device: str) -> int:
    """Bytes a new build may use on `device` ("cpu", "cuda" or "cuda:N")."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def device_memory(kind: str) -> list[tuple[str, int]]:
    """The devices of `kind` a build may use, with their free bytes: the CPU, the GPU, or each GPU
    of several."""
    if kind == "cuda":
        import torch

        if torch.cuda.device_count() > 1:
            return [(f"cuda:{i}", free_memory(f"cuda:{i}")) for i in range(torch.cuda.device_count())]
    return [(kind, free_memory(kind))]


def plan_placement(plan: Plan, device: str | None = None) -> Placement:
    """Where a build of `plan` on `device` (cpu|cuda) would go, from the plan's sizes and the free
    memory now; raises PlacementError, with the numbers, when it cannot fit."""
    from merger.placement import place

    device = device or best_device()
    return place(plan, dtype=build_dtype(plan, device), devices=device_memory(device))


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
    placement = plan_placement(plan, device)  # before any weight is read
    start = time.perf_counter()
    model = assemble(plan, device=placement.input_device, dtype=dtype, progress=progress, placement=placement)
    tokenizer = load_tokenizer(plan)
    seconds = time.perf_counter() - start
    return Built(
        plan=plan, model=model, tokenizer=tokenizer, device=placement.input_device, seconds=seconds, placement=placement
    )


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
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
