"""CLI: python -m merger params|build|slim|analyze|suggest|chat|eval ... (contract in DESIGN.md).

A user's mistake gets one plain sentence on stderr and exit code 2; exit 1 is our own failure.
`params` reads metadata only and never imports torch or transformers' modeling code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from merger.dtypes import BUILD_DTYPES
from merger.errors import UserError
from merger.recipe import Recipe
from merger.recipe.mergekit_yaml import recipe_from_yaml
from merger.sources.catalog import LocalPolicy, resolver_for

# The user's own machine: a model reference may name any folder (the web app's policy does not).
RESOLVE = resolver_for(LocalPolicy.any_path())


def load_recipe(path: str) -> Recipe:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read recipe '{path}': {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"recipe '{path}' is not UTF-8 text (line {line} holds a byte that is not); "
            "a recipe is a mergekit YAML file"
        ) from None
    if "\x00" in text:
        raise UserError(f"recipe '{path}' is not a text file (it holds NUL bytes); a recipe is a mergekit YAML file")
    return recipe_from_yaml(text)


def cmd_params(args: argparse.Namespace) -> None:
    from merger.plan import make_plan
    from merger.plan.counts import count

    counts = count(make_plan(load_recipe(args.recipe), RESOLVE))
    if args.json:
        print(json.dumps(counts.as_dict(), indent=2))
    else:
        print(f"layers: {counts.num_layers}")
        print(f"dtype: {counts.dtype}, size: {counts.bytes:,} bytes")
        print(counts.total_params)


def parse_size(text: str) -> int:
    """A shard size: a positive number of bytes with an optional unit (500M, 5GB)."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    raw = text.strip().upper()
    number = raw.rstrip("KMGB")
    try:
        size = int(float(number) * units[raw[len(number) :]])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf
        raise UserError(f"'{text}' is not a size like 500M or 5GB") from None
    if size < 1:
        raise UserError(f"'{text}' is not a size like 500M or 5GB: a shard holds at least one byte")
    return size


def cmd_build(args: argparse.Namespace) -> None:
    from merger.build.export import export_plan
    from merger.plan import make_plan, text_model_plan

    recipe = load_recipe(args.recipe)
    if args.dtype:
        recipe = recipe.model_copy(update={"dtype": args.dtype})
    plan = make_plan(recipe, RESOLVE)
    if args.text_only:
        plan = text_model_plan(plan)
    result = export_plan(
        plan, Path(args.out_dir), shard_size=parse_size(args.shard_size), progress=_print_progress, device=args.device
    )
    print(f"\nwrote {result.path} ({result.bytes:,} bytes in {len(result.shards)} shard(s), {result.seconds:.1f} s)")
    if args.push:
        from merger.sources.hub import push_folder

        # the token comes from HF_TOKEN or the saved `hf auth login`, never from the command line
        print(f"published {push_folder(result.path, args.push, token=None, private=args.private)}")


def _print_progress(done: int, total: int) -> None:
    import time

    start = _print_progress.__dict__.setdefault("start", time.monotonic())
    percent = 100 * done // max(total, 1)
    if percent != _print_progress.__dict__.get("last"):  # one line update per percent
        _print_progress.last = percent
        left = (time.monotonic() - start) * (total - done) / done if done else 0.0
        print(f"\r{percent:3d}%  {done:,} / {total:,} bytes, {left:.0f} s left", end="", file=sys.stderr, flush=True)


def cmd_slim(args: argparse.Namespace) -> None:
    from merger.build.slim import slim_model

    result = slim_model(args.model, Path(args.out_dir), resolver=RESOLVE)
    found = result.redundancy
    if result.path is None:
        print(f"nothing to remove from {found.model}: {found.reason}; wrote nothing")
        return
    names = ", ".join(found.tensors)
    print(f"removed {names}: {found.params:,} parameters, {found.bytes:,} bytes ({found.reason})")
    print(f"wrote {result.path} ({result.bytes:,} bytes in {len(result.files)} file(s), {result.seconds:.1f} s)")


