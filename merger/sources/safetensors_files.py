"""Reading safetensors headers without torch: 8 bytes of little-endian header length, then JSON.

Headers are untrusted (a visitor names any Hub repo): every entry is checked before it is used,
so a wrong header is one sentence naming the file, never a crash later in a count or a copy."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.dtypes import BY_CODE
from merger.errors import CheckpointError
from merger.limits import SAFETENSORS_HEADER_BYTES
from merger.sources.untrusted_json import json_object

MAX_TENSOR_BYTES = 2**48  # 256 TiB: past any real tensor, and every count stays inside int64


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor; `file` and byte `offsets` when known locally."""

    shape: tuple[int, ...]
    dtype: str  # safetensors code: "F32", "BF16", ...
    file: str | None = None
    offsets: tuple[int, int] | None = None  # absolute [begin, end) in `file`

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * BY_CODE[self.dtype].bytes


def tensor_meta(name: str, dtype: Any, shape: Any, where: str, **located: Any) -> TensorMeta:
    """A checked TensorMeta: a known dtype, a shape of whole numbers >= 0, a size that fits."""
    if dtype not in BY_CODE:
        raise CheckpointError(f"{where}: tensor {name} has dtype {str(dtype)[:20]!r}, which is not one we read")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CheckpointError(f"{where}: tensor {name} has a shape that is not a list of whole numbers")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{where}: tensor {name} has a negative dimension in its shape {list(shape)}")
    meta = TensorMeta(shape=tuple(shape), dtype=dtype, **located)
    if meta.nbytes > MAX_TENSOR_BYTES:
        raise CheckpointError(f"{where}: tensor {name}'s shape makes it larger than any tensor can be")
    return meta


def read_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Tensors of one safetensors file (with absolute byte offsets) and its `__metadata__`; a
    malformed file is a CheckpointError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path.name} is not a safetensors file (it has {size} bytes)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > min(SAFETENSORS_HEADER_BYTES.value, size - 8):
                raise CheckpointError(f"{path.name} is not a safetensors file (a header of {length:,} bytes)")
            raw_header = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc.strerror}") from None
    header = json_object(lambda: raw_header, f"{path.name}'s header", CheckpointError)
    data_start = 8 + length
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path.name}: its __metadata__ is not a mapping of texts")
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path.name}: tensor {name} has no dtype, shape and offsets")
        offsets = info.get("data_offsets")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{path.name}: tensor {name} has no byte offsets")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        tensor = tensor_meta(
            name, info.get("dtype"), info.get("shape"), path.name, file=str(path), offsets=(begin, end)
        )
        if not data_start <= begin <= end <= size:
            raise CheckpointError(f"{path.name}: tensor {name}'s bytes lie past the end of the file")
        if end - begin != tensor.nbytes:
            raise CheckpointError(
                f"{path.name}: tensor {name} has {end - begin:,} bytes, but its shape and dtype need {tensor.nbytes:,}"
            )
        tensors[name] = tensor
    return tensors, meta
