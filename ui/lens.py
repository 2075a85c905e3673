"""The Lens tab: residual-stream plots of a parent, seam scores of the recipe on screen (coloured on
the stack), suggested blocks to duplicate (one click puts one in the stack), a recurrence sweep and
perplexities. Model logic lives in merger/lens/; figures in merger/lens/plots.py.

Lens runs are heavy (each loads the models it measures), so they share one queue slot
(`concurrency_id="lens"`, limit 1) and a parent's lens is cached per (model, text). Each checks
at every progress step whether to stop (the tab's Stop button, the visitor leaving, the time
budget: ui/guard.py)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import gradio as gr

from merger.limits import LENS_TEXT_CHARS, LENS_TOKENS, check_text
from merger.plan import make_plan
from merger.recipe import Recipe, passthrough
from merger.runtime.builds import build_for_lens, load_tokenizer
from merger.runtime.devices import best_device, lens_dtype
from ui.guard import check_current, stop_work, web_handler
from ui.models import model_info
from ui.recipe_state import State, plan_of, recipe_of
from ui.recipe_value import column
from ui.stack import seam_positions
from ui.text import md

CACHED_LENSES = 8
RANKINGS = {
    "measured drift (slower, tracks perplexity best)": "drift",
    "predicted from the heatmap (instant)": "predicted",
}
EXPLAIN = (
    "Angular distance d = arccos(cos)/π between the residual stream entering layer i and entering layer j, "
    "**averaged over every token** of the text (not only the last); `out` is the stream leaving the last "
    "layer, before the final norm. Block influence is 1 − mean cos between what enters and leaves a layer. "
    "A seam's **predicted** damage is read from the parents' matrix (for a duplicated block [a,b): d(x_b, x_a)); "
    "its **measured** damage is how far the stream arriving there in the built merge is from what that "
    "layer received in its parent, on the same tokens."
)

_lenses: OrderedDict[tuple[str, str], Any] = OrderedDict()
_lenses_lock = threading.Lock()


def _progress(progress: gr.Progress, start: float = 0.0, share: float = 1.0) -> Callable[[float, str], None]:
    """A lens progress callback that shows the step and stops the work when asked to."""

    def report(fraction: float, message: str) -> None:
        check_current()
        progress(start + share * fraction, desc=message)

    return report


def _user_text(text: str | None) -> str | None:
    text = (text or "").strip()
    if not text:
        return None
    LENS_TEXT_CHARS.check(len(text), "the calibration text")
    check_text(text, "the calibration text")
    return text


def _text_key(text: str | None) -> str:
    return "" if text is None else hashlib.sha256(text.encode()).hexdigest()


def parent_lens(ref: str, text: str | None, progress: Callable[[float, str], None]) -> Any:
    """The lens of model `ref` on `text` (None: the bundled calibration text), cached."""
    from merger.lens.capture import CALIBRATION_TEXT, capture
    from merger.lens.search import chunks_for, load_model

    lens = cached_lens(ref, text)
    if lens is not None:
        return lens
    built = load_model(ref, resolver=model_info, build=build_for_lens)
    chunks = chunks_for(built.tokenizer, text, CALIBRATION_TEXT, max_tokens=LENS_TOKENS.value)
    lens = capture(built.model, chunks, name=ref, progress=progress)
    del built
    keep_lens(ref, text, lens)
    return lens


def cached_lens(ref: str, text: str | None) -> Any:
    """`parent_lens`'s result if it is cached, else None."""
    key = (ref, _text_key(text))
    with _lenses_lock:
        if key in _lenses:
            _lenses.move_to_end(key)
        return _lenses.get(key)


def keep_lens(ref: str, text: str | None, lens: Any) -> None:
    with _lenses_lock:
        _lenses[(ref, _text_key(text))] = lens
        while len(_lenses) > CACHED_LENSES:
            _lenses.popitem(last=False)


def _text_and_lens(ref: str | None, text: str, progress: gr.Progress, share: float) -> tuple[str | None, Any]:
    """The visitor's text (None: bundled) and the lens of `ref` on it, taking `share` of the progress bar."""
    if not ref:
        raise gr.Error("Add a model to the stack first.")
    user_text = _user_text(text)
    return user_text, parent_lens(ref, user_text, _progress(progress, 0.0, share))


def model_choices(value: dict[str, Any]) -> gr.Dropdown:
    """The stack's columns, offered for the lens (keeping the current pick when still there)."""
    refs = [m["ref"] for m in value.get("models", [])]
    first_used = next((s["model"] for s in value.get("slices", []) if s.get("model") in refs), None)
    return gr.Dropdown(
        choices=[(m.get("label") or m["ref"], m["ref"]) for m in value.get("models", [])],
        value=first_used or (refs[0] if refs else None),
    )


