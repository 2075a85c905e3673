"""Which parameters each merge method takes (passthrough and the blends), with mergekit 0.1.5's
names, scopes and defaults, and how each treats a base model: data for recipe validation, the
plan's parameter resolution and the widget. No torch here, so `params` and the page's preview
stay light (DESIGN.md: they import neither torch nor modeling code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["shared", "input", "non_base"]  # one value per tensor / per source / per non-base source
# mergekit's base policies: a base model it must have, may have (then blends relative to it), or ignores
BasePolicy = Literal["required", "optional", "ignored"]
REQUIRED = object()


@dataclass(frozen=True)
class Interval:
    """The values a numeric parameter may take, and why (said when a value is outside)."""

    low: float
    high: float | None
    low_open: bool
    high_open: bool
    why: str

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        high = "∞)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}"


FRACTION_KEPT = Interval(0, 1, True, False, "it is the fraction of each task vector kept")


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float | bool | int
    scope: Scope
    default: Any = REQUIRED
    within: Interval | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    base: BasePolicy
    min_sources: int = 1  # the base model included
    max_sources: int | None = None
    non_base_sources: int | None = None  # exactly this many besides the base (nuslerp)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def uses_base(self) -> bool:
        """Blends relative to the recipe's base model when it has one."""
        return self.base != "ignored"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# ours, for every method that draws at random (mergekit draws from its unseeded generator)
SEED = Param("seed", int, "shared", 0)
NON_BASE_WEIGHT = Param("weight", float, "non_base")


def _task_vector_spec(
    name: str, *, normalize: bool, rescale: bool, extra: tuple[Param, ...] = (), seeded: bool = False
) -> MethodSpec:
    """mergekit's generalized task arithmetic: base + lambda * (weighted, pruned task vectors)."""
    params = (
        NON_BASE_WEIGHT,
        Param("density", float, "non_base", 1.0, FRACTION_KEPT),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        Param("int8_mask", bool, "shared", False),  # mergekit's mask storage type: no numeric effect
        *extra,
    )
    return MethodSpec(name, params + ((SEED,) if seeded else ()), base="required")


# breadcrumbs: the largest `gamma` share of each task vector is dropped as outliers, then the smallest
GAMMA = Param("gamma", float, "non_base", 0.01, Interval(0, 1, False, True, "it is the share of outliers dropped"))
# della: each entry kept with a probability from density - epsilon (smallest) to density + epsilon (largest)
EPSILON = Param("epsilon", float, "non_base", 0.15, Interval(0, 1, True, True, "it spreads the keep probabilities"))
# sce: only the entries where the task vectors vary most (this share of them) are merged
SELECT_TOPK = Param("select_topk", float, "shared", 1.0, Interval(0, 1, True, False, "it is the share of entries kept"))

PASSTHROUGH = "passthrough"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # mergekit multiplies a passed-through tensor by `scale` when it resolves to a value (LLaMA-Pro
        # block expansion: o_proj/down_proj at 0, so an added layer starts as the identity)
        MethodSpec(PASSTHROUGH, (Param("scale", float, "input", None),), base="ignored", max_sources=1),
        MethodSpec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)), "ignored"),
        _task_vector_spec("task_arithmetic", normalize=False, rescale=False),
        _task_vector_spec("ties", normalize=True, rescale=False),
        _task_vector_spec("dare_ties", normalize=False, rescale=True, seeded=True),
        _task_vector_spec("dare_linear", normalize=False, rescale=True, seeded=True),
        _task_vector_spec("breadcrumbs", normalize=False, rescale=False, extra=(GAMMA,)),
        _task_vector_spec("breadcrumbs_ties", normalize=False, rescale=False, extra=(GAMMA,)),
        _task_vector_spec("della", normalize=True, rescale=True, extra=(EPSILON,), seeded=True),
        _task_vector_spec("della_linear", normalize=False, rescale=True, extra=(EPSILON,), seeded=True),
        MethodSpec(
            "sce",
            (
                SELECT_TOPK,
                Param("int8_mask", bool, "shared", False),
            ),
            base="required",
        ),
        MethodSpec("slerp", (Param("t", float, "shared"),), base="required", min_sources=2, max_sources=2),
        MethodSpec(
            "nuslerp",
            (
                NON_BASE_WEIGHT,
                Param("nuslerp_row_wise", bool, "shared", False),
                Param("nuslerp_flatten", bool, "shared", True),
            ),
            base="optional",
            non_base_sources=2,
        ),
        MethodSpec(
            "multislerp",
            (
                NON_BASE_WEIGHT,
                Param("normalize_weights", bool, "shared", True),
                Param("eps", float, "shared", 1e-8, Interval(0, 1, True, True, "it only guards divisions")),
            ),
            base="optional",
        ),
        MethodSpec(
            "karcher",
            (
                Param("max_iter", int, "shared", 10, Interval(0, 1000, False, False, "it bounds the iterations")),
                Param("tol", float, "shared", 1e-5, Interval(0, None, False, False, "it is a convergence tolerance")),
            ),
            base="ignored",
        ),
        MethodSpec("model_stock", (Param("filter_wise", bool, "shared", False),), base="required", min_sources=3),
        MethodSpec(
            "nearswap",
            (Param("t", float, "shared", within=Interval(0, None, False, False, "it is a distance")),),
            base="required",
            min_sources=2,
            max_sources=2,
        ),
        MethodSpec("arcee_fusion", (SEED,), base="required", min_sources=2, max_sources=2),
    )
}
BLEND_METHODS = tuple(name for name in METHODS if name != PASSTHROUGH)
