"""A plan's blends -> tensors: each input read from its parent's safetensors file (a LoRA
adapter merged in where a `model+lora` reference's adapter changes it), cast to the build dtype on
the build device, blended by merger.methods.functions, one output tensor at a time. Assemble and
export both use it, so the chatted and the exported model get the same blends."""

from __future__ import annotations

import os

import torch

from merger.dtypes import torch_dtype
from merger.methods.functions import blend
from merger.plan import Blend, TensorSource
from merger.sources.lora import LoraDelta
from merger.sources.model_info import ModelInfo
from merger.sources.safetensors_files import TensorMeta


class ParentReader:
    """Reads single parent tensors by (model, name) at their byte offsets, each parent file opened
    once. Plain reads rather than a memory map: mapped pages would stay resident (and count in
    the process's memory) until the whole file is closed."""

    def __init__(self, models: dict[str, ModelInfo]) -> None:
        self._models = models
        self._fds: dict[str, int] = {}

    def __enter__(self) -> ParentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, src: TensorSource, *, device: str, dtype: torch.dtype) -> torch.Tensor:
        """One parent tensor in `dtype` on `device`; a tensor a LoRA adapter changes is merged with
        it first (lora_merged), in the parent's own dtype on the CPU, as mergekit merges it."""
        model = self._models[src.model]
        if src.delta is None:
            return self._read(model.tensors[src.name]).to(device=device, dtype=dtype)
        stored = model.adapter.tensors[src.delta.saved_layer] if src.delta.saved_layer else model.tensors[src.name]
        weight = self._read(stored).to(torch_dtype(model.declared_dtype))
        a, b = (self._read(model.adapter.tensors[name]) for name in (src.delta.a, src.delta.b))
        return lora_merged(weight, a, b, src.delta).to(device=device, dtype=dtype)

    def _read(self, meta: TensorMeta) -> torch.Tensor:
        """A stored tensor as it is stored, on the CPU."""
        fd = self._fds.get(meta.file)
        if fd is None:
            fd = self._fds[meta.file] = os.open(meta.file, os.O_RDONLY)
        start, end = meta.offsets
        raw = bytearray(end - start)
        view, pos = memoryview(raw), start
        while pos < end:
            n = os.preadv(fd, [view[pos - start :]], pos)
            if n == 0:
                raise OSError(f"{meta.file} ended early")
            pos += n
        if not raw:
            return torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
        return torch.frombuffer(raw, dtype=torch_dtype(meta.dtype)).reshape(meta.shape)


def lora_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, delta: LoraDelta) -> torch.Tensor:
    """`weight` with the adapter merged in, in weight's dtype (PEFT's merge, as mergekit runs it on
    the CPU: A and B in float32, the product scaled, then added)."""
    product = b.to(torch.float32) @ a.to(torch.float32)
    if delta.embedding:
        return weight + (product.T * delta.scaling).to(weight.dtype)
    return (weight.to(torch.float32) + product * delta.scaling).to(weight.dtype)


def compute_blend(
    item: Blend, reader: ParentReader, *, device: str, dtype: torch.dtype, loaded: dict | None = None
) -> torch.Tensor:
    """One blended tensor; inputs already in `loaded` ((model, name) -> tensor) are reused."""
    loaded = loaded or {}
    inputs = []
    for src in item.sources:
        tensor = loaded.get((src.model, src.name))
        inputs.append(tensor if tensor is not None else reader.read(src, device=device, dtype=dtype))
    with torch.no_grad():
        return blend(
            item.method,
            inputs,
            base_index=item.base_index,
            shared=dict(item.shared),
            per_source=[dict(p) for p in item.per_source],
            seed_keys=[f"{src.model}:{src.name}" for src in item.sources],
        )
