"""ZeroGPU Spaces: the GPU exists only inside `spaces.GPU` calls, each run in a worker process
forked from the server (DESIGN.md, Spaces).

spaces emulates CUDA outside those calls with a torch function mode entered on the thread that
imported it; Gradio runs handlers in other threads, where CUDA work reaches the real (absent)
driver. So builds happen on the CPU, and a GPU call moves the builds it uses onto its GPU, as the
ZeroGPU docs prescribe for models made after start-up, keeping repeated layers shared
(`move_shared`). A worker is reused for a handler's next call while the GPU stays idle; it holds
the builds as they were at its fork, so each call names the versions it needs and a worker that
holds another version refuses (`StaleWorker`) and the call runs again in a fresh fork.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from merger.errors import StaleWorker, UserError
from merger.host import on_zero_gpu
from merger.runtime.devices import free_memory

if TYPE_CHECKING:
    import torch
    from torch import nn

    from merger.runtime.builds import Built
    from merger.runtime.sessions import SessionModels

# What a visitor may spend in a day (ZeroGPU's quotas): a reply never asks for more than an
# anonymous visitor's whole quota, so none is refused for its size alone.
ANONYMOUS_QUOTA_SECONDS = 120
# spaces multiplies every duration by its GPU's factor (read from the driver); the largest it knows
# (the RTX PRO 6000 entry of spaces 0.51's configs) when it cannot say.
LARGEST_DURATION_FACTOR = 1.5
PESSIMISTIC_TOKENS_PER_SECOND = 20  # an 8B step left eager, should its capture in a CUDA graph fail
CALL_OVERHEAD_SECONDS = 15  # the fork, moving the weights on, the prompt


def duration_factor() -> float:
    """What ZeroGPU multiplies a call's duration by on this Space's GPU (spaces reads the GPU model
    from the driver and its factor from its own table)."""
    try:
        from spaces.zero.config import get_config
    except ImportError:
        return LARGEST_DURATION_FACTOR
    return float(get_config()["duration_factor"])


def reply_seconds(max_new_tokens: int, replies: int = 1) -> int:
    """GPU seconds to ask ZeroGPU for `replies` replies of up to `max_new_tokens` each: moving the
    weights on, then decoding at a pessimistic 20 tokens/s; never more than an anonymous visitor's
    daily quota admits once spaces multiplies it by the GPU's duration factor."""
    wanted = CALL_OVERHEAD_SECONDS + replies * int(max_new_tokens) // PESSIMISTIC_TOKENS_PER_SECOND
    return min(wanted, int(ANONYMOUS_QUOTA_SECONDS / duration_factor()))


def gpu_task(duration: int | Callable[..., int]) -> Callable[[Callable], Callable]:
    """`spaces.GPU(duration=...)` on a ZeroGPU Space: the call runs in a worker holding the GPU for at
    most `duration` seconds (or what the callable says for the call's arguments). Elsewhere: the
    function unchanged. A worker that refuses as stale is dropped by spaces (it drops a worker
    after any error) and the call is made once more, in a fresh fork."""
    if not on_zero_gpu():
        return lambda fn: fn
    import spaces

    def wrap(fn: Callable) -> Callable:
        on_gpu = spaces.GPU(duration=duration)(fn)
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream_handler(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from on_gpu(*args, **kwargs)
                except Exception as exc:  # a stale worker refuses before its first item
                    if not is_stale(exc):
                        raise
                    yield from on_gpu(*args, **kwargs)

            return stream_handler

        @functools.wraps(fn)
        def handler(*args: Any, **kwargs: Any) -> Any:
            try:
                return on_gpu(*args, **kwargs)
            except Exception as exc:
                if not is_stale(exc):
                    raise
                return on_gpu(*args, **kwargs)

        return handler

    return wrap


def is_stale(exc: BaseException) -> bool:
    """`exc` says a worker was stale: as raised, or as spaces (0.51) hands back an exception that is
    not a gr.Error: a gr.Error whose message is the exception's class name."""
    return isinstance(exc, StaleWorker) or getattr(exc, "message", None) == StaleWorker.__name__


def held_build(sessions: SessionModels, key: str, version: int) -> Built:
    """Inside a GPU call: the build under `key` at `version`, on the call's device. In a ZeroGPU
    worker that holds another version (or none) of it, raises StaleWorker: it was forked before.
    In the server's own process (no ZeroGPU) the build may have gone since the handler looked (a
    new build, or room made for another visitor's): that is said (UserError)."""
    built = sessions.get(key)
    if not on_zero_gpu():
        if built is None:
            raise UserError("your model was unloaded while the reply started: press Build again")
        return built
    if built is None or built.version != version:
        held = "none" if built is None else f"version {built.version}"
        raise StaleWorker(f"this worker holds {held} of the build, not version {version}")
    return _CALL_COPIES.on_call_device(key, built)


class CallCopies:
    """In a ZeroGPU worker: the builds moved onto its GPU, kept for the worker's next calls (spaces
    reuses a worker while the GPU stays idle) within the card, least recently used dropped first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: OrderedDict[str, Built] = OrderedDict()  # by key, least recently used first

    def on_call_device(self, key: str, built: Built) -> Built:
        import dataclasses

        import torch

        with self._lock:
            copy_ = self._copies.get(key)
            if copy_ is not None and copy_.version == built.version:
                self._copies.move_to_end(key)
                return copy_
            if (stale := self._copies.pop(key, None)) is not None:
                stale.close()
            # spaces has undone its emulation in the worker: this is the GPU the call holds (none when
            # ZeroGPU is reproduced on a CPU machine)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._make_room(built.nbytes, device)
            moved = move_shared(built.model, device)
            copy_ = dataclasses.replace(built, model=moved, device=device, _decoder=None)
            self._copies[key] = copy_
            return copy_

    def _make_room(self, nbytes: int, device: str) -> None:

        card = free_memory("cuda") if device == "cuda" else None
        while self._copies and card is not None and sum(b.nbytes for b in self._copies.values()) + nbytes > card:
            _, old = self._copies.popitem(last=False)
            old.close()
        if device == "cuda":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


_CALL_COPIES = CallCopies()


def move_shared(model: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `model` on `device` (floating tensors in `dtype` when given), each distinct tensor
    moved once: parameters that share one tensor (a repeated layer's, tied embeddings) share its
    copy. `nn.Module.to` moves each Parameter object by itself, so the distinct Parameters a build
    gives a repeated layer over the parent's tensor would become separate copies. `model` is left
    as it is."""
    from torch import nn

    moved: dict[tuple, torch.Tensor] = {}
    memo: dict[int, Any] = {}

    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        key = (*view, tensor.dtype)
        if key not in moved:
            wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            moved[key] = tensor.detach().to(device=device, dtype=wanted)
        return moved[key]

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in memo:
                memo[id(param)] = nn.Parameter(on_device(param), requires_grad=param.requires_grad)
        for buffer in module._buffers.values():
            if buffer is not None and id(buffer) not in memo:
                memo[id(buffer)] = on_device(buffer)
    return copy.deepcopy(model, memo)
