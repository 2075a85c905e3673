"""Counts from a Plan, from metadata alone: parameters as exported (a duplicated layer counts
twice, tied embeddings once) and memory as built (a duplicated layer's tensors are shared; a
blended or scaled tensor is materialized, once however often it is used)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from merger.architecture import is_head
from merger.dtypes import bytes_per_value
from merger.plan import Blend, Plan


@dataclass(frozen=True)
class Counts:
    total_params: int
    num_layers: int
    dtype: str
    bytes: int  # exported size at `dtype`
    memory_bytes: int  # parameter memory of the in-memory build at `dtype`
    blend_bytes: int  # the part of memory_bytes that blended or scaled tensors take (computed, not shared)
    parent_params: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_storage(plan: Plan) -> dict[str, tuple[tuple[str, str] | Blend, int]]:
    """Output tensor name -> (storage key, parameters): outputs with one key are one tensor when built
    (a parent tensor passed through, or one distinct blend)."""
    return {
        out: (src if isinstance(src, Blend) else (src.model, src.name), src.meta.numel)
        for out, src in plan.tensors.items()
    }


def count(plan: Plan) -> Counts:
    per_param = bytes_per_value(plan.dtype)
    total = sum(src.meta.numel for src in plan.tensors.values())
    unique = dict(tensor_storage(plan).values())
    parents = {
        ref: sum(m.numel for n, m in info.tensors.items() if not (info.tied and is_head(n)))
        for ref, info in plan.models.items()
    }
    return Counts(
        total_params=total,
        num_layers=plan.num_layers,
        dtype=plan.dtype,
        bytes=total * per_param,
        memory_bytes=sum(unique.values()) * per_param,
        blend_bytes=sum(b.meta.numel for b in plan.blends) * per_param,
        parent_params=parents,
    )
