"""Batch-1 matrix products of a decode step against the bandwidth bound: cuBLAS against a Triton GEMV.

A decode step at batch 1 is mostly matrix-vector products (y = W x, W [N, K] bf16): ~90% of an
8B's step on the H200 (README, Benchmarks), where the step stands at ~74% of the bound. This
measures, for each of Llama-3-8B's step shapes (fused q/k/v and gate/up, as the page decodes), the
time per product and the read bandwidth it reaches, through:
- cublas: `torch.mm` as `F.linear` calls it for one row (eager steps; compiled ones before the kernel);
- gemv: `merger.generate.gemv`'s kernel, which the compiled step runs, with the block sizes it
  picks (`config_for`);
- grid_best: the same kernel with the best of a small grid of block sizes and warps (printed);
and each against the measured copy bandwidth (read plus written, as generation.py's bound counts
it). Every product runs over enough distinct weight matrices (as a step's layers are) that none
stays in L2, all launches captured in one CUDA graph, so no launch cost is counted.

    python benchmarks/gemv.py [--out DIR]     (on a CUDA GPU; tests/test_gemv.py checks the kernel)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import copy_bandwidth  # this folder is on the path when run as a script

from merger.generate import gemv

# Llama-3-8B's products per decode step, q/k/v and gate/up fused: name -> (N, K, count per step)
SHAPES = {
    "qkv": (6144, 4096, 32),
    "o": (4096, 4096, 32),
    "gate_up": (28672, 4096, 32),
    "down": (4096, 14336, 32),
    "lm_head": (128256, 4096, 1),
}
ROTATION_BYTES = 2 << 30  # weights cycled through per shape: far past the H200's 50 MB L2
GRID = {"BLOCK_N": (4, 8, 16), "BLOCK_K": (256, 512, 1024), "num_warps": (4, 8)}


def graph_time_s(run, reps: int = 20) -> float:
    """Seconds per replay of a CUDA graph capturing `run` (median of `reps`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure(name: str, n: int, k: int, per_step: int, copy_bw: float) -> dict:
    nbytes = n * k * 2
    count = max(2, ROTATION_BYTES // nbytes)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
    vector = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)

    def cublas() -> None:  # what F.linear runs for a [1, K] input
        for weight in weights:
            torch.mm(vector.view(1, k), weight.t(), out=out.view(1, n))

    def kernel(config: dict[str, int]) -> float:
        def run() -> None:
            for weight in weights:
                gemv.launch(weight, vector, out, config)

        return graph_time_s(run) / count

    expected = F.linear(vector, weights[0])
    picked = gemv.config_for(n, k)
    timings = {"cublas": graph_time_s(cublas) / count, "gemv": kernel(picked)}
    gemv.launch(weights[0], vector, out, picked)
    result: dict = {"N": n, "K": k, "per_step": per_step, "matrices": count, "gemv_config": picked}
    result["gemv_max_abs_error_vs_cublas"] = float((out.float() - expected.float()).abs().max())
    grid = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    timed = sorted((kernel(config), i) for i, config in enumerate(grid))
    timings["grid_best"], result["grid_best_config"] = timed[0][0], grid[timed[0][1]]
    for way, seconds in timings.items():
        result[way] = {
            "us": round(seconds * 1e6, 2),
            "read_tb_s": round(nbytes / seconds / 1e12, 3),
            "of_copy_bandwidth": round(nbytes / seconds / copy_bw, 3),
        }
    result["gemv_over_cublas_speed"] = round(timings["cublas"] / timings["gemv"], 3)
    print(name, json.dumps(result), flush=True)
    weights.clear()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write gemv.json here")
    args = parser.parse_args()
    copy_bw = copy_bandwidth("cuda", 1 << 30)
    data: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_tb_s": round(copy_bw / 1e12, 3)}
    data["shapes"] = {name: measure(name, *shape, copy_bw) for name, shape in SHAPES.items()}
    ways = ("cublas", "gemv", "grid_best")
    data["step_products_us"] = {
        way: round(sum(s[way]["us"] * s["per_step"] for s in data["shapes"].values()), 1) for way in ways
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv.json").write_text(json.dumps(data, indent=2))
    print(json.dumps(data["step_products_us"]))


if __name__ == "__main__":
    main()