@web_handler(work="the lens", model_code=True)
def analyze_model(
    ref: str | None,
    text: str,
    state: State,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request = None,
) -> tuple[str, Any, Any]:
    """Heatmap (the stack's slices and seams of this model marked) and block-influence curve."""
    from merger.lens.plots import angular_distance_figure, block_influence_figure

    _, lens = _text_and_lens(ref, text, progress, 1.0)
    recipe = recipe_of(state)
    bi = lens.block_influence
    least = sorted(range(len(bi)), key=lambda i: float(bi[i]))[:3]
    summary = (
        f"**{md(ref.removeprefix('bundled:'))}**: {lens.num_layers} layers, averaged over all {lens.tokens:,} tokens "
        f"of {'your text' if text.strip() else 'the bundled calibration text'}. "
        f"Layers that change the stream least: {', '.join(f'{i} ({float(bi[i]):.3f})' for i in least)}."
    )
    return summary, angular_distance_figure(lens, recipe=recipe), block_influence_figure(lens)


def widget_seam_scores(value: dict[str, Any], predicted: list[float], measured: list[float]) -> dict[str, Any]:
    """Per-depth scores keyed the way the widget draws seams: "i" for the seam before slice i,
    "i-rep-r" for the seam where pass r of slice i begins."""
    scores: dict[str, Any] = {}
    joins = set(seam_positions(value))
    depth = 0
    for i, s in enumerate(value.get("slices", [])):
        length, repeat = s["end"] - s["start"], max(1, int(s.get("repeat", 1)))
        if i in joins:
            scores[str(i)] = {"measured": measured[depth], "predicted": predicted[depth]}
        for r in range(1, repeat):
            d = depth + r * length
            scores[f"{i}-rep-{r}"] = {"measured": measured[d], "predicted": predicted[d]}
        depth += length * repeat
    return scores


@web_handler(work="scoring the seams", model_code=True)
def score_stack_seams(
    state: State, text: str, progress: gr.Progress = gr.Progress(), request: gr.Request = None
) -> tuple[Any, str, Any]:
    """Predicted and measured damage at every seam of the page's recipe: the scores (with the recipe
    they belong to, for `seam_scores_shown`), a summary and a plot."""
    from merger.lens.capture import CALIBRATION_TEXT
    from merger.lens.plots import seam_scores_figure
    from merger.lens.seams import score_seams
    from merger.lens.search import chunks_for
    from merger.plan import seam_depths

    plan = plan_of(state)
    if not seam_depths(plan.layer_sources, plan.recipe.primary_model):
        return None, "This stack has no seams: each layer follows its own predecessor.", None
    progress(0.05, desc="loading the parents and the merge")
    chunks = chunks_for(load_tokenizer(plan), _user_text(text), CALIBRATION_TEXT, max_tokens=LENS_TOKENS.value)
    device = best_device()
    scores = score_seams(
        plan, chunks, device=device, dtype=lens_dtype(plan, device), progress=_progress(progress, 0.1, 0.9)
    )
    seam_list = ", ".join(
        f"depth {d}: predicted {scores.predicted[d]:.3f}, measured {scores.measured[d]:.3f}" for d in scores.seams
    )
    summary = (
        f"{len(scores.seams)} seam(s) over {scores.lens.tokens:,} tokens ({chunks.source}); {seam_list}. "
        f"The merge's output stream is {scores.measured_output:.3f} from its parent's."
    )
    keyed = widget_seam_scores(state["widget"], list(scores.predicted), list(scores.measured))
    return {"recipe": state["recipe"], "seam_scores": keyed}, summary, seam_scores_figure(scores)


@web_handler()
def seam_scores_shown(state: State, scored: dict[str, Any] | None) -> Any:
    """The widget with the seam scores drawn on it, if the stack is still the one they measured
    (an edit made while they ran is kept, and the scores are dropped)."""
    if not scored or scored["recipe"] != state["recipe"]:
        return gr.skip()
    return {**state["widget"], "seam_scores": scored["seam_scores"]}


