"""Frankenmerge Studio: pick models, splice layers on a visual stack, see exact counts, build, chat.

Handlers, then layout, then wiring. Model logic lives in merger/; page parts in ui/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
from gradio.utils import get_upload_folder

from merger.build.export import export_plan
from merger.build.slim import slim_model
from merger.dtypes import BUILD_DTYPES as DTYPES
from merger.errors import PlacementError, UserError
from merger.generate.settings import GenerationSettings, setting_ranges
from merger.host import on_space, on_zero_gpu
from merger.plan import Plan, text_model_plan
from merger.plan.counts import count
from merger.recipe import Recipe, passthrough
from merger.recipe.mergekit_yaml import recipe_from_yaml
from merger.recipe.share_links import from_share_token, to_share_token
from merger.runtime.devices import free_memory, plan_placement
from merger.runtime.startup import import_in_background
from merger.sizes import human_bytes, human_params
from merger.sources import bundled
from merger.sources.catalog import list_allowed_folders
from merger.sources.hub import current_token, push_folder
from merger.sources.space import DEFAULT_HUB_MODEL, HUB_MODELS
from ui.chat import (
    build_chat_tab,
    build_compare_tab,
    build_merge,
    build_model,
    build_notice,
    forget_session,
    roleplay_chat,
    sending,
    wire_chat_tab,
    wire_compare_tab,
)
from ui.eval_tab import build_eval_tab, wire_eval_tab
from ui.guard import check_current, session_id, web_handler
from ui.lens import build_lens_tab, suggestion_recipe, wire_lens_tab
from ui.models import POLICY, as_visitor, model_info, plan_for, plan_recipe, visitor
from ui.placement import placement_markdown, refusal_markdown
from ui.recipe_state import (
    Reading,
    State,
    empty_state,
    of_recipe,
    plan_of,
    read,
    recipe_of,
    stack_replaced,
    unapplied,
    undone,
    widget_edited,
    with_columns,
    with_dtype,
    yaml_of,
)
from ui.recipe_value import column
from ui.roleplay import build_roleplay_tab, load_card
from ui.stack import merged_layer_count, stack_widget
from ui.text import md

BUNDLED_DEFAULT = "bundled:smollm2-135m-instruct"


def default_model() -> str:
    """The model the page opens on: the bundled SmolLM2 (offline), or on a Space (which cannot
    install the bundled packages) its Hub copy."""
    if on_space() or not bundled.available(BUNDLED_DEFAULT.removeprefix("bundled:")):
        return DEFAULT_HUB_MODEL
    return BUNDLED_DEFAULT


def model_choices() -> list[str]:
    """The models offered: the bundled ones installed here, the allowed folders, known-good Hub models."""
    local = [f"bundled:{name}" for name in bundled.MODELS if bundled.available(name)]
    return local + list_allowed_folders(POLICY) + list(HUB_MODELS)


# ---- handlers: the recipe (one owner, ui/recipe_state.py) and what the page draws from it ------


def preview_counts(plan: Plan) -> dict[str, Any]:
    """What the preview shows of a plan (and /preview returns)."""
    return {**count(plan).as_dict(), "seams": plan.seams(), "notes": plan.recipe.notes}


@web_handler(work="the preview")
@as_visitor
def preview(recipe_yaml: str, oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """Counts of the merge a recipe describes, from metadata alone."""
    return preview_counts(plan_for(recipe_yaml))


def preview_markdown(counts: dict[str, Any]) -> str:
    parents = ", ".join(f"{md(ref.removeprefix('bundled:'))} {n:,}" for ref, n in counts["parent_params"].items())
    seams = len(counts["seams"])
    blended = f", {human_bytes(counts['blend_bytes'])} of it blended or scaled tensors" if counts["blend_bytes"] else ""
    if counts.get("lora_bytes"):
        blended += f", {human_bytes(counts['lora_bytes'])} of it tensors with a LoRA merged in"
    return (
        f"### {counts['total_params']:,} parameters ({human_params(counts['total_params'])})\n"
        f"**{counts['num_layers']} layers** · {counts['dtype']} · export size {human_bytes(counts['bytes'])} · "
        f"memory when built {human_bytes(counts['memory_bytes'])} (duplicated layers share tensors{blended}) · "
        f"{seams} seam{'s' if seams != 1 else ''}  \nparents: {parents}"
        + "".join(f"  \nNote: {note}." for note in counts.get("notes", ()))
    )


def placement_preview(plan: Plan) -> str:
    """Where a build of the plan would go on this machine and the memory per device (apart from
    the counts: it reads the devices' free memory)."""
    try:
        text = placement_markdown(plan_placement(plan))
    except PlacementError as exc:
        return refusal_markdown(str(exc))
    if on_zero_gpu():  # held there between replies; each reply runs on the card ZeroGPU lends it
        text += f"; replies run on ZeroGPU's {human_bytes(free_memory('cuda'))} GPU"
    return text


UNAPPLIED = (
    "The recipe box holds YAML you have not applied: press Apply YAML to use it, or Discard to go back "
    "to the stack's recipe."
)
UNAPPLIED_NOTE = (
    "✏️ Not applied yet: Build and Export use the stack's recipe until you press **Apply YAML** (or **Discard**)."
)


class RecipeView(NamedTuple):
    """What the page shows of the recipe after an edit, in the order of the wiring's `recipe_outputs`."""

    state: State
    widget: Any  # gr.skip() when the widget shows it already (the edit came from the widget)
    yaml: Any
    yaml_note: str
    preview: Any
    placement: Any
    dtype: Any
    share_token: Any
    build_status: Any
    build_button: Any
    export_status: Any
    export_file: Any
    lens_note: Any
    lens_undo: Any


def unchanged_view(**shown: Any) -> RecipeView:
    """Nothing changes but what `shown` names."""
    return RecipeView(*[gr.skip()] * len(RecipeView._fields))._replace(**shown)


DEFAULT_SETTINGS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}  # what a share link carries


