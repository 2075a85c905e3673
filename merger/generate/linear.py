"""Which kernel runs a decode step's matrix products: inside a compiled step on a GPU, a product of
one row runs `merger.generate.gemv`'s kernel; everything else (prefill, eager steps, the CPU) runs
`F.linear`. Eager steps keep cuBLAS because the kernel's first launch in a process compiles it, and
the first reply after a build runs the eager step; the compiled step's own compile absorbs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the GEMV kernel when torch.compile traces a product of one
    row on a GPU with the weight's columns contiguous."""
    if torch.compiler.is_compiling() and x.is_cuda and x.numel() == x.shape[-1] and weight.stride(-1) == 1:
        from merger.generate.gemv import gemv

        out = gemv(x, weight).reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class DecodeLinear(nn.Linear):
    """An nn.Linear whose forward is `decode_linear` (swapped in, so isinstance holds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def use_decode_linear(model: nn.Module) -> int:
    """Make every plain nn.Linear of the model a DecodeLinear; returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            changed += 1
    return changed