def cmd_chat(args: argparse.Namespace) -> None:
    from merger.chat.cards import parse_card, roleplay_prompt, stop_strings
    from merger.chat.prompts import format_prompt
    from merger.chat.replies import stream_reply
    from merger.generate.settings import GenerationSettings
    from merger.runtime.builds import build_for_chat

    card = None
    if args.card:
        try:
            card = parse_card(Path(args.card).read_bytes(), Path(args.card).name)
        except OSError as exc:
            raise UserError(f"cannot read card '{args.card}': {exc.strerror}") from None
    ref = args.recipe_or_model
    recipe = load_recipe(ref) if ref.endswith((".yml", ".yaml")) else None
    built = build_for_chat(recipe, resolver=RESOLVE, model_ref=None if recipe else ref, device=args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed)
    history: list[dict[str, str]] = []
    prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        history.append({"role": "user", "content": prompt})
        owner = built.plan.tokenizer_model.label  # whose chat template it is, in a refusal
        if card is not None:
            text = roleplay_prompt(built.tokenizer, card, args.user, history, model=owner)
            stops = stop_strings(args.user)
        else:
            text, stops = format_prompt(built.tokenizer, history, model=owner), []
        if args.show_prompt:
            print(text)
            return
        *_, reply = stream_reply(built, history, settings, prompt=text, stop_strings=stops)
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_analyze(args: argparse.Namespace) -> None:
    from merger.lens.capture import CALIBRATION_TEXT, read_text
    from merger.lens.seams import analyze
    from merger.plan import as_it_is
    from merger.runtime.builds import build_for_lens

    ref = args.model_ref
    is_recipe = ref.endswith((".yml", ".yaml"))
    recipe = load_recipe(ref) if is_recipe else as_it_is(ref, RESOLVE)
    text_path = Path(args.text) if args.text else CALIBRATION_TEXT
    text = read_text(text_path)
    result = analyze(
        recipe,
        resolver=RESOLVE,
        build=build_for_lens,
        text=text,
        source=str(text_path),
        name=ref,
        max_tokens=args.max_tokens,
        device=args.device,
    )
    write_json(args.out, result)
    print(f"wrote {args.out}: {result['num_layers']} layers, {result['tokens']:,} tokens of {result['text']}")


def write_json(path: str, data: dict) -> None:
    try:
        Path(path).write_text(json.dumps(data))
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {exc.strerror}") from None


def cmd_suggest(args: argparse.Namespace) -> None:
    from merger.lens.capture import DRIFT_TOKENS, read_text
    from merger.lens.search import suggest_duplications
    from merger.runtime.builds import build_for_lens

    found = suggest_duplications(
        args.model_ref,
        resolver=RESOLVE,
        build=build_for_lens,
        calibration=read_text(args.text) if args.text else None,
        heldout=read_text(args.heldout) if args.heldout else None,
        top_k=args.top_k,
        rank_by=args.rank_by,
        drift_tokens=args.drift_tokens or DRIFT_TOKENS,
        max_tokens=args.max_tokens,
        device=args.device,
        dtype=args.dtype,
        progress=_print_stage,
    )
    write_json(args.out, found.as_dict())
    best = "; ".join(f"{s.label} {s.perplexity:.2f}" for s in found.confirmed)
    print(
        f"\nwrote {args.out}: {len(found.ranked)} blocks of {found.model} ranked by {found.rank_by} ({found.dtype}, "
        f"{found.device}); perplexity of the parent {found.parent_perplexity:.2f}, of the best: {best}"
    )