def named_settings(*values: Any) -> dict[str, Any]:
    """The shared settings' values (the edit handlers' trailing inputs, in DEFAULT_SETTINGS' order), by name."""
    return dict(zip(DEFAULT_SETTINGS, values, strict=True))


def shared_settings(shared: dict[str, Any]) -> dict[str, Any]:
    """The page's settings a share link carries, each checked against its slider's range."""
    settings = {**DEFAULT_SETTINGS, **{k: shared[k] for k in DEFAULT_SETTINGS if k in shared}}
    GenerationSettings(**settings)  # a UserError for NaN, 1e308, 10**12 ...
    return settings


def recipe_view(
    before: State | None,
    after: State,
    request: gr.Request | None,
    settings: dict[str, Any],
    *,
    redraw: bool,
    reading: Reading | None = None,
    lens_note: str | None = None,
) -> RecipeView:
    """Every part of the page drawn from one reading of the new state: the YAML box, preview,
    placement, dtype, share link, whether the built model still matches, and an export of an
    earlier recipe cleared."""
    reading = reading or read(after)
    if reading.plan is not None:
        shown, placement = preview_markdown(preview_counts(reading.plan)), placement_preview(reading.plan)
    else:
        shown, placement = f"⚠️ {md(reading.error)}", ""
    dtype = reading.plan.dtype if reading.plan else (reading.recipe.dtype if reading.recipe else None)
    status, button = build_notice(request, reading.recipe)
    changed = before is not None and before["recipe"] != after["recipe"]
    if lens_note is None:
        lens_note = gr.skip() if after["undo"] else ""
    return RecipeView(
        state=after,
        widget=after["widget"] if redraw else gr.skip(),
        yaml=reading.yaml,
        yaml_note="",
        preview=shown,
        placement=placement,
        dtype=dtype or gr.skip(),
        share_token=to_share_token(reading.recipe, settings) if reading.recipe else "",
        build_status=status,
        build_button=button,
        export_status="" if changed else gr.skip(),
        export_file=None if changed else gr.skip(),
        lens_note=lens_note,
        lens_undo=gr.Button(visible=after["undo"] is not None),
    )


