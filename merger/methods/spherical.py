"""Blends that interpolate on a sphere or between a base and the models' average, with mergekit
0.1.5's semantics: nuslerp, multislerp, karcher and model_stock. Small pure functions over tensors
in the build dtype, computing in it as mergekit does (karcher's norms in float32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merger.errors import RecipeError


def _unit_rows(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP from v0 (t=0) to v1 (t=1) of the whole flattened tensors (`flatten`), else of each row
    (each column with `row_wise`); collinear pairs interpolate linearly."""
    eps = 1e-8
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """Two models interpolated at t = weights[1] / (weights[0] + weights[1]) (0.5 when the weights
    cancel); with a base, their task vectors are, and the base is added back."""
    first, second = tensors
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return _nuslerp_pair(t, first, second, row_wise=row_wise, flatten=flatten)
    return base + _nuslerp_pair(t, first - base, second - base, row_wise=row_wise, flatten=flatten)


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of several models (their task vectors, with a
    base): directions averaged in the tangent space at their weighted mean, mapped back, scaled to
    the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)  # [n, *shape]
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)  # [n, numel]
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # [n, 1]
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise RecipeError(
                "multislerp cannot blend these tensors: their weighted directions cancel out (opposite "
                "models with balancing weights); change a weight"
            )
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    out = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
    out = out.view(stacked.shape[1:])
    return out if base is None else out + base


def karcher(tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher (Riemannian) mean of the tensors' directions on the unit
    sphere, found by at most `max_iter` gradient steps, scaled to their mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(work)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / total for i in valid]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(valid_alphas, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True)) * mean


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: the models' average pulled toward the base by t = n cos / (1 + (n - 1) cos),
    cos the mean cosine between their task vectors (per row with `filter_wise`); where that is
    singular, the base."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) for t in tensors] if base.dim() == 1 else list(tensors)
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denominator))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)
