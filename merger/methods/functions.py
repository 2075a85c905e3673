"""Blend methods: small pure functions over tensors, with mergekit 0.1.5's semantics and
parameter names: linear, slerp, sce, and the parts of the task-vector methods (task_arithmetic,
ties, dare_*, breadcrumbs*, della*): each one's pruning of a task vector, and the weighted,
optionally sign-elected combination of them; merger.methods.spherical and
merger.methods.selective hold the other methods. BLENDS maps every method's name to its function.

Each function takes the input tensors already in the build dtype and on the build device, and
returns the blended tensor in that dtype. Internal precision follows mergekit: linear and slerp
work in float32 (float64 inputs stay float64); the task-vector methods work in the input dtype,
except that random masks (DARE, DELLA) are drawn and applied in float32 on every device.
merger.methods.specs describes their parameters (names, scopes, defaults) as data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from merger.methods.selective import arcee_fusion, nearswap
from merger.methods.specs import METHODS
from merger.methods.spherical import karcher, model_stock, multislerp, nuslerp


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted sum, divided by the weights' sum when `normalize`."""
    work = _work_dtype(tensors[0])
    w = torch.tensor(list(weights), dtype=torch.float32).to(work)
    out = torch.zeros_like(tensors[0], dtype=work)
    for tensor, coefficient in zip(tensors, w.unbind(0), strict=True):
        out.addcmul_(tensor, coefficient.to(tensor.device))
    if normalize:
        out.div_(w.sum().to(out.device))
    return out.to(tensors[0].dtype)


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries (TIES)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(magnitude, descending=True)[:k]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale=rescale)


