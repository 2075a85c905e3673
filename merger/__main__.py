"""CLI: python -m merger params|build|chat ... (contract in DESIGN.md).

A user's mistake gets one plain sentence on stderr and exit code 2; exit 1 is our own failure.
`params` reads metadata only and never imports torch or transformers' modeling code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merger.errors import UserError
from merger.recipe import DTYPES, Recipe, recipe_from_yaml


def load_recipe(path: str) -> Recipe:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read recipe '{path}': {exc.strerror}") from None
    return recipe_from_yaml(text)


def cmd_params(args: argparse.Namespace) -> None:
    from merger.params import count
    from merger.plan import make_plan

    counts = count(make_plan(load_recipe(args.recipe)))
    if args.json:
        print(json.dumps(counts.as_dict(), indent=2))
    else:
        print(f"layers: {counts.num_layers}")
        print(f"dtype: {counts.dtype}, size: {counts.bytes:,} bytes")
        print(counts.total_params)


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    raw = text.strip().upper()
    number = raw.rstrip("KMGB")
    try:
        return int(float(number) * units[raw[len(number) :]])
    except (ValueError, KeyError):
        raise UserError(f"'{text}' is not a size like 500M or 5GB") from None


def cmd_build(args: argparse.Namespace) -> None:
    from merger.export import export_plan
    from merger.plan import make_plan

    recipe = load_recipe(args.recipe)
    if args.dtype:
        recipe = recipe.model_copy(update={"dtype": args.dtype})
    plan = make_plan(recipe)
    result = export_plan(plan, Path(args.out_dir), shard_size=parse_size(args.shard_size), progress=_print_progress)
    print(f"\nwrote {result.path} ({result.bytes:,} bytes in {len(result.shards)} shard(s), {result.seconds:.1f} s)")


def _print_progress(done: int, total: int) -> None:
    percent = 100 * done // max(total, 1)
    if percent != getattr(_print_progress, "last", None):  # one line update per percent
        _print_progress.last = percent
        print(f"\r{percent:3d}%  {done:,} / {total:,} bytes", end="", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from merger.chat import GenerationSettings, format_prompt, stream_reply
    from merger.runtime import build_for_chat

    ref = args.recipe_or_model
    recipe = load_recipe(ref) if ref.endswith((".yml", ".yaml")) else None
    built = build_for_chat(recipe, model_ref=None if recipe else ref, device=args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
    history: list[dict[str, str]] = []
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        history.append({"role": "user", "content": prompt})
        if args.show_prompt:
            print(format_prompt(built.tokenizer, history))
            return
        *_, reply = stream_reply(built, history, settings)  # the last yield is the whole reply
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merger", description="Frankenmerge Studio CLI")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter count of a recipe's merge (metadata only)")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("build", help="write the merged model as a Hugging Face folder")
    p.add_argument("recipe")
    p.add_argument("out_dir")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where dtype conversion runs")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--shard-size", default="5GB")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("chat", help="chat-test a recipe or a model from the terminal")
    p.add_argument("recipe_or_model")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt")
    p.add_argument("--show-prompt", action="store_true")
    p.set_defaults(func=cmd_chat)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
