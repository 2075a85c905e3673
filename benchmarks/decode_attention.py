"""What one decode step's attention costs against the KV window, for Llama-3-8B's attention shape.

A static KV cache holds the whole window (4,096 positions on the page) and the step attends over
all of it behind a mask. For each window this compiles, as the decode step is compiled (inductor,
CUDA graphs), one graph that runs attention for one query token over 32 layers' caches, and
prints per layer the kernel time (profiled) and the wall time of each way to compute it, and the
32 layers' kernel time as a share of a step at the weights' bandwidth bound (a first run printed
event-timed figures far above the real step's profile, so kernel and wall time are now apart):
- transformers_sdpa: transformers' SDPA function as it runs inside torch.compile (keys and values
  repeated per query head, then the masked SDPA kernel);
- grouped: merger.generate.attention.grouped_decode_attention (query heads grouped per key/value
  head, no repeat, fp32 scores as one fused reduction);
- grouped_matmul: the same grouping through bf16 matrix products (transformers' eager semantics);
- split8, split32, split128: the same with the window cut into that many chunks attended in
  parallel, then combined (flash-decoding in tensor ops);
- flex: FlexAttention reading only the blocks up to the current position (flash-decoding, split
  over the window, masked blocks skipped);
- triton64, triton256: merger.generate.kernel's flash-decoding kernel, reading only the slots up to
  the position, with that many slots per program (the product's CHUNK is 64);
- sdpa_packed: the grouped query handed to the masked SDPA kernel (no repeat);
- ideal: SDPA over only the positions in use, with no mask (a step's attention at best).

    python benchmarks/decode_attention.py [--windows 4096 ...] [--variants grouped split32 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import copy_bandwidth  # this folder is on the path when run as a script

from merger.generate.attention import (
    flex_decode_attention,
    grouped_decode_attention,
    triton_decode_attention,
)
from merger.generate.generator import STEP_COMPILE

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32
GROUPS = HEADS // KV_HEADS
STEP_WEIGHT_BYTES = 15_009_849_344  # Llama-3-8B's weights read per step (benchmarks/generation.py)
SCALE = HEAD_DIM**-0.5


def transformers_sdpa(q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True, training=False)
    return sdpa_attention_forward(module, q, k, v, mask, scaling=SCALE)[0].transpose(1, 2)  # [B, H, 1, D]


def grouped(q, k, v, mask):
    return grouped_decode_attention(q, k, v, mask, scaling=SCALE)


def split(splits: int):
    """Flash-decoding in tensor ops: the window cut into `splits` chunks attended in parallel, each
    with its own max and sum (grouped per key/value head, fp32), then combined as the
    Triton kernel's chunks are (merger.generate.kernel._combine_chunks)."""

    def attention(q, k, v, mask):
        chunk = k.shape[2] // splits
        g = q.reshape(1, KV_HEADS, 1, GROUPS, 1, HEAD_DIM).float()
        scores = (g * k.reshape(1, KV_HEADS, splits, 1, chunk, HEAD_DIM).float()).sum(-1) * SCALE  # [1, KV, S, G, C]
        scores = scores.masked_fill(~mask.reshape(1, 1, splits, 1, chunk), float("-inf"))
        top = scores.amax(-1, keepdim=True)  # [1, KV, S, G, 1]; -inf for a chunk wholly masked
        probs = (scores - top.nan_to_num(neginf=0.0)).exp()  # a masked chunk's are all 0, not NaN
        values = v.reshape(1, KV_HEADS, splits, 1, chunk, HEAD_DIM).float()
        part = (probs.unsqueeze(-1) * values).sum(-2)  # [1, KV, S, G, D]
        weight = (top - top.amax(2, keepdim=True)).exp()  # each chunk's share; 0 for a masked one
        out = (part * weight).sum(2) / (probs.sum(-1, keepdim=True) * weight).sum(2)  # [1, KV, G, D]
        return out.to(q.dtype).reshape(1, HEADS, 1, HEAD_DIM)

    attention.__name__ = f"split{splits}"
    return attention


def grouped_matmul(q, k, v, mask):
    g = q.reshape(1, KV_HEADS, GROUPS, HEAD_DIM)
    scores = torch.matmul(g, k.transpose(-1, -2)).float() * SCALE  # [1, KV, G, W]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(1, HEADS, 1, HEAD_DIM)


