"""Blends that choose, entry by entry, how much of another model replaces the base, with mergekit
0.1.5's semantics: nearswap and arcee_fusion. Small pure functions over tensors in the build
dtype, computing in it as mergekit does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTILE_SAMPLE = 1_000_000  # mergekit's: larger tensors estimate their quartiles from this many draws


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The other model's value where the two are closer than `t`; elsewhere moved toward it by
    t / |difference|."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Arcee Fusion: take the other model's value where its importance (|difference| times the KL
    divergence of the rows' softmaxes) is an outlier: at least median + 1.5 x the interquartile
    range. The quartiles of a tensor over QUANTILE_SAMPLE entries come from that many entries
    drawn with replacement, on the CPU from a generator seeded with `seed` (mergekit draws them
    unseeded)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    q1, median, q3 = _quartiles(importance, seed=seed)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return (base + (other - base) * mask).to(base.dtype)


def _quartiles(x: torch.Tensor, *, seed: int) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    return ordered[(torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()]
