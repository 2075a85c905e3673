"""A plan's blends -> tensors: each input read from its parent's safetensors file, cast to the
build dtype on the build device, blended by merger.methods, one output tensor at a time.
Assemble and export both use it, so the chatted and the exported model get the same blends."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from safetensors import safe_open

from merger.catalog import ModelInfo
from merger.methods import blend
from merger.plan import Blend, TensorSource


class ParentReader:
    """Reads single parent tensors by (model, name), each parent file opened once."""

    def __init__(self, models: dict[str, ModelInfo]) -> None:
        self._models = models
        self._files: dict[str, object] = {}
        self._stack = ExitStack()

    def __enter__(self) -> ParentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, src: TensorSource, *, device: str, dtype: torch.dtype) -> torch.Tensor:
        file = self._models[src.model].tensors[src.name].file
        handle = self._files.get(file)
        if handle is None:
            handle = self._files[file] = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        return handle.get_tensor(src.name).to(device=device, dtype=dtype)


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