def last_attended(mask):
    """The slot of the mask's last attended position, as a decode step has it for its position id."""
    return mask.reshape(-1).int().cumsum(0).amax().reshape(1, 1) - 1


def flex(q, k, v, mask):
    """merger.generate.attention.flex_decode_attention: FlexAttention's flash-decoding kernel over the
    blocks up to the position."""
    return flex_decode_attention(q, k, v, last_attended(mask), scaling=SCALE)


def triton(chunk: int):
    """merger.generate.attention.triton_decode_attention with `chunk` slots per program:
    merger.generate.kernel over the slots up to the position."""

    def attention(q, k, v, mask):
        return triton_decode_attention(q, k, v, last_attended(mask), scaling=SCALE, chunk=chunk)

    attention.__name__ = f"triton{chunk}"
    return attention


def sdpa_packed(q, k, v, mask):
    g = q.reshape(1, KV_HEADS, GROUPS, HEAD_DIM)
    return F.scaled_dot_product_attention(g, k, v, attn_mask=mask, scale=SCALE).reshape(1, HEADS, 1, HEAD_DIM)


def ideal(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)  # k, v: the positions in use


VARIANTS = {
    f.__name__: f
    for f in (
        transformers_sdpa,
        grouped,
        grouped_matmul,
        split(8),
        split(32),
        split(128),
        flex,
        triton(64),
        triton(256),
        sdpa_packed,
        ideal,
    )
}


def every_layer(attention):
    """One graph: the step's attention over each layer's cache, as a decode step holds it."""

    def step(q, keys, values, mask):
        out = torch.zeros_like(q)
        for k, v in zip(keys, values, strict=True):
            out = out + attention(q, k, v, mask)
        return out

    return step


def device_us(fn, *args, repeats: int = 20) -> tuple[float, float]:
    """(kernel microseconds, wall microseconds) per call over CUDA-graph replays queued back to
    back. Kernel time is the profiler's sum over the kernels that ran, so host overhead (a graph
    that was not captured, launches from Python) shows in the wall time only."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # warm-up, recording
        torch.compiler.cudagraph_mark_step_begin()
        fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.compiler.cudagraph_mark_step_begin()
            fn(*args)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = sum(e.self_device_time_total for e in prof.key_averages())
    return kernels / repeats, wall * 1e6 / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, nargs="+", default=[4096])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # a graph per variant and window
    compiled = {name: torch.compile(every_layer(VARIANTS[name]), **STEP_COMPILE) for name in args.variants}
    weights_us = STEP_WEIGHT_BYTES / copy_bandwidth("cuda", 1 << 30) * 1e6
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights_step_us_at_bound": round(weights_us, 1),
        "windows": [],
    }
    for window in args.windows:
        used = window // 2
        gen = torch.Generator(device="cuda").manual_seed(window)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        shape = (1, KV_HEADS, window, HEAD_DIM)
        keys = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(LAYERS)]
        values = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(LAYERS)]
        mask = torch.zeros(1, 1, 1, window, dtype=torch.bool, device="cuda")
        mask[..., :used] = True
        in_use = ([k[:, :, :used].contiguous() for k in keys], [v[:, :, :used].contiguous() for v in values])
        reference = every_layer(ideal)(q, *in_use, None).float()
        row = {"window": window, "positions_used": used}
        summary["windows"].append(row)
        for name, fn in compiled.items():  # each printed and saved as it ends: compiles are slow
            inputs = (q, *in_use, None) if name == "ideal" else (q, keys, values, mask)
            error = (fn(*inputs).float() - reference).abs().max().item()
            kernel_us, wall_us = device_us(fn, *inputs)
            row[name] = {
                "max_abs_error": round(error, 4),
                "kernel_us_per_layer": round(kernel_us / LAYERS, 2),
                "wall_us_per_layer": round(wall_us / LAYERS, 2),
                "share_of_step": round(kernel_us / weights_us, 3),
            }
            print(window, name, row[name], flush=True)
            summary["cudagraph_skips"] = dict(torch._dynamo.utils.counters["inductor"])
            (args.out / "decode_attention.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