def columns_for(recipe: Recipe) -> list[dict[str, Any]]:
    return [column(model_info(ref)) for ref in recipe.models]


@web_handler(work="the preview")
@as_visitor
def on_stack_edit(
    value: dict[str, Any],
    state: State,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    *settings: Any,
) -> RecipeView:
    """The widget changed: an edit of the stack (or Python's own redraw, which changes nothing)."""
    edited = widget_edited(state, value)
    if edited is None:
        return unchanged_view()
    after, redraw = edited
    return recipe_view(state, after, request, named_settings(*settings), redraw=redraw)


@web_handler(work="the preview")
@as_visitor
def apply_yaml(
    recipe_yaml: str,
    state: State,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    *settings: Any,
) -> RecipeView:
    """Pasted YAML becomes the recipe, whole; its models become the columns. A recipe that cannot
    be built is refused, next to the box, and the page keeps the recipe it had."""
    try:
        recipe = recipe_from_yaml(recipe_yaml)
        after = of_recipe(recipe, columns_for(recipe))
    except UserError as exc:
        return unchanged_view(yaml_note=f"⚠️ Not applied: {md(exc)}")
    reading = read(after)
    if reading.error:
        return unchanged_view(yaml_note=f"⚠️ Not applied: {md(reading.error)}")
    return recipe_view(state, after, request, named_settings(*settings), redraw=True, reading=reading)


@web_handler()
def yaml_note(recipe_yaml: str, state: State) -> str:
    """Under the YAML box while it holds a recipe other than the page's."""
    return UNAPPLIED_NOTE if unapplied(state, recipe_yaml) else ""


@web_handler()
def discard_yaml(state: State) -> tuple[str, str]:
    """The YAML box back to the page's recipe."""
    return yaml_of(state), ""


@web_handler(work="the preview")
@as_visitor
def set_dtype(
    dtype: str,
    state: State,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    *settings: Any,
) -> RecipeView:
    """The one dtype: what the preview counts, Build builds (on the CPU; CUDA builds without a chosen
    dtype use bfloat16) and Export writes."""
    return recipe_view(state, with_dtype(state, dtype), request, named_settings(*settings), redraw=False)


@web_handler(work="adding the model")
@as_visitor
def find_column(
    ref: str, oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = gr.Progress()
) -> tuple[dict[str, Any] | None, str]:
    """A model's column for the stack, or None and why not (the first use of a bundled model
    converts it: progress)."""
    ref = (ref or "").strip()
    name = ref.removeprefix("bundled:")
    if ref.startswith("bundled:") and name in bundled.MODELS and not bundled.is_cached(name):
        progress(0.1, desc="First use: converting the bundled model to safetensors (about a minute)")
    try:
        info = model_info(ref)
    except UserError as exc:
        return None, f"⚠️ {md(exc)}"
    return column(info), f"Added **{md(info.label)}**: {info.num_layers} layers, {md(info.architecture)}."


@web_handler()
def add_column(new: dict[str, Any] | None, state: State) -> tuple[Any, Any]:
    """The column joins the stack's (read after the slow lookup, so no edit made meanwhile is lost)."""
    if new is None:
        return gr.skip(), gr.skip()
    columns = [c for c in state["widget"]["models"] if c["ref"] != new["ref"]] + [new]
    after = with_columns(state, columns)
    return after, after["widget"]


@web_handler(work="the preview")
@as_visitor
def put_suggestion(
    pick: str | None,
    ref: str | None,
    state: State,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    *settings: Any,
) -> RecipeView:
    """The Lens's picked block, duplicated, replaces the stack; the notice says so and Undo goes back."""
    recipe, columns = suggestion_recipe(pick, ref, state["widget"]["models"])
    after = stack_replaced(state, recipe, columns)
    old = state["widget"]
    note = (
        f"The stack now duplicates layers {md(pick)} of {md(recipe.primary_model.removeprefix('bundled:'))} "
        f"({recipe.num_layers} layers). It replaced the stack you had ({len(old['slices'])} slice(s), "
        f"{merged_layer_count(old)} layers); the recipe's other settings (dtype, tokenizer) stay. "
        "**Undo** brings the old stack back."
    )
    return recipe_view(state, after, request, named_settings(*settings), redraw=True, lens_note=note)