def _print_stage(fraction: float, message: str) -> None:
    print(f"\r{100 * fraction:3.0f}%  {message:<60}", end="", file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace) -> None:
    from functools import partial

    from merger.eval.runner import EvalSettings, built_here, candidates, run_eval
    from merger.eval.suite import QUICK_SUITE, load_tasks, parse_task_names
    from merger.plan import as_it_is, make_plan
    from merger.runtime.devices import best_device

    ref = args.recipe_or_model
    is_recipe = ref.endswith((".yml", ".yaml"))
    plan = make_plan(load_recipe(ref) if is_recipe else as_it_is(ref, RESOLVE), RESOLVE)
    device = args.device or best_device()
    parents = (list(plan.models) if args.parents is None else args.parents) if is_recipe else []
    models = candidates(plan, parents, device=device, resolver=RESOLVE)
    if not is_recipe:
        models[0] = dataclasses.replace(models[0], label=ref, is_merge=False)
    tasks = load_tasks(parse_task_names(args.tasks or [t.name for t in QUICK_SUITE]))
    settings = EvalSettings(items=args.limit, chat_template=args.chat_template)
    report = run_eval(models, tasks, settings, provide=partial(built_here, device=device), progress=_print_stage)
    write_json(args.out, report.as_json())
    if args.samples:
        try:
            Path(args.samples).write_text(report.jsonl())
        except OSError as exc:
            raise UserError(f"cannot write '{args.samples}': {exc.strerror}") from None
    print()
    for task in tasks:
        scores = "; ".join(f"{c.label} {_score_text(report.headline(c.label, task))}" for c in models)
        items = report.scores[(models[0].label, task.name)].items
        print(f"{task.name} ({','.join(task.headline)}, {items} items): {scores}")
    for task, parent, d in report.paired():
        mcnemar = "" if d.mcnemar_p is None else f", McNemar p {d.mcnemar_p:.3g}"
        print(
            f"{task.name}: merge - {parent.label} = {d.mean:+.4f} (SE {d.stderr:.4f}, "
            f"{d.level:.0%} CI [{d.low:+.4f}, {d.high:+.4f}]{mcnemar})"
        )
    print(f"wrote {args.out}")


def _score_text(score: tuple[float, float | None] | None) -> str:
    if score is None:
        return "n/a"
    value, stderr = score
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return value


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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where dtype conversion and blends run")
    p.add_argument("--dtype", choices=BUILD_DTYPES)
    p.add_argument("--shard-size", default="5GB")
    p.add_argument(
        "--text-only", action="store_true", help="of a multimodal model (Gemma 3, Mistral 3): the text model alone"
    )
    p.add_argument("--push", metavar="REPO", help="publish the folder as a new Hub repo (name or owner/name)")
    p.add_argument("--private", action="store_true", help="with --push: make the repo private")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("slim", help="copy a model without a redundant lm_head.weight")
    p.add_argument("model")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_slim)

    p = sub.add_parser("chat", help="chat-test a recipe or a model from the terminal")
    p.add_argument("recipe_or_model")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt")
    p.add_argument("--card", help="a Character Card V2 (JSON or PNG): chat in character")
    p.add_argument("--user", default="User", help="your persona name in roleplay")
    p.add_argument("--show-prompt", action="store_true", help="print the exact text the model would receive, then exit")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("analyze", help="residual-stream lens of a model or recipe: angular distances, block influence")
    p.add_argument("model_ref", help="a model reference, or a recipe .yml")
    p.add_argument("--text", help="calibration text file (default: assets/calibration.txt)")
    p.add_argument("--out", required=True, help="where to write the JSON")
    p.add_argument("--max-tokens", type=int, help="measure only the text's first N tokens")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("suggest", help="the Lens's blocks to duplicate, ranked and the best confirmed by perplexity")
    p.add_argument("model_ref")
    p.add_argument("--rank-by", choices=("drift", "predicted"), default="drift")
    p.add_argument(
        "--dtype", choices=BUILD_DTYPES, help="what every model runs in (default: bfloat16 on cuda, else as stored)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--top-k", type=positive_int, default=5, help="how many of the best blocks to build and measure")
    p.add_argument("--out", required=True, help="where to write the JSON")
    p.add_argument("--text", help="calibration text file (default: assets/calibration.txt)")
    p.add_argument("--heldout", help="text file for perplexity (default: assets/heldout.txt)")
    p.add_argument("--max-tokens", type=positive_int, help="read only the first N tokens of each text")
    p.add_argument("--drift-tokens", type=positive_int, help="calibration tokens each candidate's drift runs on")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("eval", help="score a merge beside its parents (or one model) on lm-evaluation-harness tasks")
    p.add_argument("recipe_or_model", help="a recipe .yml (scored with its parents) or a model reference")
    p.add_argument("--tasks", nargs="+", help="lm-eval task names (default: the quick suite)")
    p.add_argument("--limit", type=positive_int, help="items per task (default: each task's quick-suite size)")
    p.add_argument("--parents", nargs="*", help="the recipe's models to score beside the merge (default: all)")
    p.add_argument("--chat-template", action="store_true", help="prompt through the model's chat template")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", required=True, help="where to write the results JSON")
    p.add_argument("--samples", help="where to write every item's outcome (JSONL)")
    p.set_defaults(func=cmd_eval)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
