"""Drives mergekit 0.1.5 offline for the equivalence tests: every job in one child process (its
import alone takes seconds), and reads back what a tool wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# Runs every job in one process: {out_dir: mergekit config} on stdin, {out_dir: error or null}
# written to argv[1] (mergekit logs on stdout/stderr); argv[2] is this folder, argv[3] "fixed" to
# fix the random draws; LoRA references are merged into argv[4].
MERGEKIT_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[2])
if sys.argv[3] == "fixed":
    from mergekit_runner import fix_random_draws
    fix_random_draws()
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
results = {}
for out, config in json.load(sys.stdin).items():
    try:
        options = MergeOptions(copy_tokenizer=True, quiet=True, lora_merge_cache=sys.argv[4])
        run_merge(MergeConfiguration.model_validate(config), out, options)
        results[out] = None
    except Exception as exc:
        results[out] = f"{type(exc).__name__}: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


def fix_random_draws() -> None:
    """Make every `torch.bernoulli` draw from a generator seeded 0 at each call, whatever
    generator it is given: mergekit (which draws DARE's and DELLA's masks unseeded) and this app
    (which seeds them per tensor) then draw one and the same mask from equal probabilities, so a
    comparison checks everything about a random method but the randomness."""
    original = torch.bernoulli

    def bernoulli(probabilities: torch.Tensor, *args: object, generator: object = None) -> torch.Tensor:
        return original(probabilities, generator=torch.Generator().manual_seed(0))

    torch.bernoulli = bernoulli


def run_mergekit(
    configs: dict[str, dict], root: Path, *, fixed_draws: bool = False
) -> dict[str, tuple[Path, str | None]]:
    """name -> (mergekit's output folder under `root`, its error or None); with `fixed_draws`,
    under `fix_random_draws`."""
    jobs = {str(root / name): config for name, config in configs.items()}
    mode = "fixed" if fixed_draws else "random"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MERGEKIT_DRIVER,
            str(root / "results.json"),
            str(Path(__file__).parent),
            mode,
            str(root / "lora-merged"),
        ],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {name: (root / name, results[str(root / name)]) for name in configs}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found |= load_file(shard)
    return found
