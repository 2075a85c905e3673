"""Every merge method by name: the pure function that blends one output tensor, given its inputs
and the parameters the plan resolved for it. merger.method_specs holds the same methods' parameters
as data (without torch, for the preview)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from merger.method_specs import METHODS
from merger.methods import (
    combine_task_vectors,
    della_prune,
    linear,
    magnitude_prune,
    outlier_prune,
    random_prune,
    sce,
    slerp,
    stable_seed,
)
from merger.selective import arcee_fusion, nearswap
from merger.spherical import karcher, model_stock, multislerp, nuslerp


@dataclass(frozen=True)
class BlendInputs:
    """One output tensor's inputs in mergekit's input order, with the resolved parameters:
    `shared` for the tensor, `per_source` for each input (non-base parameters absent on the
    base), `seed_keys` one name per input for seeded draws."""

    tensors: Sequence[torch.Tensor]
    base_index: int | None
    shared: Mapping[str, Any]
    per_source: Sequence[Mapping[str, Any]]
    seed_keys: Sequence[str]

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def others(self) -> list[torch.Tensor]:
        """The inputs besides the base, in order."""
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]

    def of_others(self, name: str) -> list[Any]:
        """Parameter `name` of each input besides the base."""
        return [p[name] for i, p in enumerate(self.per_source) if i != self.base_index]

    def of_all(self, name: str) -> list[Any]:
        return [p[name] for p in self.per_source]

    def seeds(self) -> list[int]:
        """One seed per input besides the base, from the recipe's `seed` and the input's name."""
        keys = [k for i, k in enumerate(self.seed_keys) if i != self.base_index]
        return [stable_seed(self.shared["seed"], key) for key in keys]


Prune = Callable[[torch.Tensor], torch.Tensor]


def _magnitude(b: BlendInputs) -> list[Prune]:
    return [partial(magnitude_prune, density=d, rescale=b.shared["rescale"]) for d in b.of_others("density")]


def _random(b: BlendInputs) -> list[Prune]:
    rescale = b.shared["rescale"]
    return [
        partial(random_prune, density=d, seed=s, rescale=rescale)
        for d, s in zip(b.of_others("density"), b.seeds(), strict=True)
    ]


def _outliers(b: BlendInputs) -> list[Prune]:
    rescale = b.shared["rescale"]
    return [
        partial(outlier_prune, density=d, gamma=g, rescale=rescale)
        for d, g in zip(b.of_others("density"), b.of_others("gamma"), strict=True)
    ]


def _della(b: BlendInputs) -> list[Prune]:
    rescale = b.shared["rescale"]
    return [
        partial(della_prune, density=d, epsilon=e, seed=s, rescale=rescale)
        for d, e, s in zip(b.of_others("density"), b.of_others("epsilon"), b.seeds(), strict=True)
    ]


def _task_vectors(
    pruning: Callable[[BlendInputs], list[Prune]] | None, *, consensus: bool
) -> Callable[[BlendInputs], torch.Tensor]:
    """mergekit's generalized task arithmetic: each model's task vector (model - base) pruned its
    own way (none, TIES's magnitude, DARE's random, Breadcrumbs' outliers, DELLA's ranks), then
    weighted and summed, sign-elected with `consensus`."""

    def merge(b: BlendInputs) -> torch.Tensor:
        base, others = b.base, b.others
        prunes = pruning(b) if pruning else [None] * len(others)
        deltas = [t - base if prune is None else prune(t - base) for t, prune in zip(others, prunes, strict=True)]
        normalize, lambda_ = b.shared["normalize"], b.shared["lambda"]
        return combine_task_vectors(
            base, deltas, b.of_others("weight"), consensus=consensus, normalize=normalize, lambda_=lambda_
        )

    return merge


METHOD_FUNCTIONS: dict[str, Callable[[BlendInputs], torch.Tensor]] = {
    "passthrough": lambda b: b.tensors[0] * b.per_source[0]["scale"],  # as mergekit: one multiply in the input dtype
    "linear": lambda b: linear(b.tensors, b.of_all("weight"), normalize=b.shared["normalize"]),
    "task_arithmetic": _task_vectors(None, consensus=False),
    "ties": _task_vectors(_magnitude, consensus=True),
    "dare_ties": _task_vectors(_random, consensus=True),
    "dare_linear": _task_vectors(_random, consensus=False),
    "breadcrumbs": _task_vectors(_outliers, consensus=False),
    "breadcrumbs_ties": _task_vectors(_outliers, consensus=True),
    "della": _task_vectors(_della, consensus=True),
    "della_linear": _task_vectors(_della, consensus=False),
    "sce": lambda b: sce(b.base, b.others, select_topk=b.shared["select_topk"]),
    "slerp": lambda b: slerp(b.shared["t"], b.base, b.others[0]),
    "nuslerp": lambda b: nuslerp(
        b.others,
        b.of_others("weight"),
        b.base,
        row_wise=b.shared["nuslerp_row_wise"],
        flatten=b.shared["nuslerp_flatten"],
    ),
    "multislerp": lambda b: multislerp(
        b.others, b.of_others("weight"), b.base, normalize_weights=b.shared["normalize_weights"], eps=b.shared["eps"]
    ),
    "karcher": lambda b: karcher(b.tensors, max_iter=b.shared["max_iter"], tol=b.shared["tol"]),
    "model_stock": lambda b: model_stock(b.base, b.others, filter_wise=b.shared["filter_wise"]),
    "nearswap": lambda b: nearswap(b.shared["t"], b.base, b.others[0]),
    "arcee_fusion": lambda b: arcee_fusion(b.base, b.others[0], seed=b.seeds()[0]),
}


def blend(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    seed_keys: Sequence[str] = (),
) -> torch.Tensor:
    """One output tensor blended by `method`: `tensors` in mergekit's input order, `per_source`
    the resolved per-source parameters (non-base ones absent on the base), `seed_keys` one name
    per source for seeded draws."""
    if METHODS[method].needs_base and base_index is None:
        raise ValueError(f"{method} needs a base tensor")
    return METHOD_FUNCTIONS[method](BlendInputs(tensors, base_index, shared, per_source, seed_keys))
