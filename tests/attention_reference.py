"""The reference for the decode attentions' tests: the slots one query token attends to, and SDPA
over them."""

import torch
import torch.nn.functional as F


def attended_slots(window: int, position: int, sliding_window: int | None = None) -> torch.Tensor:
    """bool [window]: the slots up to `position` (the last `sliding_window` of them, if given)."""
    slots = torch.arange(window)
    attend = slots <= position
    if sliding_window is not None:
        attend &= slots > position - sliding_window
    return attend


def sdpa_over(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of query [1, H, 1, D] over key/value [1, KV, W, D] (grouped) at the slots `attend` names."""
    mask = attend.reshape(1, 1, 1, -1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
