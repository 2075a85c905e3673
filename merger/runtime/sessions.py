"""Who holds built models: `SessionModels`, keyed by the browser session (its chat model and its
comparison model), within a memory budget (least recently used evicted first, their owners told
why); a new build frees the previous one. `gr.State` is deep-copied per session, so it holds ids,
never models."""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from merger.errors import PlacementError
from merger.host import on_zero_gpu
from merger.runtime.builds import Built
from merger.sizes import human_bytes


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
