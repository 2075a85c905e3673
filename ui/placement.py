"""The placement shown next to the preview: which layers run on which device, and memory per device."""

from __future__ import annotations

from html import escape

from merger.plan.placement import DEPTH_RANGES, DeviceShare, Placement
from merger.sizes import human_bytes
from ui.text import md


def _layers(share: DeviceShare) -> str:
    ranges = " ".join(f"[{a}, {b})" for a, b in share.depth_ranges)
    return f"{ranges} ({len(share.depths)})" if ranges else "none"


def placement_markdown(placement: Placement) -> str:
    tokens = f"{placement.context_tokens:,} tokens"
    if not placement.is_split:
        share = placement.shares[0]
        return (
            f"**Placement**: one device, `{escape(share.device)}`, all {len(share.depths)} layers: about "
            f"{human_bytes(share.needed_bytes)} of {human_bytes(share.free_bytes)} free ("
            f"{human_bytes(share.weight_bytes)} weights, {human_bytes(share.kv_bytes)} KV cache for {tokens}, "
            f"{human_bytes(share.working_bytes)} working memory)"
        )
    how = (
        "contiguous depth ranges (a repeated layer too big for one device is copied)"
        if placement.strategy == DEPTH_RANGES
        else "each layer on the device holding its tensors (repeated layers stay shared)"
    )
    lines = [
        f"**Placement**: {len(placement.shares)} devices, {how}; {placement.hops} device hops per token, "
        f"KV cache for {tokens}",
        "",
        "| device | layers [start, end) | weights | KV cache | working | needed / free |",
        "|---|---|---|---|---|---|",
    ]
    for s in placement.shares:
        copied = f" (copies {human_bytes(s.copy_bytes)})" if s.copy_bytes else ""
        lines.append(
            f"| `{escape(s.device)}` | {_layers(s)} | {human_bytes(s.weight_bytes)}{copied} | "
            f"{human_bytes(s.kv_bytes)} | {human_bytes(s.working_bytes)} | "
            f"{human_bytes(s.needed_bytes)} / {human_bytes(s.free_bytes)} |"
        )
    if placement.copies:
        lines += [
            "",
            f"{placement.copies} extra tensor copies ({human_bytes(placement.copy_bytes)}) where a range boundary "
            "splits a repeated layer, counted above.",
        ]
    return "\n".join(lines)


def refusal_markdown(message: str) -> str:
    return f"**Placement**: ⚠️ {md(message)}"
