"""The lens's cost: its residual capture against a plain forward pass of the same model on the same
tokens (goal: capture / plain <= 1.2), and, with --suggest, Suggest's whole run (every 2-8-layer
block ranked by measured drift, the best five confirmed by perplexity) with the time of each part.

The lens runs the decoder stack without the head (it needs no logits), so the like-for-like
baseline is `model.model(ids)`; the full forward with logits is reported beside it. On the CPU the
passes are interleaved batch by batch, their order rotating, so that load from other processes on
a shared machine falls on all of them alike; on a GPU each is timed whole (three times, the median).

    python benchmarks/lens.py [--model REF | --random-llama3-8b DIR] [--device cpu|cuda]
                              [--tokens 4096] [--batch-size 2] [--threads N] [--suggest] [--out FILE]
                              [--hub-bf16 DIR] [--by-dtype]

SmolLM2-135M-Instruct on assets/calibration.txt by default; --random-llama3-8b runs a random
Llama-3-8B-shaped parent (written to DIR if it is not there, with a tokenizer whose every id is a
word) on random words; --hub-bf16 runs on a bf16 copy of the model (weights and config), as the Hub
holds SmolLM2, and --by-dtype also times the whole Suggest in float32 and in bf16, one after the
other (`lens_dtype` picks between them on the CPU: bf16 where the CPU has bf16 dot-product
instructions). Prints JSON (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from merger.lens.capture import (
    CALIBRATION_TEXT,
    DRIFT_TOKENS,
    PairStats,
    ResidualRecorder,
    TokenChunks,
    capture,
    read_text,
    tokenize,
)
from merger.lens.search import Suggestions, drift_work, load_model, suggest_duplications
from merger.runtime.builds import build, build_for_lens
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

SMOL = "bundled:smollm2-135m-instruct"
SUGGEST_GOAL_S = {"cuda": 10.0, "cpu": 30.0}  # issue 19: an 8B on the H200, SmolLM2 on the 2-core CPU


def random_parent(folder: Path) -> str:
    """A random Llama-3-8B-shaped bf16 parent in `folder` (written unless there), with a word tokenizer."""
    from benchmarks.generation import LLAMA3_8B_SHAPE, word_tokenizer, write_parent

    if not (folder / "config.json").is_file():
        write_parent(folder, LLAMA3_8B_SHAPE, "cuda" if torch.cuda.is_available() else "cpu")
    if not (folder / "tokenizer.json").is_file():
        word_tokenizer(LLAMA3_8B_SHAPE["vocab_size"]).save_pretrained(folder)
    return str(folder)


def hub_bf16_copy(ref: str, folder: Path) -> Path:
    """`ref` (a bundled or local model) saved in bf16, weights and config, unless `folder` has it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        source = ANY_PATH(ref).local_dir
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def time_passes(model, chunks: TokenChunks, batch_size: int, device: str) -> dict[str, Any]:
    """Capture against plain passes over `chunks`: per batch interleaved on the CPU, whole on a GPU."""
    per_batch, start = [], 0  # one TokenChunks per batch, so every pass sees exactly the same [B, T] ids
    for ids in chunks.batches(batch_size):
        per_batch.append(TokenChunks(chunks.chunks[start : start + len(ids)], chunks.prefix_len, chunks.source))
        start += len(ids)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def plain_stack(subs: list[TokenChunks]) -> None:
        with torch.inference_mode():
            for sub in subs:
                model.model(input_ids=next(sub.batches(batch_size)).to(device), use_cache=False)

    def plain_logits(subs: list[TokenChunks]) -> None:
        with torch.inference_mode():
            for sub in subs:
                model(input_ids=next(sub.batches(batch_size)).to(device), use_cache=False)

    def lens(subs: list[TokenChunks]) -> None:
        whole = TokenChunks(tuple(c for sub in subs for c in sub.chunks), chunks.prefix_len, chunks.source)
        capture(model, whole, batch_size=batch_size)

    passes = {"plain_stack": plain_stack, "capture": lens, "plain_with_logits": plain_logits}
    for fn in passes.values():  # warm-up
        fn(per_batch[:1])
    sync()
    seconds = dict.fromkeys(passes, 0.0)
    names = list(passes)
    if device == "cuda":
        runs: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(3):
            for name, fn in passes.items():
                t0 = time.perf_counter()
                fn(per_batch)
                sync()
                runs[name].append(time.perf_counter() - t0)
        seconds = {name: statistics.median(times) for name, times in runs.items()}
        ratios = [c / p for c, p in zip(runs["capture"], runs["plain_stack"], strict=True)]
    else:
        ratios = []  # capture / plain stack per batch: two passes seconds apart, under the same load
        for i, sub in enumerate(per_batch):
            here = {}
            for name in names[i % 3 :] + names[: i % 3]:
                t0 = time.perf_counter()
                passes[name]([sub])
                sync()
                here[name] = time.perf_counter() - t0
                seconds[name] += here[name]
            ratios.append(here["capture"] / here["plain_stack"])

    # what the capture adds, timed alone on the first batch: hooks' copies, then the reduction
    with torch.inference_mode(), ResidualRecorder(model, skip=chunks.prefix_len) as rec:
        sync()
        t0 = time.perf_counter()
        model.model(input_ids=next(per_batch[0].batches(batch_size)).to(device), use_cache=False)
        points = rec.take()
        sync()
        hooked = time.perf_counter() - t0
    stats = PairStats([points.shape[1]], device=points.device)
    t0 = time.perf_counter()
    stats.add([points])
    sync()
    reduce_s = time.perf_counter() - t0
    return {
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "capture_over_plain_stack": round(seconds["capture"] / seconds["plain_stack"], 3),
        "capture_over_plain_with_logits": round(seconds["capture"] / seconds["plain_with_logits"], 3),
        "median_ratio_over_plain_stack": round(statistics.median(ratios), 3),
        "batches": len(per_batch),
        "capture_tokens_per_s": round(chunks.num_tokens / seconds["capture"], 1),
        "first_batch": {"hooked_forward_s": round(hooked, 4), "reduction_s": round(reduce_s, 4)},
    }


