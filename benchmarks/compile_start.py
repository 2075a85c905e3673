"""When the decode step's compile starts, and what it costs the first reply after a build and
another visitor's reply meanwhile.

Right after a build the page warms the model up (a two-token generation that captures the eager
step's CUDA graph) and the visitor's first reply follows. The step's compile runs on its own thread;
its first seconds (dynamo's trace) hold the GIL in stretches that no switch interval breaks, so a
reply sharing them waits. Two orders, side by side on fresh generators of one model (each compiles
its own step: a fresh code object per generator here, as a new structure gets on the page):
- at_warm_up_end: the compile starts when the warm-up ends (the order before this change);
- at_first_reply_end: the warm-up leaves it to the first reply's end (`start_compile=False`).
For each: the first reply's time to first token and its whole time (16 tokens), and whether the
compile was running at its first token.
Then another visitor (a second generator, not compiled) asks for first tokens while a fresh step
compiles, against its time alone, two ways: the compile waiting while a prompt runs
(`COMPILER.replies_first`, today's; it needs Python 3.12, so on 3.11 both ways are the same) and not
waiting (before). Prints JSON.

    python benchmarks/compile_start.py [--model REF] [--device cpu|cuda] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from merger.build.assemble import assemble
from merger.generate.compiler import COMPILER
from merger.generate.generator import FastGenerator
from merger.generate.steps import forward_one
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())
NEW_TOKENS = 16


def fresh_generator(model, ids: torch.Tensor) -> FastGenerator:
    """A generator of `model` whose step compiles afresh (a code object of its own)."""
    fast = FastGenerator(model, context_tokens=ids.shape[1] + 64, compile=True)
    code = forward_one.__code__.replace()
    fast._step_code = types.FunctionType(code, forward_one.__globals__, "forward_one")
    fast._step_code.compiled_once = False
    return fast


def first_token_s(fast: FastGenerator, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    tokens = fast.generate(ids, max_new_tokens=1)
    next(tokens)
    first = time.perf_counter() - start
    list(tokens)
    return first


def first_reply(model, ids: torch.Tensor, warm_up_starts_compile: bool) -> dict[str, float | bool]:
    fast = fresh_generator(model, ids)
    list(fast.generate(ids, max_new_tokens=2, start_compile=warm_up_starts_compile))  # the build's warm-up
    start = time.perf_counter()
    tokens = fast.generate(ids, max_new_tokens=NEW_TOKENS)
    next(tokens)
    first = time.perf_counter() - start
    compiling = fast.compiling_for() is not None
    list(tokens)
    whole = time.perf_counter() - start
    fast.wait_compiled()
    return {"first_token_s": round(first, 3), "reply_s": round(whole, 3), "compiling_at_its_first_token": compiling}


def other_visitor(model, other: FastGenerator, ids: torch.Tensor, compile_waits: bool, samples: int = 6) -> dict:
    """`other`'s first tokens while a fresh step of `model` compiles (`samples` of them, 0.3 s apart)."""
    if not compile_waits:  # before: the compile took the GIL between the prompt's torch calls
        COMPILER.replies_first = contextlib.nullcontext
    try:
        fast = fresh_generator(model, ids)
        list(fast.generate(ids, max_new_tokens=1))  # its end starts the compile
        start = time.perf_counter()
        during = []
        while len(during) < samples and fast.compiling_for() is not None:
            first = first_token_s(other, ids)
            if fast.compiling_for() is not None:
                during.append(round(first, 3))
            time.sleep(0.3)
        fast.wait_compiled()
        compile_s = time.perf_counter() - start
    finally:
        vars(COMPILER).pop("replies_first", None)
    return {
        "first_token_s_during_compile": during,
        "median_s": statistics.median(during) if during else None,
        "compile_s": round(compile_s, 1),  # the other visitor's prompts, 0.3 s apart, pause it while they run
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = ANY_PATH(args.model)
    plan = make_plan(passthrough((args.model, 0, info.num_layers)), ANY_PATH)
    model = assemble(plan, device=args.device)
    ids = torch.randint(0, 1000, (1, 32))
    result = {
        "model": args.model,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "new_tokens": NEW_TOKENS,
        "at_warm_up_end": first_reply(model, ids, True),
        "at_first_reply_end": first_reply(model, ids, False),
    }
    ways = result["at_warm_up_end"], result["at_first_reply_end"]
    result["first_token_ratio"] = round(ways[0]["first_token_s"] / ways[1]["first_token_s"], 2)
    result["reply_ratio"] = round(ways[0]["reply_s"] / ways[1]["reply_s"], 2)
    other = FastGenerator(assemble(plan, device=args.device), context_tokens=ids.shape[1] + 64, compile=False)
    alone = [first_token_s(other, ids) for _ in range(6)][1:]
    visitor = result["other_visitor"] = {"first_token_s_alone": round(statistics.median(alone), 3)}
    visitor["compile_waits_for_prompts"] = other_visitor(model, other, ids, compile_waits=True)
    visitor["compile_does_not_wait"] = other_visitor(model, other, ids, compile_waits=False)
    for way in ("compile_waits_for_prompts", "compile_does_not_wait"):
        median = visitor[way]["median_s"]
        visitor[f"{way}_over_alone"] = round(median / visitor["first_token_s_alone"], 2) if median else None
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
