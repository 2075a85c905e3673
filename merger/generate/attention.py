"""Attention for the compiled one-token decode step over a static KV cache.

Inside torch.compile, transformers' SDPA path repeats every key/value head once per query head of
its group (`repeat_kv`) before calling the masked SDPA kernel, so each step writes and reads the
whole cache window several times over; the masked kernel also parallelizes over heads only.
Three replacements, chosen by `DECODE_KERNEL` (FRANKENMERGE_DECODE_ATTENTION):
- "triton" (the default; CUDA GPUs from Ampere on): `merger.generate.kernel`'s flash-decoding
  kernels, which read only the slots up to the position and combine only the chunks holding them.
  On the H200 it gave the fastest plain 8B measured, and the smallest gap between a merge and its
  parent (README);
- "grouped" (on the CPU, and where "triton" cannot serve): the query heads grouped per key/value
  head, the step written as two reductions (scores over the head dimension, output over the
  window) that inductor fuses with the fp32 casts, reading each cached key and value once, but the
  whole window. Cut into chunks attended in parallel and combined (benchmarks/decode_attention.py's
  split variants), it made a plain 8B faster and its merge slower, and the compile 40 s longer;
- "flex": FlexAttention with a block mask built from the step's position, which torch.compile
  lowers to its flash-decoding kernel: blocks past the position (or before a sliding window) never
  read. It made a plain 8B faster and its merge slower than "grouped", and its compile about a
  minute longer.
"flex" and "triton" only for models whose masks are causal, or causal within a sliding window.
Everything else (prefill, eager calls, soft-capped or sink attention) goes to transformers' own
SDPA function; eager calls with every SDPA backend but cuDNN's, whose attention, SDPA's first
choice on Hopper, plans each prompt length it has not seen (tens of ms on the H200, its first call
most of a second: benchmarks/first_use.py), so each new prompt paid it before its first text.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from merger.architecture import POSITIONAL_MASK_KNOWN

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

IMPLEMENTATION = "frankenmerge_decode"  # the name models are switched to (attention and mask interfaces)
DECODE_KERNEL = os.environ.get("FRANKENMERGE_DECODE_ATTENTION", "triton")
FLEX_BLOCK = 128  # FlexAttention's key/value block
# the backends an eager call (a prompt, the eager step) may take: every one but cuDNN's
EAGER_SDPA_BACKENDS = [
    b for b in SDPBackend.__members__.values() if b not in (SDPBackend.ERROR, SDPBackend.CUDNN_ATTENTION)
]


def grouped_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *, scaling: float
) -> torch.Tensor:
    """Attention of one query token per head: query [B, H, 1, D] over key/value [B, KV, W, D]
    (H a multiple of KV), `mask` [B, 1, 1, W] bool (True: attend) or additive float, or None.
    Scores and softmax in fp32; returns [B, H, 1, D] in the query's dtype."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, dim).float()  # [B, KV, G, 1, D]
    # a product summed over D rather than a matmul: inductor fuses the casts into one reduction
    scores = (grouped * key.unsqueeze(2).float()).sum(-1) * scaling  # [B, KV, G, W]
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)  # [B, KV, G, W]
    out = (probs.unsqueeze(-1) * value.unsqueeze(2).float()).sum(-2)  # [B, KV, G, D]
    return out.to(query.dtype).reshape(batch, heads, 1, dim)


def decode_block_mask(position: torch.Tensor, window: int, sliding_window: int | None = None) -> BlockMask:
    """FlexAttention's BlockMask for one query token at `position` ([1, 1], its cache slot) over a
    cache of `window` slots (a multiple of FLEX_BLOCK): the slots up to it (the last
    `sliding_window` of them, if given). Made of tensors, so a compiled step builds it per token."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = window // FLEX_BLOCK
    pos = position.reshape(1)
    lo = torch.zeros_like(pos) if sliding_window is None else (pos - sliding_window + 1).clamp_min(0)
    first, last = lo // FLEX_BLOCK, pos // FLEX_BLOCK  # [1] each: the blocks holding the range's ends
    steps = torch.arange(blocks, device=position.device)
    # the two end blocks are partial (masked per slot); the blocks between them are read whole
    partial_count = (1 + (last > first).int()).reshape(1, 1, 1)
    partial = torch.where(steps == 0, first, last).reshape(1, 1, 1, blocks)
    full_count = (last - first - 1).clamp_min(0).int().reshape(1, 1, 1)
    full = (first + 1 + steps).clamp_max(blocks - 1).reshape(1, 1, 1, blocks)

    def in_range(b, h, q_idx, kv_idx):
        return (kv_idx <= pos[0]) & (kv_idx >= lo[0])

    return BlockMask.from_kv_blocks(
        partial_count.int(),
        partial.int(),
        full_count,
        full.int(),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=in_range,
        seq_lengths=(1, window),
    )


def flex_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position: torch.Tensor,
    *,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one query token [1, H, 1, D] at `position` over the static cache key/value
    [1, KV, W, D], reading only the blocks `decode_block_mask` names. Returns [1, H, 1, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = decode_block_mask(position, key.shape[2], sliding_window)
    grouped = query.shape[1] != key.shape[1]
    return flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=grouped)


def triton_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position: torch.Tensor,
    *,
    scaling: float,
    sliding_window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Attention of one query token [1, H, 1, D] at `position` over the static cache key/value
    [1, KV, W, D] through `merger.generate.kernel` (only the slots attended are read; `chunk` slots
    per program, by default its CHUNK). Returns [1, H, 1, D]."""
    from merger.generate import kernel as decode_kernel

    return decode_kernel.chunked_decode_attention(
        query, key, value, position, scaling, sliding_window or 0, chunk or decode_kernel.CHUNK
    )


def has_tensor_core_dots(device: torch.device) -> bool:
    """A CUDA GPU whose tensor cores take the kernel's bf16 dots: compute capability 8.0 or later
    (Ampere on; a T4 Space's 7.5 is not)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: for a compiled one-token step the DECODE_KERNEL
    form (flex or triton only where their conditions hold, else grouped), transformers' SDPA
    function for everything else (without cuDNN's attention when eager). Returns [B, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = dropout == 0.0 and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if query.shape[2] == 1 and plain and torch.compiler.is_compiling():
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        position, window = kwargs.get("position_ids"), kwargs.get("sliding_window")
        positional = (
            getattr(module.config, "model_type", None) in POSITIONAL_MASK_KNOWN
            and position is not None
            and query.shape[0] == 1
        )
        if DECODE_KERNEL == "flex" and positional and key.shape[2] % FLEX_BLOCK == 0:
            out = flex_decode_attention(query, key, value, position, scaling=scale, sliding_window=window)
        elif DECODE_KERNEL == "triton" and positional and has_tensor_core_dots(query.device):
            out = triton_decode_attention(query, key, value, position, scaling=scale, sliding_window=window)
        else:
            out = grouped_decode_attention(query, key, value, attention_mask, scaling=scale)
        return out.transpose(1, 2), None
    # a compiled graph's backend is chosen when it is traced
    with contextlib.nullcontext() if torch.compiler.is_compiling() else sdpa_kernel(EAGER_SDPA_BACKENDS):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model that uses SDPA to `decode_attention`; True if it now does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config.get_text_config(decoder=True)
    if config._attn_implementation == IMPLEMENTATION:
        return True
    if config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(IMPLEMENTATION, decode_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the masks SDPA gets
    model.set_attn_implementation(IMPLEMENTATION)
    return model.config.get_text_config(decoder=True)._attn_implementation == IMPLEMENTATION
