"""Attention for the compiled one-token decode step over a static KV cache.

Inside torch.compile, transformers' SDPA path repeats every key/value head once per query head of
its group (`repeat_kv`) before calling the masked SDPA kernel, so each step writes and reads the
whole cache window several times over; the masked kernel also parallelizes over heads only.
`grouped_decode_attention` groups the query heads per key/value head instead and writes the step
as two reductions (scores over the head dimension, output over the window) that inductor fuses
with the fp32 casts, reading each cached key and value once. Everything else (prefill, eager
calls, soft-capped or sink attention) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

IMPLEMENTATION = "frankenmerge_decode"  # the name models are switched to (attention and mask interfaces)


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
    """transformers' attention-function signature: the grouped form for a compiled one-token step,
    transformers' SDPA function for everything else. Returns [B, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = dropout == 0.0 and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if query.shape[2] == 1 and plain and torch.compiler.is_compiling():
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = grouped_decode_attention(query, key, value, attention_mask, scaling=scale)
        return out.transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


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
