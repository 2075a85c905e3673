"""Do seam scores predict what duplicating a block does to a model?

For every 2-8-layer block [a, b) of SmolLM2-135M-Instruct and Gemma-3-270M: predictors computed
on assets/calibration.txt, and the perplexity of the merge [0, b) + [a, L) on assets/heldout.txt.
Reports Spearman's ρ between each predictor and perplexity (ranks, ties averaged; no scipy), and
whether the five best blocks by a predictor fall in the best quartile by perplexity. Predictors:
    predicted        d(x_b, x_a) from the lens (calibration text; no merge is run)
    measured_seam    the merge's stream arriving at the seam vs what layer a received in the
                     parent (merger.lens.search.duplication_drift; for a duplication this is d(x_b, x_a)
                     again, on the first --drift-tokens calibration tokens)
    measured_mean    that distance averaged over every depth from the seam to the top
    measured_output  the merge's stream leaving the stack vs the parent's, before the final norm
                     (the "drift" that suggest_duplications(rank_by="drift") ranks by)
    rank_mean        the mean of a block's ranks under predicted and measured_output
Perplexity never shares text with a predictor.

Speed, on 2 CPU cores: a duplication's first b layers are the parent's own, so the merge's
stream entering depth b is the parent's x_b bit for bit. Each candidate's perplexity therefore
comes from the tail model [a, L) (built from its plan like any merge: parent tensors, layer_types
in recipe order) run on the parent's cached x_b. The five best-predicted merges are also built
whole by `suggest_duplications` (make_plan + assemble); their perplexities are printed beside
the tail-path ones as a check. The two models run in parallel processes (--jobs).

Threads: one per process by default. On a 2-core machine shared with other processes, two OpenMP
threads made small elementwise ops ~200x slower (barrier spinning on a busy core) and a forward
pass 2-10x slower than one thread did.

    python benchmarks/seams.py [--tokens 512] [--calibration-tokens 2048] [--drift-tokens 256]
                               [--models smol,gemma] [--jobs 2] [--threads 1] [--out FILE]

Prints a summary, then JSON (per-block rows only in --out).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from merger.build.assemble import assemble
from merger.lens.capture import CALIBRATION_TEXT, HELDOUT_TEXT, capture, read_text, tokenize
from merger.lens.search import duplication_drift, load_model, next_token_loss, rank_duplications, suggest_duplications
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime.builds import build_for_lens
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

MODELS = {"smol": "bundled:smollm2-135m-instruct", "gemma": "bundled:gemma3-270m"}
PREDICTORS = ("predicted", "measured_seam", "measured_mean", "measured_output", "rank_mean")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def tail_perplexities(ref: str, parent, held, blocks: list[tuple[int, int]], batch_size: int) -> dict:
    """Perplexity on `held` of every duplication merge, from the parent's cached x_b through the
    tail [a, L) and the head."""
    from merger.lens.capture import ResidualRecorder

    L = parent.config.num_hidden_layers
    batches = list(held.batches(batch_size))
    with torch.inference_mode(), ResidualRecorder(parent) as rec:
        cached = []
        for ids in batches:
            parent.model(input_ids=ids, use_cache=False)
            cached.append(rec.take())  # [B*T, L+1, H], BOS rows kept
    out = {}
    for a in sorted({a for a, _ in blocks}):
        tail = assemble(make_plan(passthrough((ref, a, L)), ANY_PATH), device="cpu")  # parent layers a..L-1
        for b in sorted(b for s, b in blocks if s == a):
            total, count = 0.0, 0
            with torch.inference_mode():
                for ids, points in zip(batches, cached, strict=True):
                    x_b = points[:, b].unflatten(0, ids.shape).contiguous()  # [B, T, H]: the stream at depth b
                    loss, n = next_token_loss(tail(inputs_embeds=x_b, use_cache=False).logits, ids, held.prefix_len)
                    total, count = total + loss, count + n
            out[(a, b)] = math.exp(total / count)
        del tail
        print(f"  {ref}: perplexity of blocks starting at {a} done", file=sys.stderr, flush=True)
    return out


def top5(rows: list[dict], key: str, ppl_rank: dict, quartile: float) -> list[dict]:
    best = sorted(rows, key=lambda r: (r[key], r["predicted"]))[:5]
    return [
        {
            "block": r["block"],
            key: r[key],
            "perplexity": r["perplexity"],
            "perplexity_rank": ppl_rank[tuple(r["block"])],
            "in_best_quartile": ppl_rank[tuple(r["block"])] <= quartile,
        }
        for r in best
    ]


def sweep(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ref = MODELS[name]
    t0 = time.perf_counter()
    parent = load_model(ref, device="cpu", resolver=ANY_PATH, build=build_for_lens)
    L = parent.model.config.num_hidden_layers
    calibration = read_text(CALIBRATION_TEXT)
    calib = tokenize(parent.tokenizer, calibration, max_tokens=args.calibration_tokens, source="calibration")
    sample = tokenize(parent.tokenizer, calibration, max_tokens=args.drift_tokens, source="calibration")
    held = tokenize(parent.tokenizer, read_text(HELDOUT_TEXT), max_tokens=args.tokens, source="heldout")
    lens = capture(parent.model, calib, name=ref, batch_size=args.batch_size)
    blocks = [(s.start, s.end) for s in rank_duplications(lens, min_size=args.min_size, max_size=args.max_size)]
    t_lens = time.perf_counter()
    drift = duplication_drift(parent.model, sample, blocks, batch_size=args.batch_size)
    t_drift = time.perf_counter()
    ppl = tail_perplexities(ref, parent.model, held, blocks, args.batch_size)
    t_ppl = time.perf_counter()
    del parent.model

    rows = [
        {
            "block": [a, b],
            "perplexity": ppl[(a, b)],
            "predicted": float(lens.angular_distance[b, a]),
            "measured_seam": drift[(a, b)].seam,
            "measured_mean": drift[(a, b)].mean,
            "measured_output": drift[(a, b)].output,
        }
        for a, b in blocks
    ]
    for row, p, o in zip(
        rows, ranks([r["predicted"] for r in rows]), ranks([r["measured_output"] for r in rows]), strict=True
    ):
        row["rank_mean"] = (p + o) / 2
    perplexities = [r["perplexity"] for r in rows]
    rho = {p: round(spearman([r[p] for r in rows], perplexities), 3) for p in PREDICTORS}
    ppl_rank = dict(zip((tuple(r["block"]) for r in rows), ranks(perplexities), strict=True))
    quartile = len(rows) / 4

    # the check: the five best-predicted merges built whole, their perplexity measured for real
    sugg = suggest_duplications(
        ref,
        lens=lens,
        heldout=read_text(HELDOUT_TEXT),
        max_tokens=args.tokens,
        top_k=5,
        device="cpu",
        rank_by="predicted",
        resolver=ANY_PATH,
        build=build_for_lens,
    )
    by_predicted = top5(rows, "predicted", ppl_rank, quartile)
    assert [tuple(c["block"]) for c in by_predicted] == [(s.start, s.end) for s in sugg.confirmed]
    for c, s in zip(by_predicted, sugg.confirmed, strict=True):
        c["perplexity_assembled"] = s.perplexity
    by_drift = top5(rows, "measured_output", ppl_rank, quartile)
    return {
        "model": ref,
        "num_layers": L,
        "candidates": len(rows),
        "calibration_tokens": calib.num_tokens,
        "drift_tokens": sample.num_tokens,
        "heldout_tokens": held.num_tokens,
        "parent_perplexity": sugg.parent_perplexity,
        "spearman_vs_perplexity": rho,
        "top5_by_predicted": by_predicted,
        "top5_by_predicted_in_best_quartile": sum(c["in_best_quartile"] for c in by_predicted),
        "top5_by_drift": by_drift,
        "top5_by_drift_in_best_quartile": sum(c["in_best_quartile"] for c in by_drift),
        "best5_by_perplexity": [
            {"block": r["block"], "perplexity": r["perplexity"]}
            for r in sorted(rows, key=lambda r: r["perplexity"])[:5]
        ],
        "max_rel_diff_tail_vs_assembled": max(
            abs(c["perplexity"] - c["perplexity_assembled"]) / c["perplexity_assembled"] for c in by_predicted
        ),
        "seconds": {
            "lens": round(t_lens - t0, 1),
            "drift": round(t_drift - t_lens, 1),
            "perplexity_sweep": round(t_ppl - t_drift, 1),
            "assembled_check": round(time.perf_counter() - t_ppl, 1),
        },
        "rows": rows,
    }


def report(r: dict) -> None:
    head = f"{r['model']}: {r['candidates']} blocks, {r['heldout_tokens']} held-out tokens"
    print(f"\n{head}, parent perplexity {r['parent_perplexity']:.2f}")
    print("  Spearman ρ vs perplexity: " + ", ".join(f"{k} {v:+.3f}" for k, v in r["spearman_vs_perplexity"].items()))
    print(f"  top five by predicted damage ({r['top5_by_predicted_in_best_quartile']}/5 in the best quartile):")
    for c in r["top5_by_predicted"]:
        print(
            f"    [{c['block'][0]:2d}, {c['block'][1]:2d})  predicted {c['predicted']:.4f}  "
            f"perplexity {c['perplexity_assembled']:.2f} (tail path {c['perplexity']:.2f})  "
            f"rank {c['perplexity_rank']:.0f}/{r['candidates']}"
        )
    print(f"  top five by measured output drift ({r['top5_by_drift_in_best_quartile']}/5 in the best quartile):")
    for c in r["top5_by_drift"]:
        print(
            f"    [{c['block'][0]:2d}, {c['block'][1]:2d})  drift {c['measured_output']:.4f}  "
            f"perplexity {c['perplexity']:.2f}  rank {c['perplexity_rank']:.0f}/{r['candidates']}"
        )
    best = ", ".join(f"[{b['block'][0]}, {b['block'][1]}) {b['perplexity']:.2f}" for b in r["best5_by_perplexity"])
    print(f"  best five by perplexity: {best}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens per model")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--drift-tokens", type=int, default=256, help="calibration tokens for the measured drift")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=8)
    parser.add_argument("--models", default="smol,gemma")
    parser.add_argument("--jobs", type=int, default=2, help="models measured at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (see the docstring)")
    parser.add_argument("--out", help="also write the JSON, with every block's row, here")
    args = parser.parse_args()

    started = time.perf_counter()
    names = args.models.split(",")
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(names)), mp_context=context) as pool:
        results = list(pool.map(sweep, names, [args] * len(names)))
    for r in results:
        report(r)
    summary = {"seconds_total": round(time.perf_counter() - started, 1), "models": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({**summary, "models": [{k: v for k, v in r.items() if k != "rows"} for r in results]}, indent=1))


if __name__ == "__main__":
    main()
