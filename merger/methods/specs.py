"""Which parameters each merge method takes (passthrough and the blends), with mergekit 0.1.5's
names, scopes and defaults: data for recipe validation and the plan's parameter resolution. No
torch here, so `params` and the page's preview stay light (DESIGN.md: they import neither torch
nor modeling code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["shared", "input", "non_base"]  # one value per tensor / per source / per non-base source
REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float | bool | int
    scope: Scope
    default: Any = REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    needs_base: bool
    min_sources: int = 1
    max_sources: int | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _task_vector_spec(name: str, *, normalize: bool, rescale: bool, seeded: bool = False) -> MethodSpec:
    params = (
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        Param("int8_mask", bool, "shared", False),  # mergekit's mask storage type: no numeric effect
    )
    if seeded:  # ours: mergekit draws DARE's masks from the unseeded global generator
        params += (Param("seed", int, "shared", 0),)
    return MethodSpec(name, params, needs_base=True)


PASSTHROUGH = "passthrough"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # mergekit multiplies a passed-through tensor by `scale` when it resolves to a value (LLaMA-Pro
        # block expansion: o_proj/down_proj at 0, so an added layer starts as the identity)
        MethodSpec(PASSTHROUGH, (Param("scale", float, "input", None),), needs_base=False, max_sources=1),
        MethodSpec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)), False),
        _task_vector_spec("task_arithmetic", normalize=False, rescale=False),
        _task_vector_spec("ties", normalize=True, rescale=False),
        _task_vector_spec("dare_ties", normalize=False, rescale=True, seeded=True),
        _task_vector_spec("dare_linear", normalize=False, rescale=True, seeded=True),
        MethodSpec("slerp", (Param("t", float, "shared"),), needs_base=True, min_sources=2, max_sources=2),
    )
}
BLEND_METHODS = tuple(name for name in METHODS if name != PASSTHROUGH)
