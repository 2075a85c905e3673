"""Where models run and who owns them: device choice and the cache of built models.

`gr.State` is deep-copied per session, so it holds ids, never models: built models live here,
keyed by the browser session (its chat model and its comparison model), within a memory budget
(least recently used evicted first, their owners told why); a new build frees the previous one.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merger.container import memory_available, memory_total
from merger.errors import PlacementError, exception_line
from merger.limits import CONTEXT_TOKENS
from merger.params import human_bytes
from merger.plan import Plan, make_plan
from merger.recipe import Recipe, passthrough
from merger.zero_gpu import on_zero_gpu

if TYPE_CHECKING:
    from merger.aot_step import AotStep
    from merger.catalog import Resolver
    from merger.fastgen import ModelDecoder
    from merger.placement import Placement

log = logging.getLogger(__name__)
_decoder_lock = threading.Lock()
_VERSIONS = itertools.count(1)


@dataclass
class Built:
    plan: Plan
    model: Any
    tokenizer: Any
    device: str  # where inputs go (with a split placement: its first device)
    seconds: float
    built_at: float = field(default_factory=time.time)
    placement: Placement | None = None
    aot_step: AotStep | None = None  # on ZeroGPU: its structure's decode step compiled ahead of time
    aot_error: str | None = None  # on ZeroGPU: why it has none
    # changes whenever what a GPU worker must hold of this build changes (made, given its AOT step)
    version: int = field(default_factory=lambda: next(_VERSIONS))
    _decoder: ModelDecoder | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """What the build holds on its devices (weights, KV cache and working memory, as placed)."""
        return self.placement.needed_bytes if self.placement is not None else 0

    @property
    def window(self) -> int:
        """The tokens of context its KV cache holds (as placed)."""
        return self.placement.context_tokens if self.placement else CONTEXT_TOKENS.value

    @property
    def decoder(self) -> ModelDecoder:
        """The model's fast decoder (made on first use; `prepare_for_chat` makes it at build time)."""
        with _decoder_lock:
            if self._decoder is None:
                from merger.fastgen import ModelDecoder

                zero = on_zero_gpu()  # no torch.compile there, and each GPU call runs in a forked process
                compile = False if zero or compile_unavailable() else None
                self._decoder = ModelDecoder(
                    self.model, window=self.window, threaded=not zero, compile=compile, aot_step=self.aot_step
                )
            return self._decoder

    def close(self) -> None:
        """Let go of the model (its decoder's requests end at their next token)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.model = None


def compile_unavailable() -> str | None:
    """Why the decode step cannot be compiled here (None: it can). torch.compile builds its GPU
    kernels' launchers with a C compiler at run time, which a Space's image may lack (packages.txt
    asks for one); without it a GPU's step runs eagerly, captured in a CUDA graph."""
    if any(shutil.which(cc) for cc in (os.environ.get("CC"), "cc", "gcc", "clang") if cc):
        return None
    return "no C compiler on this machine, which torch.compile needs"


ZERO_GPU_DEFAULT_GB = 48  # a ZeroGPU Space's card (DESIGN.md); FRANKENMERGE_ZERO_GPU_GB overrides


def best_device() -> str:
    """Where builds are assembled: CUDA when present; the CPU on ZeroGPU, whose GPU exists only inside
    GPU calls (each call moves the builds it uses onto it: `merger.zero_gpu`)."""
    if on_zero_gpu():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_dtype(plan: Plan, device: str) -> str:
    """bfloat16 on CUDA (half the memory, full speed); the recipe's dtype on the CPU."""
    return "bfloat16" if device == "cuda" and plan.recipe.dtype is None else plan.dtype


def chat_dtype(plan: Plan, device: str) -> str:
    """The dtype a build for chat is made in: on ZeroGPU the GPU's, where its replies run, though
    it waits on the CPU between them."""
    return build_dtype(plan, "cuda" if on_zero_gpu() else device)


def free_memory(device: str) -> int:
    """Bytes a new build may use on `device` ("cpu", "cuda" or "cuda:N")."""
    if device.startswith("cuda") and on_zero_gpu():  # no real device to ask outside a GPU call
        return int(float(os.environ.get("FRANKENMERGE_ZERO_GPU_GB", ZERO_GPU_DEFAULT_GB)) * 2**30)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    return memory_available()


