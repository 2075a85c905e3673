"""Do seam scores predict what duplicating a block does to a model?

For every 2-8-layer block [a, b) of SmolLM2-135M-Instruct and Gemma-3-270M: the predicted damage
d(x_b, x_a) from the lens on assets/calibration.txt, and the perplexity of the merge
[0, b) + [a, L) on assets/heldout.txt. Reports Spearman's ρ between each predictor and perplexity
(ranks, ties averaged; no scipy), and whether the five best-predicted blocks fall in the best
quartile by perplexity. Predictors, side by side:
    predicted        d(x_b, x_a) on the calibration text (the lens alone, no merge is run)
    measured_seam    the merge's stream arriving at the seam vs what layer a received in the
                     parent, on the held-out text (for a duplication this is d(x_b, x_a) there)
    measured_mean    the same distance averaged over every depth from the seam to the top
    measured_output  the merge's stream leaving the stack vs the parent's, before the final norm
    predicted_x_rest predicted x (L − a) / L: the seam weighted by the share of the stack that
                     still has to run on the displaced stream (a cheap lens-only combination)

Speed, on 2 CPU cores: a duplication's first b layers are the parent's own, so the merge's
stream entering depth b is the parent's x_b bit for bit. Each candidate therefore runs only the
tail model [a, L) (built from its plan like any merge: parent tensors, layer_types in recipe
order) on the parent's cached x_b. The five best-predicted merges are also built whole by
`suggest_duplications` (make_plan + assemble), and their perplexities are printed beside the
tail-path ones as a check.

Threads: one by default. On a 2-core machine shared with other processes, two OpenMP threads
made small elementwise ops ~200x slower (barrier spinning on a busy core) and a forward pass 2-10x
slower than one thread did.

    python benchmarks/seams.py [--tokens 512] [--calibration-tokens 2048] [--models smol,gemma]
                               [--threads 1] [--out FILE]

Prints a summary, then JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from merger.assemble import assemble
from merger.lens import (
    CALIBRATION_TEXT,
    HELDOUT_TEXT,
    ResidualRecorder,
    capture,
    load_model,
    next_token_loss,
    rank_duplications,
    read_text,
    suggest_duplications,
    token_angles,
    tokenize,
)
from merger.plan import make_plan
from merger.recipe import passthrough

MODELS = {"smol": "bundled:smollm2-135m-instruct", "gemma": "bundled:gemma3-270m"}
PREDICTORS = ("predicted", "measured_seam", "measured_mean", "measured_output", "predicted_x_rest")


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


def sweep(ref: str, args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    parent = load_model(ref, device="cpu")
    L = parent.model.config.num_hidden_layers
    calib = tokenize(
        parent.tokenizer, read_text(CALIBRATION_TEXT), max_tokens=args.calibration_tokens, source="calibration"
    )
    held = tokenize(parent.tokenizer, read_text(HELDOUT_TEXT), max_tokens=args.tokens, source="heldout")
    lens = capture(parent.model, calib, name=ref, batch_size=args.batch_size)
    t_lens = time.perf_counter() - t_start

    # the parent's stream at every point for every held-out batch, BOS rows kept: tails start from it
    batches = list(held.batches(args.batch_size))
    cached, parent_loss, parent_count = [], 0.0, 0
    with torch.inference_mode(), ResidualRecorder(parent.model) as rec:
        for ids in batches:
            loss, n = next_token_loss(parent.model(input_ids=ids, use_cache=False).logits, ids, held.prefix_len)
            parent_loss, parent_count = parent_loss + loss, parent_count + n
            cached.append(rec.take())  # [B*T, L+1, H]
    parent_ppl = math.exp(parent_loss / parent_count)
    del parent.model

    rows = []
    for a in range(L - 1):
        ends = [b for b in range(a + args.min_size, min(a + args.max_size, L) + 1)]
        if not ends:
            continue
        tail = assemble(make_plan(passthrough((ref, a, L))), device="cpu")  # parent layers a..L-1
        for b in ends:
            loss_sum, count = 0.0, 0
            dist = torch.zeros(L - a + 1, dtype=torch.float64)  # per tail point: vs parent point a + j
            n_text = 0
            with torch.inference_mode(), ResidualRecorder(tail) as rec:
                for ids, points in zip(batches, cached, strict=True):
                    B, T = ids.shape
                    x_b = points[:, b].unflatten(0, (B, T)).contiguous()  # [B, T, H]: the stream at depth b
                    logits = tail(inputs_embeds=x_b, use_cache=False).logits
                    loss, n = next_token_loss(logits, ids, held.prefix_len)
                    loss_sum, count = loss_sum + loss, count + n
                    here = rec.take()
                    text_rows = (torch.arange(T) >= held.prefix_len).repeat(B)  # BOS rows are not text
                    for j in range(L - a + 1):
                        dist[j] += token_angles(here[text_rows, j], points[text_rows, a + j]).sum()
                    n_text += int(text_rows.sum())
            dist /= n_text
            predicted = float(lens.angular_distance[b, a])
            rows.append(
                {
                    "block": [a, b],
                    "perplexity": math.exp(loss_sum / count),
                    "predicted": predicted,
                    "measured_seam": float(dist[0]),
                    "measured_mean": float(dist[:-1].mean()),
                    "measured_output": float(dist[-1]),
                    "predicted_x_rest": predicted * (L - a) / L,
                }
            )
        del tail
        print(f"  {ref}: blocks starting at {a} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    ppl = [r["perplexity"] for r in rows]
    rho = {p: round(spearman([r[p] for r in rows], ppl), 3) for p in PREDICTORS}
    ppl_rank = dict(zip((tuple(r["block"]) for r in rows), ranks(ppl), strict=True))
    quartile = len(rows) / 4
    top5 = [(s.start, s.end) for s in rank_duplications(lens, min_size=args.min_size, max_size=args.max_size)[:5]]
    by_block = {tuple(r["block"]): r for r in rows}

    # the check: the five best-predicted merges built whole, their perplexity measured for real
    t_check = time.perf_counter()
    sugg = suggest_duplications(
        ref, lens=lens, heldout=read_text(HELDOUT_TEXT), max_tokens=args.tokens, top_k=5, device="cpu"
    )
    check = [
        {
            "block": [s.start, s.end],
            "predicted": s.predicted,
            "perplexity_assembled": s.perplexity,
            "perplexity_tail_path": by_block[(s.start, s.end)]["perplexity"],
            "perplexity_rank": ppl_rank[(s.start, s.end)],
            "in_best_quartile": ppl_rank[(s.start, s.end)] <= quartile,
        }
        for s in sugg.confirmed
    ]
    assert [tuple(c["block"]) for c in check] == top5
    return {
        "model": ref,
        "num_layers": L,
        "candidates": len(rows),
        "calibration_tokens": calib.num_tokens,
        "heldout_tokens": held.num_tokens,
        "parent_perplexity": parent_ppl,
        "parent_perplexity_assembled_path": sugg.parent_perplexity,
        "spearman_vs_perplexity": rho,
        "top5_by_predicted": check,
        "top5_in_best_quartile": sum(c["in_best_quartile"] for c in check),
        "best5_by_perplexity": sorted(rows, key=lambda r: r["perplexity"])[:5],
        "max_rel_diff_tail_vs_assembled": max(
            abs(c["perplexity_tail_path"] - c["perplexity_assembled"]) / c["perplexity_assembled"] for c in check
        ),
        "seconds": {
            "lens": round(t_lens, 1),
            "sweep": round(t_check - t_start - t_lens, 1),
            "check": round(time.perf_counter() - t_check, 1),
        },
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens per model")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=8)
    parser.add_argument("--models", default="smol,gemma")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    results = [sweep(MODELS[name], args) for name in args.models.split(",")]
    for r in results:
        head = f"{r['model']}: {r['candidates']} blocks, {r['heldout_tokens']} held-out tokens"
        print(f"\n{head}, parent perplexity {r['parent_perplexity']:.2f}")
        print(
            "  Spearman ρ vs perplexity: " + ", ".join(f"{k} {v:+.3f}" for k, v in r["spearman_vs_perplexity"].items())
        )
        print(f"  top five by predicted damage ({r['top5_in_best_quartile']}/5 in the best quartile):")
        for c in r["top5_by_predicted"]:
            print(
                f"    [{c['block'][0]:2d}, {c['block'][1]:2d})  predicted {c['predicted']:.4f}  "
                f"perplexity {c['perplexity_assembled']:.2f} (tail path {c['perplexity_tail_path']:.2f})  "
                f"rank {c['perplexity_rank']:.0f}/{r['candidates']}"
            )
        best = ", ".join(f"[{b['block'][0]}, {b['block'][1]}) {b['perplexity']:.2f}" for b in r["best5_by_perplexity"])
        print(f"  best five by perplexity: {best}")
    summary = {"seconds_total": round(time.perf_counter() - started, 1), "models": results}
    text = json.dumps(summary, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({**summary, "models": [{k: v for k, v in r.items() if k != "rows"} for r in results]}, indent=1))


if __name__ == "__main__":
    main()
