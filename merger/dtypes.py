"""Every dtype this app reads or writes, in one table: its name (the recipe's, and torch's
attribute: `torch.<name>`), its safetensors code and its size in bytes.

No torch at import: the preview path (`params`, the page's counts) reads this table and never
imports torch (DESIGN.md); `torch_dtype` imports it when a build asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # torch.<name>; the recipe's `dtype` for the floating ones a build makes
    code: str  # safetensors' dtype code
    bytes: int


TABLE = (
    DType("float64", "F64", 8),
    DType("float32", "F32", 4),
    DType("bfloat16", "BF16", 2),
    DType("float16", "F16", 2),
    DType("int64", "I64", 8),
    DType("int32", "I32", 4),
    DType("int16", "I16", 2),
    DType("int8", "I8", 1),
    DType("uint8", "U8", 1),
    DType("bool", "BOOL", 1),
)
BY_NAME = {d.name: d for d in TABLE}
BY_CODE = {d.code: d for d in TABLE}
BUILD_DTYPES = ("float32", "bfloat16", "float16")  # what a recipe's `dtype` may ask for


def code_of(name: str) -> str:
    """The safetensors code of a dtype name ("bfloat16" -> "BF16")."""
    return BY_NAME[name].code


def name_of_code(code: str) -> str:
    """The dtype name of a safetensors code ("BF16" -> "bfloat16")."""
    return BY_CODE[code].name


def bytes_per_value(name: str) -> int:
    """Bytes one value of the dtype `name` takes."""
    return BY_NAME[name].bytes


def torch_dtype(name_or_code: str) -> torch.dtype:
    """The torch dtype of a name ("bfloat16") or a safetensors code ("BF16")."""
    import torch  # here, not at the top: the preview path reads this module without torch

    entry = BY_NAME.get(name_or_code) or BY_CODE[name_or_code]
    return getattr(torch, entry.name)


def name_of(dtype: Any) -> str:
    """The name of a torch dtype (torch.bfloat16 -> "bfloat16")."""
    return str(dtype).removeprefix("torch.")