def device_memory(kind: str) -> list[tuple[str, int]]:
    """The devices of `kind` a build may use, with their free bytes: the CPU, the GPU, or each GPU
    of several."""
    if kind == "cuda" and not on_zero_gpu():
        import torch

        if torch.cuda.device_count() > 1:
            return [(f"cuda:{i}", free_memory(f"cuda:{i}")) for i in range(torch.cuda.device_count())]
    return [(kind, free_memory(kind))]


def plan_placement(plan: Plan, device: str | None = None) -> Placement:
    """Where a build of `plan` on `device` (cpu|cuda) would go, from the plan's sizes and the free
    memory now; raises PlacementError, with the numbers, when it cannot fit. On ZeroGPU a build is
    held on the CPU and runs on the card inside GPU calls: it must fit both."""
    from merger.placement import place

    device = device or best_device()
    dtype = chat_dtype(plan, device)
    if on_zero_gpu():
        place(plan, dtype=dtype, devices=[("cuda", free_memory("cuda"))])
    return place(plan, dtype=dtype, devices=device_memory(device))


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    source = plan.tokenizer_model
    if source.tokenizer_dir is None or not source.tokenizer_dir.is_dir():  # the Hub cache may have evicted it
        from merger.hub import download_weights

        source = download_weights(source)
    return AutoTokenizer.from_pretrained(source.tokenizer_dir)


def build(plan: Plan, *, device: str | None = None, progress: Callable[[float, str], None] | None = None) -> Built:
    from merger.assemble import assemble

    device = device or best_device()
    dtype = chat_dtype(plan, device)
    placement = plan_placement(plan, device)  # before any weight is read
    start = time.perf_counter()
    model = assemble(plan, device=placement.input_device, dtype=dtype, progress=progress, placement=placement)
    tokenizer = load_tokenizer(plan)
    seconds = time.perf_counter() - start
    return Built(
        plan=plan, model=model, tokenizer=tokenizer, device=placement.input_device, seconds=seconds, placement=placement
    )


def prepare_for_chat(built: Built) -> Built:
    """Make the build's decoder now. On a GPU, fuse q/k/v and gate/up first (fewer, larger kernels
    per step; repeated layers stay shared), capture its eager step in a CUDA graph and start the
    step's compile in the background, so the first reply pays for neither. On ZeroGPU nothing:
    each GPU call's worker makes its own decoder (`attach_aot_step` gives it a step compiled ahead
    of time)."""
    if on_zero_gpu():
        return built
    split = built.placement is not None and built.placement.is_split
    if built.device.startswith("cuda") and not split:
        from merger.fastgen import fuse_projections

        fuse_projections(built.model)
    built.decoder.warm_up(built.tokenizer("Hello", return_tensors="pt")["input_ids"])
    return built


AOT_COMPILE_SECONDS = 300  # ZeroGPU time asked for exporting and compiling one structure's step


def zero_gpu_aot() -> bool:
    """Compile builds' decode steps ahead of time on ZeroGPU: opt-in (FRANKENMERGE_ZERO_GPU_AOT=1)
    until a CUDA package loads: on the H200 (torch 2.11) AOTInductor's loader crashed on every one (README)."""
    return on_zero_gpu() and os.environ.get("FRANKENMERGE_ZERO_GPU_AOT", "") == "1"


_AOT_STEPS: weakref.WeakValueDictionary[str, AotStep] = weakref.WeakValueDictionary()  # by structure
_AOT_LOCK = threading.Lock()  # one compile at a time: builds of one structure wait for the first


def attach_aot_step(built: Built, compile_on_gpu: Callable[[], AotStep]) -> None:
    """On ZeroGPU: give the build its structure's decode step compiled ahead of time (`aot_step`),
    compiling it with `compile_on_gpu` (a GPU call) unless a live build of the structure already
    did; if that fails, `aot_error` says why and replies run without it (replaying a CUDA graph)."""
    from merger.decode_attention import use_decode_attention
    from merger.fastgen import model_structure

    use_decode_attention(built.model)  # as `compile_step` does: its attention is part of the structure
    structure = f"{built.window} {model_structure(built.model)}"
    with _AOT_LOCK:
        step = _AOT_STEPS.get(structure)
        if step is None:
            try:
                step = compile_on_gpu()
            except Exception as exc:
                built.aot_error = exception_line(exc)
                log.warning("decode step not compiled ahead of time, replies run without it: %s", built.aot_error)
                return
            _AOT_STEPS[structure] = step
    built.aot_step = step
    built.version = next(_VERSIONS)  # workers forked before hold the build without its step