@web_handler(work="the preview")
@as_visitor
def undo_put(state: State, request: gr.Request, oauth_token: gr.OAuthToken | None = None, *settings: Any) -> RecipeView:
    before = undone(state)
    if before is None:
        raise gr.Error("There is nothing to undo.")
    note = "The stack is back as it was before the suggestion."
    return recipe_view(state, before, request, named_settings(*settings), redraw=True, lens_note=note)


def default_state() -> State:
    info = model_info(default_model())
    return of_recipe(passthrough((info.ref, 0, info.num_layers)), [column(info)])


@web_handler(work="opening the page")
@as_visitor
def open_page(request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> tuple[Any, ...]:
    """The recipe a visit opens on (a share link's `?r=`, else the default model), drawn everywhere,
    then the model message and the shared settings."""
    token = request.query_params.get("r") if request else None
    settings = dict(DEFAULT_SETTINGS)
    notice = ""
    try:
        if token:
            try:
                recipe, shared = from_share_token(token)
                settings = shared_settings(shared)
                state = of_recipe(recipe, columns_for(recipe))
                notice = "Opened a shared recipe."
            except UserError as exc:
                state, notice, settings = default_state(), f"⚠️ {md(exc)}", dict(DEFAULT_SETTINGS)
        else:
            state = default_state()
    except UserError as exc:  # e.g. the Hub does not answer: start empty, say why
        state, notice = empty_state(), f"⚠️ {md(exc)}. Add a model above."
    settings["max_new_tokens"] = int(settings["max_new_tokens"])
    view = recipe_view(None, state, request, settings, redraw=True)
    return (*view, notice, settings["temperature"], settings["top_p"], settings["max_new_tokens"])


@web_handler()
def share_token(state: State, *settings: Any) -> str:
    """The share-link token of the recipe and settings ('' while the recipe is unfinished)."""
    recipe = recipe_of(state)
    return to_share_token(recipe, named_settings(*settings)) if recipe else ""


def page_plan(state: State, recipe_yaml: str) -> Plan:
    """The page's recipe, planned, for Build and Export: never YAML pasted but not applied, and a
    recipe that cannot be built gets its reason (a UserError)."""
    if unapplied(state, recipe_yaml):
        raise gr.Error(UNAPPLIED)
    return plan_of(state)


@web_handler(work="the build", model_code=True)
@as_visitor
def build_page(
    state: State,
    recipe_yaml: str,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, gr.Button]:
    """Build: the page's recipe, for this session's chat."""
    return build_merge(page_plan(state, recipe_yaml), request, progress), gr.Button(value="Build")


@web_handler()
def build_status_now(state: State, request: gr.Request) -> tuple[Any, Any]:
    """After a build: whether the stack was edited while it ran."""
    return build_notice(request, recipe_of(state))


# Runs in the browser: puts the token into the address bar and returns the full link for the box.
SHARE_LINK_JS = """(token) => {
  const url = new URL(window.location.href);
  if (token) { url.searchParams.set("r", token); } else { url.searchParams.delete("r"); }
  window.history.replaceState(null, "", url.toString());
  return token ? url.toString() : "";
}"""
COPY_LINK_JS = """(link) => { if (link) { navigator.clipboard.writeText(link).catch(() => {}); } return link; }"""


def bytes_progress(progress: gr.Progress):
    """A (done, total) bytes callback that shows bytes written and the time left."""
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        left = elapsed * (total - done) / done if done else 0.0
        check_current()  # each tensor written: the export stops when the visitor leaves
        progress(done / max(total, 1), desc=f"{human_bytes(done)} of {human_bytes(total)} written, {left:.0f} s left")

    return report


MAX_DOWNLOAD_BYTES = int(float(os.environ.get("FRANKENMERGE_MAX_DOWNLOAD_MB", "2048")) * 2**20)
# Archives are written into Gradio's own cache, so it serves them without a copy of its own; its
# `delete_cache` removes them after this long, and leaving the page removes the visitor's at once.
ARCHIVE_SECONDS = int(float(os.environ.get("FRANKENMERGE_ARCHIVE_MINUTES", "60")) * 60)
ARCHIVES: dict[str, list[Path]] = {}  # by session: the archives offered to it


def archive_path(request: gr.Request | None) -> Path:
    """A fresh archive name in Gradio's cache, remembered for the session (deleted when it ends)."""
    folder = Path(get_upload_folder()) / "frankenmerge-exports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"frankenmerge-{uuid.uuid4().hex[:12]}"
    ARCHIVES.setdefault(session_id(request), []).append(path.with_suffix(".zip"))
    return path


def forget_archives(request: gr.Request) -> None:
    """The visitor left: delete the archives offered to them."""
    for path in ARCHIVES.pop(session_id(request), []):
        path.unlink(missing_ok=True)


def deliver(
    folder: Path, nbytes: int, repo_name: str, private: bool, request: gr.Request | None, progress: gr.Progress
) -> tuple[list[str], str | None]:
    """Offer a written model folder as an archive (under the operator's limit) and publish it
    when a repo name is given, as the visitor. Returns the status lines and the archive's path."""
    lines, archive = [], None
    if nbytes <= MAX_DOWNLOAD_BYTES:
        progress(1.0, desc="packing the archive")
        archive = shutil.make_archive(str(archive_path(request)), "zip", folder)
        lines.append("Download it below.")
    else:
        lines.append(f"Too large to download here (limit {human_bytes(MAX_DOWNLOAD_BYTES)}); publish it instead.")
    if repo_name.strip():
        progress(1.0, desc="uploading to the Hub")
        lines.append(f"Published: {push_folder(folder, repo_name, token=current_token(), private=private)}")
    return lines, archive


def write_and_deliver(
    write: Callable[[Path], tuple[str, Path | None, int]],
    repo_name: str,
    private: bool,
    request: gr.Request | None,
    progress: gr.Progress,
) -> tuple[str, str | None]:
    """Run `write(folder)` (returns a status line, the folder written or None, its bytes) in a
    scratch directory, then offer and publish the result; the folder is removed afterwards. The
    status ends with the whole time taken, packing and publishing included."""
    work = Path(tempfile.mkdtemp(prefix="frankenmerge-"))
    start = time.monotonic()
    try:
        head, folder, nbytes = write(work / "frankenmerge")
        if folder is None:
            return head, None
        lines, archive = deliver(folder, nbytes, repo_name, private, request, progress)
        return " ".join([head, *lines, f"{time.monotonic() - start:.1f} s in all."]), archive
    finally:
        shutil.rmtree(work, ignore_errors=True)


@web_handler(work="the export", model_code=True)
def export_merge(
    recipe_yaml: str,
    dtype: str,
    repo_name: str,
    private: bool,
    token_text: str,
    text_only: bool = False,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),
    state: State | None = None,
) -> tuple[str, str | None]:
    """Export: the page's recipe (`state`), at its own dtype; for the /export endpoint, which has no
    page, the recipe's YAML at `dtype` (empty: the recipe's own). Written as a Hugging Face folder
    (of a multimodal model: whole, or with `text_only` its text model alone), offered as an archive
    when small enough and published when a repo name is given; the visitor's sign-in (or pasted
    token) is used for this call only."""
    with visitor(oauth_token, token_text):
        if state is not None:
            plan = page_plan(state, recipe_yaml)
        else:
            recipe = recipe_from_yaml(recipe_yaml)
            plan = plan_recipe(recipe.model_copy(update={"dtype": dtype or recipe.dtype}))

        if text_only:
            plan = text_model_plan(plan)

        def write(folder: Path) -> tuple[str, Path | None, int]:
            result = export_plan(plan, folder, progress=bytes_progress(progress))
            head = (
                f"Exported {human_bytes(result.bytes)} of {plan.dtype} in {len(result.shards)} shard(s), "
                f"written in {result.seconds:.1f} s."
            )
            return head, result.path, result.bytes

        return write_and_deliver(write, repo_name or "", private, request, progress)


