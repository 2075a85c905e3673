"""Every CUDA test and the GPU benchmarks in one call, for the lent H200 (or any one-GPU CUDA machine),
within a time budget; one JSON of everything (`--out`/gpu-suite.json, logs beside it).

Parts, in this order, each in its own process with its share of the budget (a part that runs out
of time is stopped and recorded as such; the rest still run):
- tests: pytest over every test that runs on CUDA when there is one (TESTS), outcome per test;
- generation: benchmarks/generation.py's chat-path stages (first reply after build, another
  visitor during a compile, decode speed against the bound, sampled against greedy, first text);
- lens: benchmarks/lens.py on a random Llama-3-8B-shaped bf16 parent (capture against a plain
  pass; Suggest over every 2-8-layer block, five confirmed by perplexity);
- eval (only when named in --parts): benchmarks/eval.py, the quick suite's time per model and the
  same items through lm-eval's hf backend (lm-eval and its needs travel as wheels: README).
Both benchmarks share one random parent written to memory once. Run it whenever a change touches
generation, the lens, assembly or the runtime, and commit its JSON under benchmarks/results/.

    python benchmarks/gpu_suite.py [--budget-s 520] [--out DIR] [--parts tests generation lens eval]
                                   [--tests NODEID ...] [--label NAME]

On the lent machine (torch, transformers and triton are there; pydantic, httpx2 and their needs travel as
wheels, see the README's Benchmarks section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# every test that runs on CUDA when there is one, and those that need this machine's Python 3.12 (the
# rest of the suite runs on the CPU, in CI)
TESTS = (
    "tests/test_decode_kernel.py",
    "tests/test_gemv.py",
    "tests/test_fastgen_cuda.py",
    "tests/test_aot_step.py::test_step_compiled_ahead_of_time_on_cuda_gives_generates_greedy_tokens_or_is_refused_unloaded",
    "tests/test_fastgen.py::test_a_compile_waits_while_another_replys_prompt_runs",
    "tests/test_fastgen.py::test_a_compile_waits_for_one_prompt_at_most_its_limit",
)
PARTS = (
    "tests",
    "generation",
    "lens",
)  # the default parts; `--parts eval` runs benchmarks/eval.py (needs lm-eval's wheels)
SHARE = {"tests": 0.3, "generation": 0.56, "lens": 0.14, "eval": 0.5}  # of the budget, each part's when all run


def run_part(name: str, command: list[str], seconds: float, out: Path) -> dict[str, Any]:
    """Run `command` in the repository's root for at most `seconds`, its output to out/<name>.log."""
    start = time.monotonic()
    log = out / f"{name}.log"
    with log.open("w") as sink:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    result = {
        "command": " ".join(command),
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - start),
    }
    print(f"[{name}] {result}", flush=True)
    return result


def test_outcomes(junit: Path, log: Path) -> dict[str, Any]:
    """Counts and each failing test's first line, from pytest's JUnit XML; if the run was stopped
    before writing it, the outcomes its verbose log shows, and the test it was stopped in."""
    outcomes: dict[str, str] = {}
    failures: dict[str, str] = {}
    if not junit.is_file():
        lines = log.read_text().splitlines() if log.is_file() else []
        for line in lines:
            found = re.match(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
            if found:
                outcomes[found[1]] = found[2].lower()
        running = [line.split(" ")[0] for line in lines if line.startswith("tests/") and "::" in line]
        stopped_in = running[-1] if running and running[-1] not in outcomes else None
        return {"report": "from the log: the run was stopped", "stopped_in": stopped_in, **tally(outcomes, failures)}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        found = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if found is None else found.tag
        if outcome == "skipped" and "xfail" in (found.get("type") or "") + (found.get("message") or ""):
            outcome = "xfailed"
        outcomes[test] = outcome
        if outcome in ("failure", "error"):
            failures[test] = (found.get("message") or "").splitlines()[0][:300] if found.get("message") else ""
    return tally(outcomes, failures)


def tally(outcomes: dict[str, str], failures: dict[str, str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"counts": counts, "failures": failures, "outcomes": outcomes}


def environment() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = ROOT / "COMMIT"  # a copy of the tree without .git carries its commit in this file
    return {
        "commit": commit.read_text().strip() if commit.is_file() else git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=520.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--parts", nargs="+", choices=(*PARTS, "eval"), default=PARTS)
    parser.add_argument("--tests", nargs="+", default=TESTS, help="pytest node ids (default: every CUDA test)")
    parser.add_argument("--label", default="", help="a name for this run, kept in the JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    suite: dict[str, Any] = {"label": args.label, "environment": environment(), "parts": {}}
    path = args.out / "gpu-suite.json"

    def save() -> None:
        path.write_text(json.dumps(suite, indent=2))

    save()
    weights = Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp") / "gpu-suite-llama3-8b"
    share_total = sum(SHARE[p] for p in args.parts)
    python = sys.executable
    for i, part in enumerate(args.parts):
        left = deadline - time.monotonic()
        later = sum(SHARE[p] for p in args.parts[i + 1 :])
        seconds = max(left - later / share_total * args.budget_s, 30.0)  # what later parts need stays theirs
        if part == "tests":  # verbose: each outcome is in the log as it comes, should the part be stopped
            junit = Path(tempfile.mkdtemp()) / "tests.xml"
            command = [python, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.tests]
            result = run_part("tests", command, seconds, args.out)
            suite["parts"]["tests"] = {**result, **test_outcomes(junit, args.out / "tests.log")}
        elif part == "generation":
            out = args.out / "generation"
            budget = seconds - 20  # its own budget, within the part's: it stops starting stages in time
            command = [python, "benchmarks/generation.py", "--only", "chat_path", "--budget-s", f"{budget:.0f}"]
            command += ["--out", str(out), "--weights", str(weights)]
            result = run_part("generation", command, seconds, args.out)
            report = out / "generation.json"
            suite["parts"]["generation"] = {**result, **(json.loads(report.read_text()) if report.is_file() else {})}
        elif part == "eval":
            out = args.out / "eval"
            command = [python, "benchmarks/eval.py", "--budget-s", f"{seconds - 20:.0f}", "--out", str(out)]
            result = run_part("eval", [*command, "--weights", str(weights)], seconds, args.out)
            report = out / "eval-bench.json"
            suite["parts"]["eval"] = {**result, **(json.loads(report.read_text()) if report.is_file() else {})}
        else:
            report = args.out / "lens.json"
            command = [python, "benchmarks/lens.py", "--random-llama3-8b", str(weights), "--device", "cuda"]
            command += ["--suggest", "--out", str(report)]
            result = run_part("lens", command, seconds, args.out)
            suite["parts"]["lens"] = {**result, **(json.loads(report.read_text()) if report.is_file() else {})}
        save()
    suite["goals"] = {
        **suite["parts"].get("generation", {}).get("goals", {}),
        **suite["parts"].get("lens", {}).get("goals", {}),
        "cuda_tests": suite["parts"].get("tests", {}).get("counts"),
    }
    save()
    print(json.dumps({"goals": suite["goals"], "failures": suite["parts"].get("tests", {}).get("failures")}, indent=2))


if __name__ == "__main__":
    main()
