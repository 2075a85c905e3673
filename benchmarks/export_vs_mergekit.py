"""Export speed and memory against mergekit on the same passthrough recipe, side by side.

Writes a random Llama of about 1.7 GB (bf16 tensors written directly with safetensors, untied
head, two shards, a small tokenizer), then builds [0,12) + [4,16) (8 duplicated layers, about
2.4 GB out) with `python -m merger build`, `mergekit-yaml` with its defaults, and `mergekit-yaml
--clone-tensors --out-shard-size 500M`, each in a child process, with a cold and a warm page
cache. Also times two byte-copy floors: the same number of bytes copied from the parent's files
with a plain read/write loop and with the kernel's copy_file_range (the faster one counts).
Prints the best wall time and peak RSS (the child's ru_maxrss) per run, then ratios and JSON.

Cold means `echo 1 > /proc/sys/vm/drop_caches` after a `sync` when permitted (it also evicts the
tools' own libraries, as after a reboot), else `posix_fadvise(POSIX_FADV_DONTNEED)` on the input
files only; the output says which.

    python benchmarks/export_vs_mergekit.py [--workdir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.recipe import passthrough

ROOT = Path(__file__).resolve().parent.parent

# TinyLlama-1.1B's layer shape with 16 layers: 1.7 GB in bf16.
BENCH_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, layers=16, heads=32, kv_heads=4, tied=False
)
RANGES = ((0, 12), (4, 16))
GOALS = {"vs_mergekit_default": 4.0, "vs_mergekit_best": 2.0, "vs_floor": 1.5, "peak_mib": 300}


def write_random_llama(
    path: Path,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    tied: bool,
    seed: int = 0,
    shard_bytes: int = 10**9,
) -> Path:
    """A Llama checkpoint of random bf16 tensors (std 0.02), sharded with an index past
    `shard_bytes`; no transformers model is built, so any size is quick to make."""
    import torch
    from safetensors.torch import save_file

    head_dim = hidden_size // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden_size,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": (hidden_size, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden_size,),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
        }
    shapes["model.norm.weight"] = (hidden_size,)
    if not tied:
        shapes["lm_head.weight"] = (vocab_size, hidden_size)

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensor = 0.02 * torch.randn(shape, generator=gen)
        tensor = tensor.to(torch.bfloat16)
        if groups[-1] and size + tensor.nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += tensor.nbytes
    if len(groups) == 1:
        save_file(groups[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, path / shard, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(group, shard)
        total = sum(t.nbytes for g in groups for t in g.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@dataclass
class Run:
    label: str
    cache: str
    seconds: float
    peak_bytes: int

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


# A child's ru_maxrss starts at the high-water mark of the process it was exec'd from, so each
# tool runs under this small launcher rather than straight from the (large) benchmark process.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": seconds, "maxrss_kib": usage.ru_maxrss}, f)
"""

# The floors: the output's number of bytes copied from the parent's files, cycling through them,
# with a plain read/write loop (16 MiB buffer) and with the kernel's copy_file_range.
FLOOR_SCRIPT = """
import os, sys
mode, total, out, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
buf = memoryview(bytearray(16 * 2**20))
left = total
with open(out, "wb", buffering=0) as dst:
    while left:
        for name in files:
            with open(name, "rb", buffering=0) as src:
                pos, size = 0, os.fstat(src.fileno()).st_size
                while left and pos < size:
                    if mode == "kernel":
                        n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, size - pos), pos)
                    else:
                        n = src.readinto(buf[: min(len(buf), left)])
                        dst.write(buf[:n])
                    pos += n
                    left -= n
"""


