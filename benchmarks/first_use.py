"""What a GPU process's first calls cost, where the first reply after its first build pays them.

On the H200 the parent's first reply after its build, the process's first, takes seconds longer
than the merge's after the next build (README, Benchmarks): library code loaded on first use and
per-shape plans. This times, in one fresh process, each kind of call the first reply makes,
first and again: a bf16 product of a prompt's rows (cuBLAS), a bf16 causal attention of a prompt
(SDPA with its default backends and with each one alone) at prompt lengths not seen before, and a
CUDA graph's capture. Llama-3-8B's shapes (32 heads of 128, hidden size 4096).

    python benchmarks/first_use.py [--out DIR]     (on a CUDA GPU, in a process that has not used it)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM, HIDDEN = 32, 128, 4096
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def timed_ms(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) * 1e3, 2)


def attention(length: int, backend: SDPBackend | None) -> Callable[[], object]:
    q, k, v = torch.randn(3, 1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def call() -> object:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["first_cuda_tensor_ms"] = timed_ms(lambda: torch.ones(1, device="cuda"))
    weight = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16)
    products = {}
    for rows in (40, 40, 41, 512, 1):  # the first, again, then prompt lengths not seen before
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        products.setdefault(str(rows), []).append(timed_ms(lambda x=x: F.linear(x, weight)))
    result["linear_ms_by_rows"] = products
    # the default first (as the page's prefill runs it), then each backend alone, each at lengths
    # of its own so that none meets a shape another one planned
    lengths = iter(range(40, 10_000, 7))
    sdpa: dict[str, dict[str, list[float]]] = {}
    for name, backend in {"default": None, **BACKENDS}.items():
        runs: dict[str, list[float]] = {}
        for _ in range(3):
            length = next(lengths)
            call = attention(length, backend)
            try:
                runs[str(length)] = [timed_ms(call), timed_ms(call)]
            except RuntimeError as exc:
                runs[str(length)] = [str(exc).splitlines()[0]]
        sdpa[name] = runs
        print(name, runs, flush=True)
    result["sdpa_causal_ms_first_and_again_by_length"] = sdpa

    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        F.linear(x, weight)  # warm on the side stream, as a capture wants

    def capture() -> None:
        with torch.cuda.graph(graph, stream=stream):
            F.linear(x, weight)

    result["first_graph_capture_ms"] = timed_ms(capture)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first-use.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
