"""Blend methods: small pure functions over tensors, with mergekit 0.1.5's semantics and
parameter names (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp; and passthrough's
`scale`, a blend of one tensor).

Each function takes the input tensors already in the build dtype and on the build device, and
returns the blended tensor in that dtype. Internal precision follows mergekit: linear and slerp
work in float32 (float64 inputs stay float64); the task-vector methods work in the input dtype.
merger.methods.specs describes their parameters (names, scopes, defaults) as data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


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


def _masked(delta: torch.Tensor, mask: torch.Tensor, *, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """`delta * mask`; with `rescale`, scaled back to delta's L1 norm (mergekit's `rescale`)."""
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


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
        majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        agree = stacked.sign() == majority
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


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    deltas = [t - base for t in tensors]
    return combine_task_vectors(base, deltas, weights, consensus=False, normalize=normalize, lambda_=lambda_)


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    deltas = [magnitude_prune(t - base, d, rescale=rescale) for t, d in zip(tensors, densities, strict=True)]
    return combine_task_vectors(base, deltas, weights, consensus=True, normalize=normalize, lambda_=lambda_)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    *,
    consensus: bool,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """dare_ties (consensus=True) and dare_linear (consensus=False)."""
    deltas = [
        random_prune(t - base, d, seed=s, rescale=rescale) for t, d, s in zip(tensors, densities, seeds, strict=True)
    ]
    return combine_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


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
    """One output tensor's inputs: `tensors` in mergekit's input order, `per_source` the resolved
    per-source parameters (empty for the base), `seed_keys` one name per source for DARE's masks."""

    tensors: Sequence[torch.Tensor]
    base_index: int | None
    shared: dict[str, Any]
    per_source: Sequence[dict[str, Any]]
    seed_keys: Sequence[str]

    @property
    def others(self) -> list[int]:
        """The sources other than the base, by index."""
        return [i for i in range(len(self.tensors)) if i != self.base_index]

    def base(self, method: str) -> torch.Tensor:
        if self.base_index is None:
            raise ValueError(f"{method} needs a base tensor")
        return self.tensors[self.base_index]

    def of_others(self, name: str) -> list[Any]:
        """The per-source parameter `name` of every source but the base."""
        return [self.per_source[i][name] for i in self.others]


def _passthrough(x: BlendInputs) -> torch.Tensor:
    return x.tensors[0] * x.per_source[0]["scale"]  # as mergekit: one multiply in the input dtype


def _linear(x: BlendInputs) -> torch.Tensor:
    return linear(x.tensors, [p["weight"] for p in x.per_source], normalize=x.shared["normalize"])


def _slerp(x: BlendInputs) -> torch.Tensor:
    return slerp(x.shared["t"], x.base("slerp"), x.tensors[x.others[0]])


def _task_vectors(method: str, combine: Callable[..., torch.Tensor]) -> Callable[[BlendInputs], torch.Tensor]:
    """A task-vector method: the base alone when there is nothing to add to it, else `combine` of the
    base, the others and their weights (and whatever else `combine` reads from the inputs)."""

    def run(x: BlendInputs) -> torch.Tensor:
        base = x.base(method)
        if not x.others:
            return base
        inputs = [x.tensors[i] for i in x.others]
        common = {"normalize": x.shared["normalize"], "lambda_": x.shared["lambda"]}
        return combine(x, base, inputs, x.of_others("weight"), **common)

    return run


def _task_arithmetic(x: BlendInputs, base, inputs, weights, **common) -> torch.Tensor:
    return task_arithmetic(base, inputs, weights, **common)


def _ties(x: BlendInputs, base, inputs, weights, **common) -> torch.Tensor:
    return ties(base, inputs, weights, x.of_others("density"), rescale=x.shared["rescale"], **common)


def _dare(consensus: bool) -> Callable[..., torch.Tensor]:
    def run(x: BlendInputs, base, inputs, weights, **common) -> torch.Tensor:
        seeds = [stable_seed(x.shared["seed"], x.seed_keys[i]) for i in x.others]
        densities = x.of_others("density")
        return dare(base, inputs, weights, densities, seeds, consensus=consensus, rescale=x.shared["rescale"], **common)

    return run


# Each method's function, by the name merger.methods.specs gives it: a new method is a spec there
# and a line here.
BLENDS: dict[str, Callable[[BlendInputs], torch.Tensor]] = {
    "passthrough": _passthrough,
    "linear": _linear,
    "task_arithmetic": _task_vectors("task_arithmetic", _task_arithmetic),
    "ties": _task_vectors("ties", _ties),
    "dare_ties": _task_vectors("dare_ties", _dare(consensus=True)),
    "dare_linear": _task_vectors("dare_linear", _dare(consensus=False)),
    "slerp": _slerp,
}


def blend(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    shared: dict[str, Any],
    per_source: Sequence[dict[str, Any]],
    seed_keys: Sequence[str] = (),
) -> torch.Tensor:
    """One output tensor's blend by `method` (BlendInputs says what the arguments hold)."""
    function = BLENDS.get(method)
    if function is None:
        raise ValueError(f"unknown blend method '{method}'")
    return function(BlendInputs(tensors, base_index, shared, per_source, seed_keys))
