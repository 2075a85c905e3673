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
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from merger import bundled
from merger.catalog import list_allowed_folders
from merger.chat import GenerationSettings, setting_ranges
from merger.errors import PlacementError, UserError
from merger.export import export_plan
from merger.hub import current_token, push_folder
from merger.params import count, human_bytes, human_params
from merger.plan import make_plan
from merger.recipe import from_share_token, recipe_from_yaml, to_share_token
from merger.runtime import free_memory, plan_placement
from merger.slim import slim_model
from merger.space import DEFAULT_HUB_MODEL, HUB_MODELS, on_space
from merger.startup import import_in_background
from merger.zero_gpu import on_zero_gpu
from ui.chat import (
    build_chat_tab,
    build_compare_tab,
    build_model,
    forget_session,
    roleplay_chat,
    wire_chat_tab,
    wire_compare_tab,
)
from ui.guard import check_current, session_id, web_handler
from ui.lens import build_lens_tab, wire_lens_tab
from ui.models import POLICY, as_visitor, model_info, plan_for, visitor
from ui.placement import placement_markdown, refusal_markdown
from ui.recipe_value import column, recipe_from_value, value_from_recipe
from ui.roleplay import build_roleplay_tab, load_card
from ui.stack import stack_widget
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


# ---- handlers -------------------------------------------------------------------------------


def preview_counts(recipe_yaml: str) -> dict[str, Any]:
    """Counts of the merge a recipe describes, from metadata alone (a mistake is a UserError)."""
    plan = plan_for(recipe_yaml)
    return {**count(plan).as_dict(), "seams": plan.seams(), "notes": plan.recipe.notes}


@web_handler(work="the preview")
@as_visitor
def preview(recipe_yaml: str, oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """Counts of the merge a recipe describes, from metadata alone."""
    return preview_counts(recipe_yaml)


def preview_markdown(counts: dict[str, Any]) -> str:
    parents = ", ".join(f"{md(ref.removeprefix('bundled:'))} {n:,}" for ref, n in counts["parent_params"].items())
    seams = len(counts["seams"])
    blended = f", {human_bytes(counts['blend_bytes'])} of it blended or scaled tensors" if counts["blend_bytes"] else ""
    return (
        f"### {counts['total_params']:,} parameters ({human_params(counts['total_params'])})\n"
        f"**{counts['num_layers']} layers** · {counts['dtype']} · export size {human_bytes(counts['bytes'])} · "
        f"memory when built {human_bytes(counts['memory_bytes'])} (duplicated layers share tensors{blended}) · "
        f"{seams} seam{'s' if seams != 1 else ''}  \nparents: {parents}"
        + "".join(f"  \nNote: {note}." for note in counts.get("notes", ()))
    )


@web_handler()
@as_visitor
def placement_preview(value: dict[str, Any], oauth_token: gr.OAuthToken | None = None) -> str:
    """Where a build of the stack would go on this machine and the memory per device (apart from
    the counts: it reads the devices' free memory)."""
    try:
        plan = make_plan(recipe_from_value(value), model_info)
    except UserError:
        return ""  # the preview already says what is wrong
    try:
        text = placement_markdown(plan_placement(plan))
    except PlacementError as exc:
        return refusal_markdown(str(exc))
    if on_zero_gpu():  # held there between replies; each reply runs on the card ZeroGPU lends it
        text += f"; replies run on ZeroGPU's {human_bytes(free_memory('cuda'))} GPU"
    return text


@web_handler(work="the preview")
@as_visitor
def on_stack_change(value: dict[str, Any], oauth_token: gr.OAuthToken | None = None) -> tuple[str, str]:
    """The widget changed: new YAML and a new preview (a mistake is said in the preview's place)."""
    try:
        recipe = recipe_from_value(value)
        yaml_text = recipe.to_yaml()
        return yaml_text, preview_markdown(preview_counts(yaml_text))
    except UserError as exc:
        return gr.skip(), f"⚠️ {md(exc)}"


@web_handler(work="the preview")
@as_visitor
def apply_yaml(
    recipe_yaml: str, value: dict[str, Any], oauth_token: gr.OAuthToken | None = None
) -> tuple[dict[str, Any], str]:
    """Pasted YAML replaces the stack; its models become the columns."""
    try:
        recipe = recipe_from_yaml(recipe_yaml)
        columns = [column(model_info(ref)) for ref in recipe.models]
        return value_from_recipe(recipe, columns), preview_markdown(preview_counts(recipe_yaml))
    except UserError as exc:
        return gr.skip(), f"⚠️ {md(exc)}"


@web_handler(work="adding the model")
@as_visitor
def add_model(
    ref: str, value: dict[str, Any], oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = gr.Progress()
) -> tuple[dict[str, Any], str]:
    ref = (ref or "").strip()
    name = ref.removeprefix("bundled:")
    if ref.startswith("bundled:") and name in bundled.MODELS and not bundled.is_cached(name):
        progress(0.1, desc="First use: converting the bundled model to safetensors (about a minute)")
    try:
        info = model_info(ref)
    except UserError as exc:
        return gr.skip(), f"⚠️ {md(exc)}"
    columns = [c for c in value.get("models", []) if c["ref"] != info.ref] + [column(info)]
    added = f"Added **{md(info.label)}**: {info.num_layers} layers, {md(info.architecture)}."
    return {**value, "models": columns}, added


DEFAULT_SETTINGS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}