def build_for_chat(
    recipe: Recipe | None, *, resolver: Resolver, model_ref: str | None = None, device: str | None = None
) -> Built:
    """A recipe's merge, or a single model as it is (all its layers in order), ready to chat."""
    return prepare_for_chat(build(make_plan(recipe or as_it_is(model_ref, resolver), resolver), device=device))


def as_it_is(model_ref: str, resolver: Resolver) -> Recipe:
    """The recipe of a model as it is: all its layers, in order."""
    return passthrough((model_ref, 0, resolver(model_ref).num_layers))


def needed_bytes(plan: Plan, device: str | None = None) -> int:
    """What a build of `plan` on `device` will hold (weights, KV cache, working memory), whatever is free now."""
    from merger.placement import place

    device = device or best_device()
    return place(plan, dtype=chat_dtype(plan, device), devices=[(device, 1 << 62)]).needed_bytes


def default_budget(device: str) -> int:
    """The memory all built models together may hold: FRANKENMERGE_MEMORY_BUDGET_GB, else 90% of the
    GPUs' memory on CUDA or half the container's memory (its limit, not the host's) on the CPU."""
    if env := os.environ.get("FRANKENMERGE_MEMORY_BUDGET_GB"):
        return int(float(env) * 2**30)
    if device == "cuda":
        import torch

        return int(0.9 * sum(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count())))
    return memory_total() // 2


class SessionModels:
    """Built models by key (a session's id, or its id and a slot such as `:compare`), thread-safe,
    within `budget_bytes` in all: making room for a build evicts the least recently used others,
    whose owners read why in `notice`."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a reservation ended or a model went
        self._models: OrderedDict[str, Built] = OrderedDict()  # least recently used first
        self._reserved: dict[str, int] = {}  # bytes promised to builds in progress, by key
        self._notices: dict[str, str] = {}
        self.budget_bytes = budget_bytes
        self.peak_bytes = 0  # the most that models and reservations together ever held

    def get(self, key: str) -> Built | None:
        with self._lock:
            built = self._models.get(key)
            if built is not None:
                self._models.move_to_end(key)
            return built

    def notice(self, key: str) -> str | None:
        """Why `key`'s model is gone, if it was evicted (said once)."""
        with self._lock:
            return self._notices.pop(key, None)

    @contextmanager
    def room_for(self, key: str, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget for a build of `key` (its previous model freed first), evicting
        least recently used models as needed and waiting for builds in progress to finish; raises
        PlacementError when even an empty cache would not hold it."""
        self.drop(key)
        evicted: list[Built] = []
        with self._changed:
            budget = self.budget_bytes
            if budget is not None and nbytes > budget:
                raise PlacementError(
                    f"the build needs about {human_bytes(nbytes)}, more than this server's budget for built models "
                    f"({human_bytes(budget)})"
                )
            while budget is not None and self._used() + nbytes > budget:
                if not self._models:  # only other builds in progress hold the budget: wait for them
                    self._changed.wait()
                    continue
                owner, built = self._models.popitem(last=False)
                self._notices[owner] = (
                    f"your model was unloaded to make room for another visitor's build (this server holds "
                    f"{human_bytes(budget)} of built models; the least recently used go first); press Build again"
                )
                evicted.append(built)
            self._reserved[key] = nbytes
            self.peak_bytes = max(self.peak_bytes, self._used())
        for built in evicted:
            _free(built)
        try:
            yield
        finally:
            with self._changed:
                self._reserved.pop(key, None)
                self._changed.notify_all()

    def put(self, key: str, built: Built) -> None:
        with self._lock:
            old = self._models.pop(key, None)
            self._models[key] = built
            self._reserved.pop(key, None)  # the build now counts for itself
            self._notices.pop(key, None)
            self.peak_bytes = max(self.peak_bytes, self._used())
            self._changed.notify_all()
        if old is not None:
            _free(old)

    def drop(self, key: str) -> None:
        with self._lock:
            old = self._models.pop(key, None)
            self._changed.notify_all()
        if old is not None:
            _free(old)

    def drop_session(self, session: str) -> None:
        """Free every model of a session (its chat model and any slot of it)."""
        with self._lock:
            keys = [k for k in self._models if k == session or k.startswith(f"{session}:")]
        for key in keys:
            self.drop(key)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return sum(b.nbytes for b in self._models.values()) + sum(self._reserved.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


def _free(built: Built) -> None:
    device = built.device
    built.close()
    gc.collect()
    if device.startswith("cuda") and not on_zero_gpu():
        import torch

        torch.cuda.empty_cache()