@web_handler(work="slimming")
def slim(
    ref: str,
    repo_name: str,
    private: bool,
    token_text: str,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, str | None]:
    """Inspect a model for a redundant lm_head.weight (tied embeddings stored twice); when there is
    one, write a slimmed copy to download or publish."""

    def write(folder: Path) -> tuple[str, Path | None, int]:
        progress(0.1, desc="reading the model")
        result = slim_model((ref or "").strip(), folder, resolver=model_info)
        found = result.redundancy
        if result.path is None:
            return f"Nothing to remove from {md(found.model)}: {md(found.reason)}. Nothing was written.", None, 0
        head = (
            f"Removed {md(', '.join(found.tensors))}: {found.params:,} parameters, {human_bytes(found.bytes)} "
            f"({md(found.reason)})."
        )
        return head, result.path, result.bytes

    with visitor(oauth_token, token_text):
        return write_and_deliver(write, repo_name or "", private, request, progress)


# ---- layout ---------------------------------------------------------------------------------


def setting_slider(name: str, step: float, **kwargs: Any) -> gr.Slider:
    """A generation setting's slider, over the range every call is checked against."""
    low, high = setting_ranges()[name]
    return gr.Slider(low, high, step=step, **kwargs)


# Gradio caps the queue at one waiting event on ZeroGPU unless the app sets a size.
QUEUE_OPTIONS = {"default_concurrency_limit": 4, "max_size": int(os.environ.get("FRANKENMERGE_QUEUE_SIZE", "64"))}


