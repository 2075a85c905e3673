"""Blend export time and peak memory against mergekit on the same two-model recipe, side by side.

Writes two random Llamas of about 1.5 GB each (bf16, TinyLlama-1.1B's layer shape with 14 layers,
untied head; the second is the first plus a random shift, as a fine-tune would be), then builds
the same SLERP recipe (all 14 layers of both, `t` a per-layer gradient on attention and 0.5
elsewhere) with `python -m merger build` and with `mergekit-yaml` (its defaults), each in a child
process after the inputs were read once (warm page cache). Prints each tool's wall time and peak
RSS (the child's ru_maxrss), the ratios from this one run, the largest difference between the two
outputs' tensors, and JSON.

`--threads N` sets OMP_NUM_THREADS=N for both tools. On a small shared machine that matters more
than anything else here: with the other core busy, every parallel elementwise op waits a
scheduler tick for its second thread (measured here: 11 ms per op on 2**20 floats with 2
threads, 0.2 ms with 1).

    python benchmarks/blend.py [--workdir DIR] [--method slerp|linear|ties] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.export_vs_mergekit import BENCH_SHAPE, make_warm, run_child, write_random_llama

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {**BENCH_SHAPE, "layers": 14}  # about 1.5 GB in bf16
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]


def recipe_for(method: str, a: Path, b: Path, layers: int) -> dict:
    sources = [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]
    recipe: dict = {"slices": [{"sources": sources}], "merge_method": method, "dtype": "bfloat16"}
    if method == "slerp":
        recipe |= {"base_model": str(a), "parameters": {"t": SLERP_T}}
    elif method == "linear":
        sources[0]["parameters"], sources[1]["parameters"] = {"weight": 0.7}, {"weight": 0.3}
    elif method == "ties":
        sources[1]["parameters"] = {"weight": 1.0, "density": 0.5}
        recipe["base_model"] = str(a)
    return recipe


def shifted_copy(parent: Path, path: Path, seed: int = 1) -> Path:
    """`parent` plus small random shifts: a stand-in fine-tune of it (same files, same names)."""
    import torch
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for item in parent.iterdir():
        if item.suffix == ".safetensors":
            tensors = load_file(item)
            shifted = {
                n: (t.float() + 0.005 * torch.randn(t.shape, generator=gen)).to(t.dtype) for n, t in tensors.items()
            }
            del tensors
            save_file(shifted, path / item.name, metadata={"format": "pt"})
        else:
            shutil.copyfile(item, path / item.name)
    return path


def max_difference(ours: Path, theirs: Path) -> float:
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()}  # noqa: SIM118

    mine, other = index(ours), index(theirs)
    if sorted(mine) != sorted(other):
        raise RuntimeError(f"different tensor names: {sorted(set(mine) ^ set(other))[:5]}")
    worst = 0.0
    for name, file in mine.items():
        with safe_open(file, "pt") as f, safe_open(other[name], "pt") as g:
            x, y = f.get_tensor(name).float(), g.get_tensor(name).float()
        worst = max(worst, (x - y).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the models and outputs go (default: a temp folder)")
    parser.add_argument("--method", default="slerp", choices=("slerp", "linear", "ties"))
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both tools (default: torch's choice)")
    args = parser.parse_args()
    if shutil.which("mergekit-yaml") is None:
        sys.exit("mergekit is not installed: pip install mergekit==0.1.5")
    work = Path(tempfile.mkdtemp(prefix="blend-bench-", dir=args.workdir))
    try:
        bench(work, args.method, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, method: str, threads: int | None) -> None:
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer

    t0 = time.perf_counter()
    a = write_random_llama(work / "a", **SHAPE)
    tiny_tokenizer(chat=True).save_pretrained(a)
    b = shifted_copy(a, work / "b")
    inputs = sorted([*a.glob("*.safetensors"), *b.glob("*.safetensors")])
    sizes = [sum(p.stat().st_size for p in m.glob("*.safetensors")) / 1e9 for m in (a, b)]
    print(f"parents: {sizes[0]:.2f} GB and {sizes[1]:.2f} GB, made in {time.perf_counter() - t0:.1f} s")
    recipe = work / "recipe.yml"
    recipe.write_text(yaml.safe_dump(recipe_for(method, a, b, SHAPE["layers"]), sort_keys=False))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    outs = {"ours": work / "ours", "mergekit": work / "mergekit"}
    tools = {
        "ours": [sys.executable, "-m", "merger", "build", str(recipe), str(outs["ours"])],
        "mergekit": ["mergekit-yaml", str(recipe), str(outs["mergekit"]), "--copy-tokenizer"],
    }
    runs = {}
    for label, cmd in tools.items():
        make_warm(inputs)
        runs[label] = run_child(label, "warm", cmd, env)
        r = runs[label]
        how = f"OMP_NUM_THREADS={threads}" if threads else "default threads"
        print(f"{label:9} {method} export {r.seconds:6.2f} s  peak {r.peak_mib:6.0f} MiB  ({how})", flush=True)
    out_gb = sum(p.stat().st_size for p in outs["ours"].glob("*.safetensors")) / 1e9
    worst = max_difference(outs["ours"], outs["mergekit"])
    ours, theirs = runs["ours"], runs["mergekit"]
    ratios = {
        "time_mergekit_over_ours": round(theirs.seconds / ours.seconds, 2),
        "peak_mergekit_over_ours": round(theirs.peak_bytes / ours.peak_bytes, 2),
    }
    print(
        f"output {out_gb:.2f} GB; ours is {ratios['time_mergekit_over_ours']:.2f}x mergekit's speed with "
        f"{ratios['peak_mergekit_over_ours']:.2f}x less peak memory (one run each, warm cache); "
        f"largest tensor difference between the outputs: {worst:.3g}"
    )
    result = {
        "method": method,
        "threads": threads,
        "runs": {k: {"seconds": round(r.seconds, 3), "peak_mib": round(r.peak_mib)} for k, r in runs.items()},
        "ratios": ratios,
        "max_abs_difference": worst,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
