"""The Hub cache within a disk budget: a Space has a 50 GB ephemeral disk, and every model a visitor
builds is downloaded into it.

FRANKENMERGE_DISK_BUDGET_GB bounds what the Hub cache may hold (on a Space 30 GB by default, the rest
left to exports and the image; elsewhere no bound, since the cache is the user's own). After each
download the least recently built models are evicted until the cache fits; a model built in the
last few minutes is never evicted (another visitor's build may be reading it). A model larger than
the whole budget is refused before anything downloads.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from merger.errors import UserError
from merger.host import on_space
from merger.sizes import human_bytes

if TYPE_CHECKING:
    from merger.sources.model_info import ModelInfo

log = logging.getLogger(__name__)

BUDGET_ENV = "FRANKENMERGE_DISK_BUDGET_GB"
SPACE_BUDGET_GB = 30
IN_USE_SECONDS = 600  # a build reads its parents within this long of their download


def hub_cache_budget() -> int | None:
    """Bytes the Hub cache may hold (None: no bound)."""
    if raw := os.environ.get(BUDGET_ENV):
        return int(float(raw) * 2**30)
    return SPACE_BUDGET_GB * 2**30 if on_space() else None


def check_fits(model: ModelInfo) -> None:
    """Refuse, before downloading, a model whose weights alone exceed the budget."""
    budget = hub_cache_budget()
    size = sum(t.nbytes for t in model.tensors.values())
    if budget is not None and size > budget:
        raise UserError(
            f"'{model.ref}' has {human_bytes(size)} of weights, more than this server keeps on disk "
            f"({human_bytes(budget)}); pick a smaller model"
        )


def trim_hub_cache(*, keep: str) -> list[str]:
    """Mark `keep` (a repo id) as just used, then evict the least recently used other models until
    the Hub cache fits the budget; returns the repo ids evicted."""
    from huggingface_hub import constants, scan_cache_dir

    budget = hub_cache_budget()
    # the folder snapshot_download writes to (it reads the constant at each call; scan_cache_dir's
    # default is a copy taken at import)
    cache = scan_cache_dir(constants.HF_HUB_CACHE)
    repos = [r for r in cache.repos if r.repo_type == "model"]
    for repo in repos:
        if repo.repo_id == keep:
            os.utime(repo.repo_path)  # the use that orders eviction: the last build that read it
    if budget is None:
        return []
    total = sum(r.size_on_disk for r in cache.repos)
    now = time.time()
    evicted = []
    for repo in sorted(repos, key=lambda r: r.repo_path.stat().st_mtime):
        if total <= budget:
            break
        if repo.repo_id == keep or now - repo.repo_path.stat().st_mtime < IN_USE_SECONDS:
            continue
        cache.delete_revisions(*(rev.commit_hash for rev in repo.revisions)).execute()
        total -= repo.size_on_disk
        evicted.append(repo.repo_id)
    if total > budget:
        log.warning(
            "the Hub cache holds %s, over its %s budget: every model in it is in use",
            human_bytes(total),
            human_bytes(budget),
        )
    return evicted
