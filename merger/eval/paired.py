"""Telling noise from damage: a score's standard error and the paired difference merge - parent
over the same items, with a confidence interval from a seeded paired bootstrap and, for pass/fail
items, McNemar's exact test.

Pairing matters: two models scored on the same 40 questions differ far less by chance than two
independent 40-question samples, because most questions are easy (or hard) for both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


def item_value(value: Any) -> float:
    """One item's score as a number: a pass/fail as 1/0, a per-instruction list (IFEval's
    instruction-level metrics) as its mean."""
    if isinstance(value, list | tuple):
        return float(np.mean([float(v) for v in value])) if value else 0.0
    return float(value)


@dataclass(frozen=True)
class PairedDifference:
    """mean(merge - parent) over the items both were scored on, its standard error, a confidence
    interval (paired bootstrap percentiles at `level`), and McNemar's exact p-value when every
    item scored 0 or 1 (else None)."""

    items: int
    mean: float
    stderr: float
    low: float
    high: float
    level: float
    mcnemar_p: float | None

    @property
    def significant(self) -> bool:
        """The interval excludes 0: the difference is unlikely to be noise alone."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def paired_difference(
    merge: Mapping[int, float],
    parent: Mapping[int, float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> PairedDifference:
    """The paired difference of two models' per-item scores (by item id); both must hold the same items."""
    if set(merge) != set(parent):
        raise ValueError("a paired difference needs both models scored on the same items")
    ids = sorted(merge)
    if not ids:
        raise ValueError("a paired difference needs at least one item")
    a = np.array([merge[i] for i in ids], dtype=np.float64)
    b = np.array([parent[i] for i in ids], dtype=np.float64)
    d = a - b
    n = len(d)
    stderr = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)  # [resamples]
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    return PairedDifference(
        items=n,
        mean=float(d.mean()),
        stderr=stderr,
        low=float(low),
        high=float(high),
        level=level,
        mcnemar_p=mcnemar_exact(int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())) if binary else None,
    )


def mcnemar_exact(only_merge: int, only_parent: int) -> float:
    """Two-sided exact McNemar p-value from the discordant items (passed by one model only): under
    no difference each is a fair coin's flip."""
    n = only_merge + only_parent
    if n == 0:
        return 1.0
    k = min(only_merge, only_parent)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