@web_handler(work="the suggestions", model_code=True)
def suggest_blocks(
    ref: str | None, text: str, ranking: str, progress: gr.Progress = gr.Progress(), request: gr.Request = None
) -> tuple[str, Any, gr.Dropdown]:
    """Rank every 2-8-layer block of `ref` to duplicate; build the best five and measure them."""
    from merger.lens.plots import suggestions_figure
    from merger.lens.search import suggest_duplications

    if not ref:
        raise gr.Error("Add a model to the stack first.")
    user_text = _user_text(text)
    found = suggest_duplications(  # its one load of the parent also makes the lens, unless cached
        ref,
        resolver=model_info,
        build=build_for_lens,
        calibration=user_text,
        lens=cached_lens(ref, user_text),
        rank_by=RANKINGS.get(ranking, "drift"),
        max_tokens=LENS_TOKENS.value,
        progress=_progress(progress),
    )
    keep_lens(ref, user_text, found.lens)
    rows = "\n".join(
        f"| {s.label} | {s.size} | {s.predicted:.4f} | {'' if s.drift is None else f'{s.drift:.4f}'} "
        f"| {s.perplexity:.2f} | {found.num_layers + s.size} |"
        for s in found.confirmed
    )
    table = (
        f"Perplexity on {found.heldout_tokens:,} held-out tokens; the parent's: **{found.parent_perplexity:.2f}**.\n\n"
        "| duplicate | layers | predicted | drift | perplexity | merged layers |\n|---|---|---|---|---|---|\n" + rows
    )
    labels = [s.label for s in found.confirmed]
    return table, suggestions_figure(found), gr.Dropdown(choices=labels, value=labels[0] if labels else None)


def _block(pick: str | None) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in (pick or "").strip("[)").split(","))
    except ValueError:
        raise gr.Error("Pick a suggested block first.") from None
    return start, end


def suggestion_recipe(
    pick: str | None, ref: str | None, columns: list[dict[str, Any]]
) -> tuple[Recipe, list[dict[str, Any]]]:
    """The duplication of the picked block, [0, end) + [start, L), and the columns to show it with."""
    from merger.lens.search import duplication_recipe

    start, end = _block(pick)
    if not ref:
        raise gr.Error("Add a model to the stack first.")
    info = model_info(ref)
    if all(c["ref"] != info.ref for c in columns):
        columns = [*columns, column(info)]
    return duplication_recipe(ref, info.num_layers, start, end), columns


@web_handler(work="the sweep", model_code=True)
def sweep_block(
    ref: str | None,
    pick: str | None,
    text: str,
    max_repeats: float,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request = None,
) -> tuple[str, Any]:
    """Perplexity and predicted seam damage of the picked block run 1..max_repeats times."""
    from merger.lens.plots import recurrence_figure
    from merger.lens.search import recurrence_sweep

    start, end = _block(pick)
    _, lens = _text_and_lens(ref, text, progress, 0.1)
    points = recurrence_sweep(
        ref,
        start,
        end,
        resolver=model_info,
        build=build_for_lens,
        max_repeats=int(max_repeats),
        lens=lens,
        max_tokens=LENS_TOKENS.value,
        progress=_progress(progress, 0.1, 0.9),
    )
    best = min(points, key=lambda p: p.perplexity)
    summary = " · ".join(f"x{p.repeats}: {p.perplexity:.2f}" for p in points)
    return f"Block [{start}, {end}): {summary}. Lowest perplexity at x{best.repeats}.", recurrence_figure(
        points, title=f"Recurrence sweep of block [{start}, {end})"
    )


@web_handler(work="the perplexity run", model_code=True)
def measure_perplexities(
    state: State, text: str, progress: gr.Progress = gr.Progress(), request: gr.Request = None
) -> str:
    """Perplexity of the merge on screen and of each parent, on held-out text and on the user's."""
    from merger.build.assemble import assemble
    from merger.lens.capture import HELDOUT_TEXT
    from merger.lens.search import chunks_for, perplexity

    plan = plan_of(state)
    user_text = _user_text(text)
    tokenizer = load_tokenizer(plan)
    chunks = {"held-out text": chunks_for(tokenizer, None, HELDOUT_TEXT, max_tokens=LENS_TOKENS.value)}
    if user_text is not None:
        chunks["your text"] = chunks_for(tokenizer, user_text, HELDOUT_TEXT, max_tokens=LENS_TOKENS.value)
    device = best_device()
    candidates = {"the merge": plan} | {
        md(ref.removeprefix("bundled:")): make_plan(passthrough((ref, 0, info.num_layers)), plan.models.__getitem__)
        for ref, info in plan.models.items()
    }
    rows = []
    for i, (name, model_plan) in enumerate(candidates.items()):
        _progress(progress)(i / len(candidates), f"perplexity of {name}")
        model = assemble(model_plan, device=device, dtype=lens_dtype(model_plan, device))
        rows.append(
            f"| {name} | {model_plan.num_layers} | "
            + " | ".join(f"{perplexity(model, c):.2f}" for c in chunks.values())
            + " |"
        )
        del model
    head = "| model | layers | " + " | ".join(f"{n} ({c.num_tokens:,} tokens)" for n, c in chunks.items()) + " |"
    return "\n".join([head, "|---|---|" + "---|" * len(chunks), *rows])


