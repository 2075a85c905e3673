"""Where models run and who owns them: device choice and the cache of built models.

`gr.State` is deep-copied per session, so it holds ids, never models: built models live here,
keyed by the browser session (its chat model and its comparison model), within a memory budget
(least recently used evicted first, their owners told why); a new build frees the previous one.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merger.errors import exception_line
from merger.host import on_zero_gpu
from merger.limits import CONTEXT_TOKENS
from merger.plan import Plan, as_it_is, in_dtype, make_plan
from merger.recipe import Recipe
from merger.runtime.devices import best_device, chat_dtype, compile_unavailable, lens_dtype, plan_placement

if TYPE_CHECKING:
    from merger.generate.aot import AotStep
    from merger.generate.loop import ModelDecoder
    from merger.plan.placement import Placement
    from merger.sources.model_info import Resolver


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
    def context_tokens(self) -> int:
        """The tokens of context its KV cache holds (as placed)."""
        return self.placement.context_tokens if self.placement else CONTEXT_TOKENS.value

    @property
    def decoder(self) -> ModelDecoder:
        """The model's fast decoder (made on first use; `prepare_for_chat` makes it at build time)."""
        with _decoder_lock:
            if self._decoder is None:
                from merger.generate.loop import ModelDecoder

                zero = on_zero_gpu()  # no torch.compile there, and each GPU call runs in a forked process
                compile = False if zero or compile_unavailable() else None
                self._decoder = ModelDecoder(
                    self.model,
                    context_tokens=self.context_tokens,
                    threaded=not zero,
                    compile=compile,
                    aot_step=self.aot_step,
                )
            return self._decoder

    def close(self) -> None:
        """Let go of the model (its decoder's requests end at their next token)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.model = None


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    source = plan.tokenizer_model
    if source.tokenizer_dir is None or not source.tokenizer_dir.is_dir():  # the Hub cache may have evicted it
        from merger.sources.hub import download_weights

        source = download_weights(source)
    return AutoTokenizer.from_pretrained(source.tokenizer_dir)


def build(plan: Plan, *, device: str | None = None, progress: Callable[[float, str], None] | None = None) -> Built:
    from merger.build.assemble import assemble

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


def build_for_lens(
    plan: Plan, *, device: str | None = None, progress: Callable[[float, str], None] | None = None
) -> Built:
    """`build` in the dtype the lens measures in (`lens_dtype`: float32 on the CPU for 16-bit
    weights where it fits)."""
    device = device or best_device()
    dtype = lens_dtype(plan, device)
    if dtype != chat_dtype(plan, device):
        plan = in_dtype(plan, dtype)
    return build(plan, device=device, progress=progress)


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
        from merger.generate.fuse import fuse_projections

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
    from merger.generate.attention import use_decode_attention
    from merger.generate.steps import model_structure

    use_decode_attention(built.model)  # as `compile_step` does: its attention is part of the structure
    structure = f"{built.context_tokens} {model_structure(built.model)}"
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
