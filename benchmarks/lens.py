"""Capture overhead: the lens's residual capture against a plain forward pass of the same model on
the same tokens (SmolLM2-135M-Instruct, assets/calibration.txt). Goal: capture / plain <= 1.2.

The lens runs the decoder stack without the head (it needs no logits), so the like-for-like
baseline is `model.model(ids)`; the full forward with logits is reported beside it. The three
passes are interleaved batch by batch, their order rotating, so that load from other processes
on a shared machine falls on all three alike; each pass's time is the sum over batches.

    python benchmarks/lens.py [--tokens 4096] [--batch-size 2] [--device cpu] [--threads N]

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from merger.catalog import LocalPolicy, resolver_for
from merger.lens import (
    CALIBRATION_TEXT,
    PairStats,
    ResidualRecorder,
    TokenChunks,
    capture,
    load_model,
    read_text,
    tokenize,
)

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

SMOL = "bundled:smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    built = load_model(SMOL, device=args.device, resolver=ANY_PATH)
    model = built.model
    chunks = tokenize(built.tokenizer, read_text(CALIBRATION_TEXT), max_tokens=args.tokens, source="calibration")
    # one TokenChunks per batch, so capture and the plain passes see exactly the same [B, T] ids
    per_batch, start = [], 0
    for ids in chunks.batches(args.batch_size):
        per_batch.append(TokenChunks(chunks.chunks[start : start + len(ids)], chunks.prefix_len, chunks.source))
        start += len(ids)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def plain_stack(sub: TokenChunks) -> None:
        with torch.inference_mode():
            model.model(input_ids=next(sub.batches(args.batch_size)).to(args.device), use_cache=False)

    def plain_logits(sub: TokenChunks) -> None:
        with torch.inference_mode():
            model(input_ids=next(sub.batches(args.batch_size)).to(args.device), use_cache=False)

    def lens(sub: TokenChunks) -> None:
        capture(model, sub, batch_size=args.batch_size)

    passes = {"plain_stack": plain_stack, "capture": lens, "plain_with_logits": plain_logits}
    for fn in passes.values():  # warm-up
        fn(per_batch[0])
    sync()
    seconds = dict.fromkeys(passes, 0.0)
    ratios = []  # capture / plain stack per batch: two passes seconds apart, under the same load
    names = list(passes)
    for i, sub in enumerate(per_batch):
        here = {}
        for name in names[i % 3 :] + names[: i % 3]:
            t0 = time.perf_counter()
            passes[name](sub)
            sync()
            here[name] = time.perf_counter() - t0
            seconds[name] += here[name]
        ratios.append(here["capture"] / here["plain_stack"])

    # what the capture adds, timed alone on the first batch: hooks' copies, then the reduction
    points = []
    with torch.inference_mode(), ResidualRecorder(model, skip=chunks.prefix_len) as rec:
        t0 = time.perf_counter()
        model.model(input_ids=next(per_batch[0].batches(args.batch_size)).to(args.device), use_cache=False)
        points.append(rec.take())
        sync()
        hooked = time.perf_counter() - t0
    stats = PairStats([points[0].shape[1]], device=points[0].device)
    t0 = time.perf_counter()
    stats.add(points)
    sync()
    reduce_s = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "model": SMOL,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "tokens": chunks.num_tokens,
                "batch_size": args.batch_size,
                "chunk_length": len(chunks.chunks[0]),
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "capture_over_plain_stack": round(seconds["capture"] / seconds["plain_stack"], 3),
                "capture_over_plain_with_logits": round(seconds["capture"] / seconds["plain_with_logits"], 3),
                "median_batch_ratio_over_plain_stack": round(statistics.median(ratios), 3),
                "batches": len(per_batch),
                "capture_tokens_per_s": round(chunks.num_tokens / seconds["capture"], 1),
                "first_batch": {"hooked_forward_s": round(hooked, 3), "reduction_s": round(reduce_s, 3)},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
