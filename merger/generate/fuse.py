"""The build-time half of fast decoding: one q/k/v and one gate/up matrix per layer, so a decode
step launches fewer, larger kernels (which modules fuse: merger.architecture)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache

from merger.architecture import FUSABLE_ATTENTION, FUSABLE_MLP
from merger.generate.linear import decode_linear
from merger.locks import PARAMETERS_LOCK


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up projections in place; returns how many modules changed.

    Each fused matrix is a non-persistent buffer made by concatenating the source weights, and the
    original weights become row views of it: no extra memory, the same parameter names and values.
    A duplicated layer (the same source tensors at two depths) gets the same fused buffer and views
    at both depths, found by the source tensors' data pointers, so it stays shared.
    """
    with PARAMETERS_LOCK:
        return _fuse(model)


def _fuse(model: nn.Module) -> int:
    fused: dict[tuple[int, ...], tuple[torch.Tensor, list[nn.Parameter]]] = {}
    changed = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name in FUSABLE_ATTENTION:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            buffer = "qkv_weight"
        elif name in FUSABLE_MLP:
            parts = [module.gate_proj, module.up_proj]
            buffer = "gate_up_weight"
        else:
            continue
        if any(p.bias is not None for p in parts):
            continue
        key = tuple(p.weight.data_ptr() for p in parts)
        if key not in fused:
            weight = torch.cat([p.weight.detach() for p in parts])  # [sum(out), in]
            torch._dynamo.mark_static_address(weight)  # CUDA graphs must not copy it in per replay
            views, row = [], 0
            for p in parts:
                rows = p.weight.shape[0]
                views.append(nn.Parameter(weight[row : row + rows], requires_grad=False))
                row += rows
            fused[key] = (weight, views)
        weight, views = fused[key]
        for p, view in zip(parts, views, strict=True):
            p.weight = view
        module.register_buffer(buffer, weight, persistent=False)
        module.__class__ = _fused_class(type(module))
        changed += 1
    return changed


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of `cls` whose forward uses the fused matrix (swapped in, so isinstance holds)."""
    if cls not in _FUSED_CLASSES:
        if cls.__name__ in FUSABLE_ATTENTION:
            forward = _fused_attention_forward(sys.modules[cls.__module__])
        else:
            forward = _fused_mlp_forward
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
    return _FUSED_CLASSES[cls]


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = decode_linear(x, self.gate_up_weight).chunk(2, dim=-1)  # [..., intermediate] each
    return self.down_proj(self.act_fn(gate) * up)


def _fused_attention_forward(modeling) -> Callable:
    """LlamaAttention.forward with one q/k/v product, using the helpers of the model's own module
    (looked up once here, so the compiled step sees plain functions)."""
    apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
    attention_functions, eager_attention = modeling.ALL_ATTENTION_FUNCTIONS, modeling.eager_attention_forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # [B, T]
        hidden_shape = (*input_shape, -1, self.head_dim)
        sizes = [self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]]
        q, k, v = decode_linear(hidden_states, self.qkv_weight).split(sizes, dim=-1)
        q = q.view(hidden_shape).transpose(1, 2)  # [B, heads, T, head_dim]
        k = k.view(hidden_shape).transpose(1, 2)  # [B, kv_heads, T, head_dim]
        v = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = attention_functions.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()  # [B, T, heads * head_dim]
        return self.o_proj(out), weights

    return forward