def build_demo() -> gr.Blocks:
    # delete_cache: Gradio's copies of uploads and our archives, every 10 minutes once old enough
    with gr.Blocks(title="Frankenmerge Studio", delete_cache=(min(600, ARCHIVE_SECONDS), ARCHIVE_SECONDS)) as demo:
        gr.Markdown(
            "# Frankenmerge Studio\nSplice transformer layers: drag a range on a model's column, "
            "press **Add**, reorder or repeat blocks, and watch the exact size. Then **Build** and chat."
        )
        if on_space():
            with gr.Row():
                # the visitor's own Hub access: gated and private models, publishing to their namespace
                gr.LoginButton(scale=0)
                gr.Markdown("Sign in to use gated or private models and to publish merges under your name.")
        with gr.Row():
            ref_box = gr.Dropdown(
                choices=model_choices(),
                value=default_model(),
                allow_custom_value=True,
                label="Model (bundled, allowed folder, or Hub id owner/name)",
                scale=4,
                elem_id="model-ref",
            )
            add_btn = gr.Button("Add model column", scale=1, elem_id="add-model-btn")
        model_msg = gr.Markdown(elem_id="model-msg")
        stack = stack_widget({"models": [], "slices": []})
        preview_md = gr.Markdown(elem_id="preview")
        dtype_box = gr.Dropdown(
            list(DTYPES),
            label="dtype: what the preview counts, Build builds and Export writes (the recipe's `dtype`)",
            elem_id="recipe-dtype",
        )
        placement_md = gr.Markdown(elem_id="placement")
        with gr.Accordion("Recipe (mergekit YAML)", open=False, elem_id="recipe-accordion"):
            yaml_box = gr.Code(
                language="yaml",
                label="The whole recipe as mergekit runs it; paste a mergekit config and press Apply",
                interactive=True,
                elem_id="recipe-yaml",
            )
            yaml_note_md = gr.Markdown(elem_id="yaml-note")
            with gr.Row():
                apply_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
                discard_btn = gr.Button("Discard changes", elem_id="discard-yaml")
        with gr.Row():
            share_box = gr.Textbox(label="Share link (reopens this recipe)", elem_id="share-link", scale=5)
            copy_btn = gr.Button("Copy link", scale=1, elem_id="copy-link")
            share_token_box = gr.Textbox(visible=False)
        with gr.Row():
            build_btn = gr.Button("Build", variant="primary", elem_id="build-btn")
        build_status = gr.Markdown(elem_id="build-status")
        with gr.Accordion("Export and publish", open=False):
            with gr.Row():
                repo_box = gr.Textbox(label="Publish as (repo name; empty: download only)", scale=2)
                private_box = gr.Checkbox(label="Private repo", value=True)
                text_only_box = gr.Checkbox(label="Text model only (a multimodal model's vision tower left out)")
            if on_space():  # the sign-in above replaces a pasted token
                hub_token_box = gr.Textbox(visible=False)
            else:
                hub_token_box = gr.Textbox(
                    label="Hub token (used for this upload only; empty: your saved login)", type="password"
                )
            export_btn = gr.Button("Export", elem_id="export-btn")
            export_status = gr.Markdown(elem_id="export-status")
            export_file = gr.File(label="Archive", elem_id="export-file")
            gr.Markdown(
                "**Slim a model**: a tied-embedding model that also stores `lm_head.weight` carries a "
                "redundant copy (a '9B' that counts 10B). Name a model to check it and get a slimmed copy "
                "(published under the repo name above when one is given)."
            )
            with gr.Row():
                slim_ref = gr.Textbox(label="Model to slim (Hub id or allowed folder)", scale=4)
                slim_btn = gr.Button("Check and slim", scale=1, elem_id="slim-btn")
            slim_status = gr.Markdown(elem_id="slim-status")
            slim_file = gr.File(label="Slimmed archive")
        with gr.Tabs():
            with gr.Tab("Chat"):
                chat_tab = build_chat_tab()
            with gr.Tab("Side by side", elem_id="compare-tab"):
                compare_tab = build_compare_tab()
            with gr.Tab("Roleplay", elem_id="roleplay-tab"):
                rp = build_roleplay_tab()
            with gr.Tab("Lens", elem_id="lens-tab"):
                lens = build_lens_tab()
            with gr.Tab("Eval", elem_id="eval-tab") as eval_tab_item:
                eval_tab = build_eval_tab()
        with gr.Accordion("Generation settings", open=False):
            temperature = setting_slider("temperature", 0.05, value=0.7, label="Temperature (0 = greedy)")
            top_p = setting_slider("top_p", 0.05, value=0.9, label="Top-p")
            max_new = setting_slider("max_new_tokens", 1, value=200, label="Max new tokens", elem_id="max-new-tokens")
            top_k = setting_slider("top_k", 1, value=0, label="Top-k (0 = off)")
            min_p = setting_slider("min_p", 0.01, value=0.0, label="Min-p (0 = off)")
            rep_pen = setting_slider("repetition_penalty", 0.01, value=1.0, label="Repetition penalty")
            seed = gr.Number(
                value=0, precision=0, label="Seed (the last reply's; Regenerate draws a new one)", elem_id="seed"
            )
            pin_seed = gr.Checkbox(value=False, label="Pin the seed: Regenerate repeats the reply", elem_id="pin-seed")

        # ---- wiring ----
        private = {"api_visibility": "private"}
        recipe_state = gr.State(empty_state())
        share_settings_inputs = [temperature, top_p, max_new]
        recipe_outputs = [
            recipe_state,
            stack,
            yaml_box,
            yaml_note_md,
            preview_md,
            placement_md,
            dtype_box,
            share_token_box,
            build_status,
            build_btn,
            export_status,
            export_file,
            lens["put_note"],
            lens["undo"],
        ]
        edit_inputs = [recipe_state, *share_settings_inputs]
        edit = {"show_progress_on": preview_md, **private}  # one spinner, where the counts appear
        demo.load(open_page, outputs=[*recipe_outputs, model_msg, *share_settings_inputs], **edit)
        stack.change(on_stack_edit, [stack, *edit_inputs], recipe_outputs, **edit)
        apply_btn.click(apply_yaml, [yaml_box, *edit_inputs], recipe_outputs, **edit)
        discard_btn.click(discard_yaml, recipe_state, [yaml_box, yaml_note_md], **private)
        quiet = {"trigger_mode": "always_last", "show_progress": "hidden", **private}
        yaml_box.input(yaml_note, [yaml_box, recipe_state], yaml_note_md, **quiet)
        dtype_box.input(set_dtype, [dtype_box, *edit_inputs], recipe_outputs, **edit)
        lens["apply"].click(put_suggestion, [lens["pick"], lens["model"], *edit_inputs], recipe_outputs, **edit)
        lens["undo"].click(undo_put, edit_inputs, recipe_outputs, **edit)
        found = gr.State(None)
        add_btn.click(find_column, ref_box, [found, model_msg], **private).then(
            add_column, [found, recipe_state], [recipe_state, stack], **private
        )
        gr.api(preview, api_name="preview")
        build_btn.click(build_page, [recipe_state, yaml_box], [build_status, build_btn], **private).success(
            build_status_now, recipe_state, [build_status, build_btn], **private
        )
        export_inputs = [yaml_box, dtype_box, repo_box, private_box, hub_token_box, text_only_box]
        export_btn.click(export_merge, [*export_inputs, recipe_state], [export_status, export_file], **private)
        # The HTTP API takes a recipe's YAML (no page state): endpoints without a trigger on the page
        gr.on([], build_model, yaml_box, build_status, api_name="build")
        gr.on([], export_merge, export_inputs, [export_status, export_file], api_name="export")
        slim_btn.click(
            slim, [slim_ref, repo_box, private_box, hub_token_box], [slim_status, slim_file], api_name="slim"
        )
        settings_inputs = [temperature, top_p, max_new, top_k, min_p, rep_pen, seed]
        wire_chat_tab(chat_tab, settings_inputs, seed=seed, pin_seed=pin_seed)
        wire_compare_tab(compare_tab, stack, settings_inputs)
        rp["start"].click(
            load_card,
            [rp["sample"], rp["upload"], rp["user"]],
            [rp["card_state"], rp["summary"], rp["chatbot"]],
            **private,
        )
        rp_inputs = [rp["message"], rp["chatbot"], rp["card_state"], rp["user"], *settings_inputs]
        for trigger in (rp["send"].click, rp["message"].submit):
            rp_outputs = [rp["chatbot"], rp["stats"], rp["message"]]
            trigger(sending(roleplay_chat), rp_inputs, rp_outputs, trigger_mode="multiple", **private)
        for control in share_settings_inputs:
            control.change(share_token, edit_inputs, share_token_box, **private)
        share_token_box.change(None, share_token_box, share_box, js=SHARE_LINK_JS)
        copy_btn.click(None, share_box, share_box, js=COPY_LINK_JS)
        wire_lens_tab(lens, stack, recipe_state)
        wire_eval_tab(eval_tab, eval_tab_item, stack, recipe_state, yaml_box)
        demo.unload(forget_session)
        demo.unload(forget_archives)
    return demo


demo = build_demo()

if __name__ == "__main__":
    opening = default_model()
    if opening.startswith("bundled:") and not bundled.is_cached(opening.removeprefix("bundled:")):
        print("Preparing the bundled default model (once; about 30 s)…", flush=True)
    try:
        with visitor(None):
            model_info(opening)  # the page opens on it: read (or convert) before serving, not on first visit
    except UserError as exc:
        print(f"The default model is unavailable ({exc}); the page will start empty.", flush=True)
    # torch + transformers' model classes take seconds to import: load them while the page opens,
    # not when the visitor first presses Build (handlers that need them wait for this import)
    import_in_background()
    demo.queue(**QUEUE_OPTIONS).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