def time_suggest(
    ref: str, device: str, texts: dict[str, str | None], build=build_for_lens, **options
) -> dict[str, Any]:
    """Suggest as the page runs it (drift ranking, five confirmed; `build`: the page's lens build),
    with when each part began; `options`: suggest_duplications's token counts."""
    parts: dict[str, float] = {}
    start = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        what = message.split(" · ")[0].split(" [")[0].split(",")[0]
        parts.setdefault(what, round(time.perf_counter() - start, 2))

    found = suggest_duplications(
        ref, resolver=ANY_PATH, build=build, device=device, progress=progress, **texts, **options
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "dtype": found.dtype,
        **options,
        "goal_s": SUGGEST_GOAL_S[device],
        "candidates": len(found.ranked),
        "confirmed": {s.label: round(s.perplexity, 3) for s in found.confirmed},
        "parent_perplexity": round(found.parent_perplexity, 3),
        "heldout_tokens": found.heldout_tokens,
        "calibration_tokens": found.lens.tokens,
        "parts_began_at_s": parts,
        "matmul_tflop": round(suggest_matmul_flop(ref, found, options.get("drift_tokens", DRIFT_TOKENS)) / 1e12, 2),
    }


def suggest_matmul_flop(ref: str, found: Suggestions, drift_tokens: int) -> float:
    """The floating-point operations of a Suggest run's matrix products (a Llama-shaped model's
    projections and, where perplexity is measured, its head; attention's own products, a few
    percent at 256-token chunks, left out): the lens over the calibration text, every candidate's
    tail for its drift, the parent and each confirmed merge's tail over the held-out text."""
    config = ANY_PATH(ref).text_config
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    attention = head_dim * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hidden
    layer, head = 2 * (attention + 3 * hidden * inter), 2 * config["vocab_size"] * hidden
    L = found.num_layers
    blocks = [(s.start, s.end) for s in found.ranked]
    token_layers = found.lens.tokens * L + drift_work(L, drift_tokens, blocks)
    token_layers += found.heldout_tokens * (L + sum(L - s.start for s in found.confirmed))
    return token_layers * layer + found.heldout_tokens * (1 + len(found.confirmed)) * head


