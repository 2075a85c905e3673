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
# written to argv[1] (mergekit logs on stdout/stderr); LoRA references are merged into argv[2].
MERGEKIT_DRIVER = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
results = {}
for out, config in json.load(sys.stdin).items():
    try:
        options = MergeOptions(copy_tokenizer=True, quiet=True, lora_merge_cache=sys.argv[2])
        run_merge(MergeConfiguration.model_validate(config), out, options)
        results[out] = None
    except Exception as exc:
        results[out] = f"{type(exc).__name__}: {exc}"
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


def run_mergekit(configs: dict[str, dict], root: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (mergekit's output folder under `root`, its error or None)."""
    jobs = {str(root / name): config for name, config in configs.items()}
    done = subprocess.run(
        [sys.executable, "-c", MERGEKIT_DRIVER, str(root / "results.json"), str(root / "lora-merged")],
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
