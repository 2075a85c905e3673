"""Blend export time and peak memory against mergekit on the same recipe, side by side.

Writes random Llamas of about 1.5 GB each (bf16, TinyLlama-1.1B's layer shape with 14 layers,
untied head; the others are the first plus a random shift, as a fine-tune would be: one for
slerp, linear and ties, two for della and model_stock), then builds the same recipe over all 14
layers (slerp: `t` a per-layer gradient on attention and 0.5 elsewhere; della: weights 0.6 and
0.4 at density 0.5; model_stock: the base and both fine-tunes) with `python -m merger build` and
with mergekit's `mergekit-yaml` (its defaults), each in a child process after the inputs were read once
(warm page cache). Prints each tool's wall time and peak RSS (the child's ru_maxrss), the ratios
from this one run, the largest difference between the two outputs' tensors, and JSON.

DELLA draws its masks at random (mergekit unseeded, we seeded): for della both tools run under
tests/mergekit_runner.fix_random_draws (one fixed draw per tensor on both sides), so the outputs
can be compared. mergekit then still ranks and rescales bf16 tensors in bf16 where we use
float32, so a few entries near a draw's threshold differ: the share of differing entries is
printed too.

`--threads N` sets OMP_NUM_THREADS=N for both tools. On a small shared machine that matters more
than anything else here: with the other core busy, every parallel elementwise op waits a
scheduler tick for its second thread (measured here: 11 ms per op on 2**20 floats with 2
threads, 0.2 ms with 1).

    python benchmarks/blend.py [--workdir DIR] [--method slerp|linear|ties|della|model_stock] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
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


METHODS = ("slerp", "linear", "ties", "della", "model_stock")
THREE_PARENTS = ("della", "model_stock")  # a base and two fine-tunes
RANDOM_DRAWS = ("della",)
# Runs a command line (a module and its arguments) under fix_random_draws.
FIXED_DRAWS = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
from mergekit_runner import fix_random_draws
fix_random_draws()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def recipe_for(method: str, parents: list[Path], layers: int) -> dict:
    sources = [{"model": str(p), "layer_range": [0, layers]} for p in parents]
    recipe: dict = {"slices": [{"sources": sources}], "merge_method": method, "dtype": "bfloat16"}
    if method == "slerp":
        recipe |= {"base_model": str(parents[0]), "parameters": {"t": SLERP_T}}
    elif method == "linear":
        sources[0]["parameters"], sources[1]["parameters"] = {"weight": 0.7}, {"weight": 0.3}
    elif method == "ties":
        sources[1]["parameters"] = {"weight": 1.0, "density": 0.5}
        recipe["base_model"] = str(parents[0])
    elif method == "della":
        sources[1]["parameters"], sources[2]["parameters"] = {"weight": 0.6}, {"weight": 0.4}
        recipe |= {"base_model": str(parents[0]), "parameters": {"density": 0.5}}
    elif method == "model_stock":
        recipe["base_model"] = str(parents[0])
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


def differences(ours: Path, theirs: Path) -> tuple[float, float]:
    """The largest absolute difference between the two outputs' tensors, and the share of entries
    that differ at all."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()}  # noqa: SIM118

    mine, other = index(ours), index(theirs)
    if sorted(mine) != sorted(other):
        raise RuntimeError(f"different tensor names: {sorted(set(mine) ^ set(other))[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name, file in mine.items():
        with safe_open(file, "pt") as f, safe_open(other[name], "pt") as g:
            x, y = f.get_tensor(name).float(), g.get_tensor(name).float()
        worst = max(worst, (x - y).abs().max().item())
        differing += int((x != y).sum())
        total += x.numel()
    return worst, differing / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the models and outputs go (default: a temp folder)")
    parser.add_argument("--method", default="slerp", choices=METHODS)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both tools (default: torch's choice)")
    args = parser.parse_args()
    if importlib.util.find_spec("mergekit") is None:
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
    parents = [a, shifted_copy(a, work / "b")]
    if method in THREE_PARENTS:
        parents.append(shifted_copy(a, work / "c", seed=2))
    inputs = sorted(f for p in parents for f in p.glob("*.safetensors"))
    sizes = [f"{sum(f.stat().st_size for f in p.glob('*.safetensors')) / 1e9:.2f} GB" for p in parents]
    print(f"parents: {', '.join(sizes)}, made in {time.perf_counter() - t0:.1f} s")
    recipe = work / "recipe.yml"
    recipe.write_text(yaml.safe_dump(recipe_for(method, parents, SHAPE["layers"]), sort_keys=False))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    outs = {"ours": work / "ours", "mergekit": work / "mergekit"}
    tools = {
        "ours": ["merger", "build", str(recipe), str(outs["ours"])],
        "mergekit": ["mergekit.scripts.run_yaml", str(recipe), str(outs["mergekit"]), "--copy-tokenizer"],
    }
    for label, (module, *arguments) in tools.items():
        if method in RANDOM_DRAWS:
            tools[label] = [sys.executable, "-c", FIXED_DRAWS, str(ROOT / "tests"), module, *arguments]
        else:
            tools[label] = [sys.executable, "-m", module, *arguments]
    runs = {}
    for label, cmd in tools.items():
        make_warm(inputs)
        runs[label] = run_child(label, "warm", cmd, env)
        r = runs[label]
        how = f"OMP_NUM_THREADS={threads}" if threads else "default threads"
        print(f"{label:9} {method} export {r.seconds:6.2f} s  peak {r.peak_mib:6.0f} MiB  ({how})", flush=True)
    out_gb = sum(p.stat().st_size for p in outs["ours"].glob("*.safetensors")) / 1e9
    worst, differing = differences(outs["ours"], outs["mergekit"])
    ours, theirs = runs["ours"], runs["mergekit"]
    ratios = {
        "time_mergekit_over_ours": round(theirs.seconds / ours.seconds, 2),
        "peak_mergekit_over_ours": round(theirs.peak_bytes / ours.peak_bytes, 2),
    }
    print(
        f"output {out_gb:.2f} GB; ours is {ratios['time_mergekit_over_ours']:.2f}x mergekit's speed with "
        f"{ratios['peak_mergekit_over_ours']:.2f}x less peak memory (one run each, warm cache); "
        f"largest tensor difference between the outputs: {worst:.3g}, in {differing:.3%} of the entries"
        + (" (both under fixed draws)" if method in RANDOM_DRAWS else "")
    )
    result = {
        "method": method,
        "threads": threads,
        "runs": {k: {"seconds": round(r.seconds, 3), "peak_mib": round(r.peak_mib)} for k, r in runs.items()},
        "ratios": ratios,
        "max_abs_difference": worst,
        "differing_share": differing,
        "fixed_draws": method in RANDOM_DRAWS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