def build_lens_tab() -> dict[str, Any]:
    gr.Markdown(EXPLAIN)
    with gr.Row():
        model = gr.Dropdown(label="Model to analyze (a column of the stack)", choices=[], elem_id="lens-model", scale=3)
        analyze = gr.Button("Analyze", variant="primary", elem_id="lens-analyze", scale=1)
        stop = gr.Button("Stop", elem_id="lens-stop", scale=1)
    text = gr.Textbox(
        label=f"Calibration text (empty: the bundled text; at most {LENS_TEXT_CHARS.value:,} characters)",
        lines=3,
        max_lines=8,
        elem_id="lens-text",
    )
    summary = gr.Markdown(elem_id="lens-summary")
    with gr.Row():
        heatmap = gr.Plot(elem_id="lens-heatmap", show_label=False)
        influence = gr.Plot(elem_id="lens-influence", show_label=False)
    gr.Markdown("### Seams of the stack on screen")
    seams = gr.Button("Score the seams", elem_id="lens-seams")
    seams_md = gr.Markdown(elem_id="lens-seams-summary")
    seams_plot = gr.Plot(elem_id="lens-seams-plot", show_label=False)
    gr.Markdown("### Blocks to duplicate")
    with gr.Row():
        ranking = gr.Radio(list(RANKINGS), value=next(iter(RANKINGS)), label="Rank candidates by", scale=3)
        suggest = gr.Button("Suggest", elem_id="lens-suggest", scale=1)
    suggestions_md = gr.Markdown(elem_id="lens-suggestions")
    suggestions_plot = gr.Plot(elem_id="lens-suggestions-plot", show_label=False)
    with gr.Row():
        pick = gr.Dropdown(label="Suggested block", choices=[], elem_id="lens-pick", scale=2)
        apply = gr.Button("Put in the stack", elem_id="lens-apply", scale=1)
        undo = gr.Button("Undo", elem_id="lens-undo", scale=1, visible=False)
        repeats = gr.Slider(2, 8, value=8, step=1, label="Recurrence sweep up to", scale=2)
        sweep = gr.Button("Sweep repeats", elem_id="lens-sweep", scale=1)
    put_note = gr.Markdown(elem_id="lens-put-note")
    sweep_md = gr.Markdown(elem_id="lens-sweep-summary")
    sweep_plot = gr.Plot(elem_id="lens-sweep-plot", show_label=False)
    gr.Markdown("### Did the splice damage it?")
    ppl = gr.Button("Measure perplexity of the merge and its parents", elem_id="lens-ppl")
    ppl_md = gr.Markdown(elem_id="lens-ppl-table")
    return {
        "model": model,
        "analyze": analyze,
        "stop": stop,
        "text": text,
        "summary": summary,
        "heatmap": heatmap,
        "influence": influence,
        "seams": seams,
        "seams_md": seams_md,
        "seams_plot": seams_plot,
        "ranking": ranking,
        "suggest": suggest,
        "suggestions_md": suggestions_md,
        "suggestions_plot": suggestions_plot,
        "pick": pick,
        "apply": apply,
        "undo": undo,
        "put_note": put_note,
        "repeats": repeats,
        "sweep": sweep,
        "sweep_md": sweep_md,
        "sweep_plot": sweep_plot,
        "ppl": ppl,
        "ppl_md": ppl_md,
    }


def wire_lens_tab(lens: dict[str, Any], stack: gr.HTML, recipe_state: gr.State) -> None:
    """Events of the Lens tab; every heavy one takes the single lens queue slot. They read the
    page's recipe from `recipe_state`; "Put in the stack" and "Undo" edit it (wired with the page)."""
    heavy = {"concurrency_limit": 1, "concurrency_id": "lens", "api_visibility": "private"}
    stack.change(model_choices, stack, lens["model"], api_visibility="private")
    lens["analyze"].click(
        analyze_model,
        [lens["model"], lens["text"], recipe_state],
        [lens["summary"], lens["heatmap"], lens["influence"]],
        **heavy,
    )
    scored = gr.State(None)
    lens["seams"].click(
        score_stack_seams, [recipe_state, lens["text"]], [scored, lens["seams_md"], lens["seams_plot"]], **heavy
    ).success(seam_scores_shown, [recipe_state, scored], stack, api_visibility="private")
    lens["suggest"].click(
        suggest_blocks,
        [lens["model"], lens["text"], lens["ranking"]],
        [lens["suggestions_md"], lens["suggestions_plot"], lens["pick"]],
        **heavy,
    )
    lens["sweep"].click(
        sweep_block,
        [lens["model"], lens["pick"], lens["text"], lens["repeats"]],
        [lens["sweep_md"], lens["sweep_plot"]],
        **heavy,
    )
    lens["ppl"].click(measure_perplexities, [recipe_state, lens["text"]], lens["ppl_md"], **heavy)
    # not in the lens slot: it must run while a lens run holds it
    lens["stop"].click(stop_work, api_visibility="private", concurrency_limit=None)