def default_value() -> dict[str, Any]:
    info = model_info(default_model())
    return {
        "models": [column(info)],
        "slices": [{"model": info.ref, "start": 0, "end": info.num_layers, "repeat": 1}],
    }


def shared_settings(shared: dict[str, Any]) -> dict[str, Any]:
    """The page's settings a share link carries, each checked against its slider's range."""
    settings = {**DEFAULT_SETTINGS, **{k: shared[k] for k in DEFAULT_SETTINGS if k in shared}}
    GenerationSettings(**settings)  # a UserError for NaN, 1e308, 10**12 ...
    return settings


@web_handler(work="opening the page")
@as_visitor
def initial_state(
    request: gr.Request, oauth_token: gr.OAuthToken | None = None
) -> tuple[dict[str, Any], str, float, float, int]:
    """The stack a visit opens on: the recipe of a share link (`?r=`), else the default model."""
    token = request.query_params.get("r") if request else None
    settings = dict(DEFAULT_SETTINGS)
    notice = ""
    try:
        if token:
            try:
                recipe, shared = from_share_token(token)
                settings = shared_settings(shared)
                value = value_from_recipe(recipe, [column(model_info(ref)) for ref in recipe.models])
                notice = "Opened a shared recipe."
            except UserError as exc:
                value, notice, settings = default_value(), f"⚠️ {md(exc)}", dict(DEFAULT_SETTINGS)
        else:
            value = default_value()
    except UserError as exc:  # e.g. the Hub does not answer: start empty, say why
        value, notice = {"models": [], "slices": []}, f"⚠️ {md(exc)}. Add a model above."
    return value, notice, settings["temperature"], settings["top_p"], int(settings["max_new_tokens"])


@web_handler()
def share_token(value: dict[str, Any], temperature: float, top_p: float, max_new_tokens: int) -> str:
    """The share-link token of the stack and settings on screen ('' while the stack is not a recipe)."""
    try:
        recipe = recipe_from_value(value)
    except UserError:
        return ""
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    return to_share_token(recipe, settings)


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
    scratch directory, then offer and publish the result; the folder is removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="frankenmerge-"))
    try:
        head, folder, nbytes = write(work / "frankenmerge")
        if folder is None:
            return head, None
        lines, archive = deliver(folder, nbytes, repo_name, private, request, progress)
        return " ".join([head, *lines]), archive
    finally:
        shutil.rmtree(work, ignore_errors=True)


