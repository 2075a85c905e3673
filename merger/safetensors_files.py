"""Reading safetensors headers without torch: 8 bytes of little-endian header length, then JSON."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


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
        return self.numel * DTYPE_SIZES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str]]:
    """Tensors of one safetensors file (with absolute byte offsets) and its `__metadata__`."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw_len)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    data_start = 8 + length
    meta = header.pop("__metadata__", {}) or {}
    tensors = {
        name: TensorMeta(
            shape=tuple(info["shape"]),
            dtype=info["dtype"],
            file=str(path),
            offsets=(data_start + info["data_offsets"][0], data_start + info["data_offsets"][1]),
        )
        for name, info in header.items()
    }
    return tensors, meta
