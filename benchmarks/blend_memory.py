"""Parameter memory of in-memory builds that mix blended and duplicated layers, against the
parent's own, on bundled SmolLM2-135M-Instruct (CPU is enough: this counts bytes, not time).

The second parent is SmolLM2 shifted like a fine-tune (tests/tiny.py's make_finetune) in a temp
folder. Two 40-layer recipes, each half passthrough and half blended (linear, 0.5 : 0.5):
  - "second half blended": [0,20) passed through, then [10,30) blended with the copy (the
    duplicated range 10-19 comes back blended, so it is materialized);
  - "duplicate shared, rest blended": [0,20) and [10,20) passed through (the repeat shares its
    tensors), then [20,30) blended.
Prints, per build, the measured unique parameter bytes (merger.build.assemble.parameter_bytes), the
plan's prediction (memory_bytes, blend_bytes) and the ratio to the parent's build.

    python benchmarks/blend_memory.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.build.assemble import assemble, parameter_bytes
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import passthrough
from merger.recipe.mergekit_yaml import recipe_from_dict
from merger.sizes import human_bytes
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

ROOT = Path(__file__).resolve().parent.parent
SMOL = "bundled:smollm2-135m-instruct"


def recipes(copy: str) -> dict[str, dict]:
    def blend(a: int, b: int) -> dict:
        return {
            "sources": [
                {"model": SMOL, "layer_range": [a, b], "parameters": {"weight": 0.5}},
                {"model": copy, "layer_range": [a, b], "parameters": {"weight": 0.5}},
            ]
        }

    def plain(a: int, b: int) -> dict:
        return {"sources": [{"model": SMOL, "layer_range": [a, b]}]}

    return {
        "second half blended": {"slices": [plain(0, 20), blend(10, 30)], "merge_method": "linear"},
        "duplicate shared, rest blended": {
            "slices": [plain(0, 20), plain(10, 20), blend(20, 30)],
            "merge_method": "linear",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the shifted copy goes (default: a temp folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_finetune

    work = Path(tempfile.mkdtemp(prefix="blend-memory-", dir=args.workdir))
    try:
        copy = make_finetune(ANY_PATH(SMOL).local_dir, work / "smollm2-shifted", seed=5, scale=0.01)
        parent = parameter_bytes(assemble(make_plan(passthrough((SMOL, 0, 30)), ANY_PATH)))
        print(f"parent SmolLM2-135M-Instruct (30 layers): {parent:,} bytes ({human_bytes(parent)})")
        for label, data in recipes(str(copy)).items():
            plan = make_plan(recipe_from_dict(data), ANY_PATH)
            counts = count(plan)
            measured = parameter_bytes(assemble(plan))
            print(
                f"{label}: {plan.num_layers} layers, {counts.total_params:,} parameters; parameter memory "
                f"{measured:,} bytes ({human_bytes(measured)}) = {measured / parent:.2f}x the parent; plan predicted "
                f"{counts.memory_bytes:,} of which blended {counts.blend_bytes:,} ({human_bytes(counts.blend_bytes)})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