@web_handler(work="the export", model_code=True)
def export_merge(
    recipe_yaml: str,
    dtype: str,
    repo_name: str,
    private: bool,
    token_text: str,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, str | None]:
    """Write the merge as a Hugging Face folder; offer it as an archive when small enough and
    publish it when a repo name is given. The visitor's sign-in (or pasted token) is used for this
    call only."""
    with visitor(oauth_token, token_text):
        plan = make_plan(recipe_from_yaml(recipe_yaml).model_copy(update={"dtype": dtype or None}), model_info)

        def write(folder: Path) -> tuple[str, Path | None, int]:
            result = export_plan(plan, folder, progress=bytes_progress(progress))
            head = f"Exported {human_bytes(result.bytes)} in {len(result.shards)} shard(s) in {result.seconds:.1f} s."
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
        placement_md = gr.Markdown(elem_id="placement")
        with gr.Accordion("Recipe (mergekit YAML)", open=False):
            yaml_box = gr.Code(
                language="yaml",
                label="Paste a mergekit config and press Apply",
                interactive=True,
                elem_id="recipe-yaml",
            )
            apply_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
        with gr.Row():
            share_box = gr.Textbox(label="Share link (reopens this recipe)", elem_id="share-link", scale=5)
            copy_btn = gr.Button("Copy link", scale=1, elem_id="copy-link")
            share_token_box = gr.Textbox(visible=False)
        with gr.Row():
            build_btn = gr.Button("Build", variant="primary", elem_id="build-btn")
        build_status = gr.Markdown(elem_id="build-status")
        with gr.Accordion("Export and publish", open=False):
            with gr.Row():
                export_dtype = gr.Dropdown(["bfloat16", "float16", "float32"], value="bfloat16", label="dtype")
                repo_box = gr.Textbox(label="Publish as (repo name; empty: download only)", scale=2)
                private_box = gr.Checkbox(label="Private repo", value=True)
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
        with gr.Accordion("Generation settings", open=False):
            temperature = setting_slider("temperature", 0.05, value=0.7, label="Temperature (0 = greedy)")
            top_p = setting_slider("top_p", 0.05, value=0.9, label="Top-p")
            max_new = setting_slider("max_new_tokens", 1, value=200, label="Max new tokens", elem_id="max-new-tokens")
            top_k = setting_slider("top_k", 1, value=0, label="Top-k (0 = off)")
            min_p = setting_slider("min_p", 0.01, value=0.0, label="Min-p (0 = off)")
            rep_pen = setting_slider("repetition_penalty", 0.01, value=1.0, label="Repetition penalty")
            seed = gr.Number(value=0, precision=0, label="Seed")

        # ---- wiring ----
        demo.load(initial_state, outputs=[stack, model_msg, temperature, top_p, max_new], api_visibility="private")
        add_btn.click(add_model, [ref_box, stack], [stack, model_msg], api_visibility="private")
        stack.change(on_stack_change, stack, [yaml_box, preview_md], api_visibility="private")
        stack.change(placement_preview, stack, placement_md, api_visibility="private")
        apply_btn.click(apply_yaml, [yaml_box, stack], [stack, preview_md], api_visibility="private")
        gr.api(preview, api_name="preview")
        build_btn.click(build_model, yaml_box, build_status, api_name="build")
        export_btn.click(
            export_merge,
            [yaml_box, export_dtype, repo_box, private_box, hub_token_box],
            [export_status, export_file],
            api_name="export",
        )
        slim_btn.click(
            slim, [slim_ref, repo_box, private_box, hub_token_box], [slim_status, slim_file], api_name="slim"
        )
        settings_inputs = [temperature, top_p, max_new, top_k, min_p, rep_pen, seed]
        wire_chat_tab(chat_tab, settings_inputs)
        wire_compare_tab(compare_tab, stack, settings_inputs)
        rp["start"].click(
            load_card,
            [rp["sample"], rp["upload"], rp["user"]],
            [rp["card_state"], rp["summary"], rp["chatbot"]],
            api_visibility="private",
        )
        rp_inputs = [rp["message"], rp["chatbot"], rp["card_state"], rp["user"], *settings_inputs]
        for trigger in (rp["send"].click, rp["message"].submit):
            trigger(roleplay_chat, rp_inputs, [rp["chatbot"], rp["stats"]], api_visibility="private").then(
                lambda: "", outputs=rp["message"], api_visibility="private"
            )
        share_inputs = [stack, temperature, top_p, max_new]
        for control in share_inputs:
            control.change(share_token, share_inputs, share_token_box, api_visibility="private")
        share_token_box.change(None, share_token_box, share_box, js=SHARE_LINK_JS)
        copy_btn.click(None, share_box, share_box, js=COPY_LINK_JS)
        wire_lens_tab(lens, stack)
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