def random_prune(delta: torch.Tensor, density: float, *, seed: int, rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE). The mask is drawn on the CPU from a
    generator seeded with `seed`, so a CPU and a GPU build of one recipe keep the same entries."""
    if density >= 1:
        return delta
    generator = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(torch.full(delta.shape, float(density)), generator=generator).to(delta.device)
    return _masked(delta.float(), mask, rescale=rescale).to(delta.dtype)


def outlier_prune(delta: torch.Tensor, density: float, *, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` share of largest-magnitude entries as outliers, then
    the smallest, keeping int(density * numel) (fewer outliers dropped when both cannot be)."""
    if density >= 1:
        return delta
    numel = delta.numel()
    kept = int(density * numel)
    smallest_dropped = max(0, numel - kept - int(gamma * numel))
    magnitude = delta.abs().reshape(-1)
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    ascending = torch.sort(magnitude, descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[ascending[smallest_dropped : smallest_dropped + kept]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale=rescale)


DELLA_CHUNK = 1 << 20  # entries ranked at a time: bounds the sorting's int64 scratch


def della_prune(
    delta: torch.Tensor, density: float, *, epsilon: float, seed: int, rescale: bool = True
) -> torch.Tensor:
    """DELLA's MagPrune: within each row, the entry of rank r (by magnitude, 0 the smallest) is kept
    with probability density - epsilon + 2 * epsilon * r / (columns - 1). Drawn as DARE's masks
    are: on the CPU from a generator seeded with `seed`. A 1-D tensor is one row. Rows are ranked
    a few at a time, so the scratch beyond the float32 probabilities and mask stays small."""
    if density >= 1:
        return delta
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # [rows, columns]
    columns = rows.shape[1]
    probabilities = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    rank_values = torch.arange(1, columns + 1, dtype=torch.float32, device=rows.device)  # rank + 1, as mergekit
    step = max(1, DELLA_CHUNK // max(columns, 1))
    for start in range(0, rows.shape[0], step):
        order = torch.argsort(rows[start : start + step].abs(), dim=1, descending=False)
        ranks = torch.empty(order.shape, dtype=torch.float32, device=rows.device)
        ranks.scatter_(1, order, rank_values.expand_as(order))  # the inverse permutation: each entry's rank
        spread = ((ranks - 1) / max(columns - 1, 1)).clamp(0, 1)  # one column: rank 0
        probabilities[start : start + step] = (density - epsilon) + spread * 2 * epsilon
    generator = torch.Generator().manual_seed(seed)
    kept = torch.bernoulli(probabilities.cpu(), generator=generator).to(delta.device)
    del probabilities
    kept.mul_(rows)
    if rescale:
        kept = _scaled_to_l1(kept, rows.abs().sum(dtype=torch.float32))
    return kept.to(delta.dtype).reshape(delta.shape)


def _masked(delta: torch.Tensor, mask: torch.Tensor, *, rescale: bool) -> torch.Tensor:
    """`delta * mask`; with `rescale`, scaled back to delta's L1 norm (mergekit's `rescale`)."""
    kept = delta * mask
    return _scaled_to_l1(kept, delta.abs().sum()) if rescale else kept


def _scaled_to_l1(kept: torch.Tensor, l1: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` (a masked tensor, scaled in place) brought back to the L1 norm `l1` it had before
    masking, unless either norm is about 0."""
    after = kept.abs().sum()
    if l1 < eps or after < eps:
        return kept
    return kept.mul_(l1 / after)


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """base + lambda * (weighted deltas, optionally sign-elected as in TIES), in base's dtype."""
    stacked = torch.stack([d.to(base.dtype) for d in deltas])  # [n, *shape]
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * base.dim()))  # [n, 1, ...]
    stacked.mul_(w)
    if consensus:
        agree = sign_agreement(stacked)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def sign_agreement(stacked: torch.Tensor) -> torch.Tensor:
    """TIES's sign election over [n, *shape]: where each entry's sign agrees with the sign of the
    entries' sum (mergekit's `sum` consensus; a zero sum elects +)."""
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    return stacked.sign() == majority


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE: keep the `select_topk` share of entries where the task vectors vary most, elect signs
    as TIES does, and weight each task vector by its mean square (its share of all of theirs)."""
    if not tensors:
        return base
    vectors = torch.stack([t - base for t in tensors], dim=0)  # [n, *shape]
    if select_topk < 1:
        vectors = vectors * _most_varied(vectors, select_topk).unsqueeze(0)
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)  # [n]
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim()))  # [n, 1, ...]
    kept = weights * sign_agreement(vectors)
    return base + (vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


def _most_varied(vectors: torch.Tensor, share: float) -> torch.Tensor:
    """A 0/1 mask over one tensor's entries: the int(share * nonzero) of largest variance across
    the task vectors."""
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * share)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


SLERP_CHUNK = 1 << 20  # entries per step: bounds float32 scratch, and matches mergekit's reduction order


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0, the base) to v1 (t=1) over the whole flattened tensor;
    nearly collinear pairs interpolate linearly. Works through the tensor in chunks, in two
    reused float32 buffers: scratch stays 2 x SLERP_CHUNK entries whatever the tensor's size."""
    work = _work_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    steps = [slice(i, min(i + SLERP_CHUNK, a.numel())) for i in range(0, a.numel(), SLERP_CHUNK)]
    if not steps:
        return v0.clone()
    size = steps[0].stop - steps[0].start
    xa = torch.empty(size, dtype=work, device=a.device)
    xb = torch.empty(size, dtype=work, device=a.device)

    def load(s: slice) -> tuple[torch.Tensor, torch.Tensor]:
        n = s.stop - s.start
        return xa[:n].copy_(a[s]), xb[:n].copy_(b[s])

    def norm(x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:  # the norm of the chunks' norms
        parts = [torch.linalg.vector_norm(buffer[: s.stop - s.start].copy_(x[s])) for s in steps]
        n = torch.linalg.vector_norm(torch.stack(parts))
        return torch.where(n > eps, n, 1)

    norm_a, norm_b = norm(a, xa), norm(b, xb)
    dots = []
    for s in steps:
        x, y = load(s)
        dots.append(x.div_(norm_a).mul_(y.div_(norm_b)).sum())  # normalized first: no overflow
    dot = torch.stack(dots).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=work, device=a.device)
    straight = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(straight, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(straight, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(straight, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in steps:
        x, y = load(s)
        out[s] = x.mul_(coef_a).add_(y.mul_(coef_b))
    return out.reshape(v0.shape)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, equal across processes (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


# Each method's function, by the name merger.methods.specs gives it: a new method is a spec there
# and a line here.
BLENDS: dict[str, Callable[[BlendInputs], torch.Tensor]] = {
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
    return BLENDS[method](BlendInputs(tensors, base_index, shared, per_source, seed_keys))
