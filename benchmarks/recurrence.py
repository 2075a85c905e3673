"""Top duplication suggestions and the recurrence sweep of the best one, for the bundled models.

For each model: rank every 2-8-layer block to duplicate (by measured drift, the page's default, or
by predicted damage), build the top five and measure their perplexity on the held-out text beside
the parent's; then run the best of them (lowest perplexity) k = 1..8 times in a row and print the
perplexity and the summed predicted seam damage for every k. Every merge shares its parent's tensors.

    python benchmarks/recurrence.py [--models smol,gemma] [--rank-by drift|predicted] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.lens.search import recurrence_sweep, suggest_duplications
from merger.runtime.builds import build_for_lens
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

MODELS = {"smol": "bundled:smollm2-135m-instruct", "gemma": "bundled:gemma3-270m"}


def measure(ref: str, *, rank_by: str, tokens: int, max_repeats: int) -> dict:
    start = time.perf_counter()
    found = suggest_duplications(
        ref, rank_by=rank_by, max_tokens=tokens, top_k=5, resolver=ANY_PATH, build=build_for_lens
    )
    best = min(found.confirmed, key=lambda s: s.perplexity)
    points = recurrence_sweep(
        ref,
        best.start,
        best.end,
        max_repeats=max_repeats,
        lens=found.lens,
        max_tokens=tokens,
        resolver=ANY_PATH,
        build=build_for_lens,
    )
    print(
        f"\n{ref}: {found.num_layers} layers; parent perplexity {found.parent_perplexity:.2f} "
        f"on {found.heldout_tokens:,} held-out tokens; ranked by {rank_by}"
    )
    print("  suggestion   predicted   drift    perplexity")
    for s in found.confirmed:
        drift = "" if s.drift is None else f"{s.drift:.4f}"
        print(f"  {s.label:<11}  {s.predicted:.4f}    {drift:<7}  {s.perplexity:.2f}")
    print(f"  recurrence sweep of {best.label} (x1 = the parent):")
    for p in points:
        print(
            f"    x{p.repeats}: {p.num_layers} layers, perplexity {p.perplexity:.2f}, "
            f"predicted damage {p.predicted:.4f}"
        )
    print(f"  ({time.perf_counter() - start:.0f} s)")
    return {
        "model": ref,
        "parent_perplexity": found.parent_perplexity,
        "heldout_tokens": found.heldout_tokens,
        "rank_by": rank_by,
        "top5": [
            {"block": [s.start, s.end], "predicted": s.predicted, "drift": s.drift, "perplexity": s.perplexity}
            for s in found.confirmed
        ],
        "sweep": [
            {"repeats": p.repeats, "layers": p.num_layers, "perplexity": p.perplexity, "predicted": p.predicted}
            for p in points
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smol,gemma")
    parser.add_argument("--rank-by", choices=["drift", "predicted"], default="drift")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out (and calibration) tokens")
    parser.add_argument("--max-repeats", type=int, default=8)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = [
        measure(MODELS[name], rank_by=args.rank_by, tokens=args.tokens, max_repeats=args.max_repeats)
        for name in args.models.split(",")
    ]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