def cpu_matmul_gflop_s(dtype: str) -> float:
    """This machine's matrix-product speed in `dtype` on a SmolLM2 MLP's shape (2,048 tokens x 576 x
    1,536), with torch's threads: the best of five runs of ten."""
    a, b = torch.randn(2048, 576, dtype=getattr(torch, dtype)), torch.randn(576, 1536, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 576 * 1536 * 10 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=SMOL)
    parser.add_argument("--random-llama3-8b", type=Path, metavar="DIR", help="a random 8B parent (written if missing)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--suggest", action="store_true", help="also time Suggest")
    parser.add_argument(
        "--hub-bf16",
        type=Path,
        metavar="DIR",
        help="run on a copy of --model in bf16, weights and config, as the Hub holds SmolLM2 (written to DIR)",
    )
    parser.add_argument("--by-dtype", action="store_true", help="also time Suggest in float32 and in bf16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts: dict[str, str | None] = {"calibration": None, "heldout": None}  # the bundled texts
    ref = args.model
    if args.hub_bf16:
        ref = str(hub_bf16_copy(ref, args.hub_bf16))
    if args.random_llama3_8b:
        from benchmarks.generation import words

        ref = random_parent(args.random_llama3_8b)
        texts = {"calibration": words(args.tokens, 11), "heldout": words(args.tokens, 12)}
    start = time.perf_counter()
    built = load_model(ref, resolver=ANY_PATH, build=build_for_lens, device=args.device)
    load_s = time.perf_counter() - start
    text = texts["calibration"] or read_text(CALIBRATION_TEXT)
    chunks = tokenize(built.tokenizer, text, max_tokens=args.tokens, source="calibration")
    result: dict[str, Any] = {
        "model": "random Llama-3-8B shape" if args.random_llama3_8b else ref,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(next(built.model.parameters()).dtype),
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "tokens": chunks.num_tokens,
        "batch_size": args.batch_size,
        "chunk_length": len(chunks.chunks[0]),
        **time_passes(built.model, chunks, args.batch_size, args.device),
    }
    del built
    goals = {"capture_over_plain_stack (<= 1.2)": result["capture_over_plain_stack"]}
    if args.suggest:
        result["suggest"] = time_suggest(ref, args.device, texts)
        goals[f"suggest_s (< {SUGGEST_GOAL_S[args.device]:.0f})"] = result["suggest"]["seconds"]
    if args.suggest and args.device == "cpu":  # its matrix products' time alone at this CPU's best speed
        gflop_s = cpu_matmul_gflop_s(result["suggest"]["dtype"])
        floor_s = result["suggest"]["matmul_tflop"] * 1e3 / gflop_s
        result["cpu_matmul_gflop_s"] = {result["suggest"]["dtype"]: round(gflop_s, 1)}
        result["suggest_floor_s"] = round(floor_s, 1)
        result["suggest_over_floor"] = round(result["suggest"]["seconds"] / floor_s, 2)
    if args.by_dtype:  # the whole run in each dtype, one after the other
        runs: dict[str, Any] = {
            dtype: time_suggest(ref, args.device, texts, build, dtype=dtype) for dtype in ("float32", "bfloat16")
        }
        runs["bfloat16_over_float32"] = round(runs["bfloat16"]["seconds"] / runs["float32"]["seconds"], 2)
        result["suggest_by_dtype"] = runs
    result["goals"] = goals
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