def run_child(label: str, cache: str, cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of one child process, measured by the launcher."""
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        with open(log, "wb") as out:
            subprocess.run(
                [sys.executable, "-c", LAUNCHER, str(result), *cmd], cwd=ROOT, stdout=out, stderr=out, env=env
            )
        measured = json.loads(result.read_text())
        if measured["rc"] != 0:
            raise RuntimeError(f"{label} failed ({measured['rc']}):\n{log.read_text()[-3000:]}")
    return Run(label, cache, measured["seconds"], measured["maxrss_kib"] * 1024)  # KiB on Linux


def make_cold(inputs: list[Path]) -> str:
    """Evict the inputs from the page cache; returns how."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for path in inputs:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise(DONTNEED) on inputs"


def make_warm(inputs: list[Path]) -> str:
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass
    return "inputs read first"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the model and outputs go (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool and cache state; the best counts")
    args = parser.parse_args()
    if shutil.which("mergekit-yaml") is None:
        sys.exit("mergekit is not installed: pip install mergekit==0.1.5")
    work = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.workdir))
    try:
        bench(work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, repeats: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer

    t0 = time.perf_counter()
    parent = write_random_llama(work / "parent", **BENCH_SHAPE)
    tiny_tokenizer(chat=True).save_pretrained(parent)
    inputs = sorted(parent.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in inputs)
    print(f"parent: {size / 1e9:.2f} GB in {len(inputs)} file(s), made in {time.perf_counter() - t0:.1f} s")
    recipe = work / "recipe.yml"
    recipe.write_text(passthrough(*((str(parent), a, b) for a, b in RANGES)).to_yaml())
    out, floor = work / "out", work / "floor.bin"
    out_bytes = 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    mergekit = ["mergekit-yaml", str(recipe), str(out), "--copy-tokenizer"]
    tools: dict[str, list[str]] = {
        "ours": [sys.executable, "-m", "merger", "build", str(recipe), str(out)],
        "mergekit default": mergekit,
        "mergekit best": [*mergekit, "--clone-tensors", "--out-shard-size", "500M"],
    }
    floors = ("floor read/write", "floor kernel copy")
    print(f"best of {repeats} run(s) each; a sync before every run, outside the timing", flush=True)
    runs: list[Run] = []
    for cache in ("cold", "warm"):
        for label in (*tools, *floors):
            best = None
            for _ in range(repeats):
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                how = make_cold(inputs) if cache == "cold" else make_warm(inputs)
                if label in tools:
                    cmd = tools[label]
                else:
                    mode = "kernel" if label == floors[1] else "plain"
                    cmd = [sys.executable, "-c", FLOOR_SCRIPT, mode, str(out_bytes), str(floor), *map(str, inputs)]
                run = run_child(label, cache, cmd, env)
                floor.unlink(missing_ok=True)
                if label == "ours":
                    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                best = run if best is None or run.seconds < best.seconds else best
            runs.append(best)
            print(f"{cache:4} {label:17} {best.seconds:6.2f} s  peak {best.peak_mib:6.0f} MiB  ({how})", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"output: {out_bytes / 1e9:.2f} GB of safetensors")

    summary = {}
    for cache in ("cold", "warm"):
        by = {r.label: r for r in runs if r.cache == cache}
        ours = by["ours"]
        floor = min(by[f].seconds for f in floors)
        ratios = {
            "vs_mergekit_default": round(by["mergekit default"].seconds / ours.seconds, 2),
            "vs_mergekit_best": round(by["mergekit best"].seconds / ours.seconds, 2),
            "vs_floor": round(ours.seconds / floor, 2),
            "peak_mib": round(ours.peak_mib),
            "mergekit_default_peak_mib": round(by["mergekit default"].peak_mib),
            "mergekit_best_peak_mib": round(by["mergekit best"].peak_mib),
        }
        summary[cache] = ratios
        print(
            f"{cache}: {ratios['vs_mergekit_default']:.1f}x faster than mergekit defaults (goal >= 4), "
            f"{ratios['vs_mergekit_best']:.1f}x faster than its best flags (goal >= 2), "
            f"{ratios['vs_floor']:.2f}x the faster byte-copy floor (goal <= 1.5), "
            f"peak {ratios['peak_mib']} MiB (goal < 300; mergekit {ratios['mergekit_default_peak_mib']} / "
            f"{ratios['mergekit_best_peak_mib']} MiB)"
        )
    runs_json = [{**r.__dict__, "seconds": round(r.seconds, 3), "peak_mib": round(r.peak_mib)} for r in runs]
    print(json.dumps({"runs": runs_json, "ratios": summary, "goals": GOALS}))


if __name__ == "__main__":
    main()
