"""The test bench: building the session's merge, chatting with it (regenerate, continue, edit and
resend, clear), in-character replies for the Roleplay tab, and a side-by-side comparison with a
parent or a second recipe on the same prompt, settings and seed.

Built models live in SESSIONS (merger.runtime.sessions.SessionModels), keyed by the browser session: its
merge under the session id, its comparison model under `<id>:compare`, within one memory budget.
Handlers check what they can refuse here, then stream from a generating function run inside
`gpu_task` (ZeroGPU's `spaces.GPU` on such a Space, in a forked worker), which names the builds it
reads by key and version; the session's Stop closes that stream from here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any

import gradio as gr

from merger.chat.cards import roleplay_prompt, stop_strings
from merger.chat.prompts import format_prompt
from merger.chat.replies import ReplyStats, stream_reply, stream_side_by_side
from merger.errors import UserError
from merger.generate.settings import GenerationSettings
from merger.host import on_zero_gpu
from merger.plan import Plan, as_it_is, make_plan
from merger.plan.counts import count
from merger.recipe import Recipe
from merger.runtime.builds import AOT_COMPILE_SECONDS, Built, attach_aot_step, build, prepare_for_chat, zero_gpu_aot
from merger.runtime.devices import best_device, compile_unavailable, default_budget, needed_bytes
from merger.runtime.sessions import SessionModels
from merger.runtime.zero_gpu import gpu_task, held_build, reply_seconds
from ui.guard import Stopped, check_current, session_id, session_work, stop_session_work, web_handler
from ui.models import as_visitor, model_info, plan_for
from ui.roleplay import card_from_state
from ui.text import md, said, sentence

if TYPE_CHECKING:
    from merger.generate.aot import AotStep

SESSIONS = SessionModels()
STOPS: dict[str, threading.Event] = {}
COMPARE = "compare"
SECOND_RECIPE = "__second_recipe__"  # the comparison target that is the YAML box, not a parent


def slot(request: gr.Request | None, name: str | None = None) -> str:
    """The SESSIONS key of this session's merge, or of one of its other slots."""
    session = session_id(request)
    return session if name is None else f"{session}:{name}"


# ---- building ---------------------------------------------------------------------------------


def build_into(key: str, plan: Plan, progress: gr.Progress) -> Built:
    """Build `plan` for chat under `key`: its previous model freed, room made within the budget
    (least recently used models of others evicted), then assembled on the best device."""
    device = best_device()
    if SESSIONS.budget_bytes is None:  # known only once the device is: set by the first build
        SESSIONS.budget_bytes = default_budget(device)
    progress(0.0, desc="loading parent weights")
    try:
        with SESSIONS.room_for(key, needed_bytes(plan, device)):
            built = prepare_for_chat(build(plan, device=device, progress=lambda f, d: _step(progress, f, d)))
            SESSIONS.put(key, built)
    except UserError as exc:
        raise said(exc) from None
    if zero_gpu_aot():  # after SESSIONS.put: the GPU call's worker finds the build there
        progress(0.9, desc="compiling the fast decode step ahead of time (once per model shape)")
        attach_aot_step(built, lambda: compile_decode_step(key, built.version))
    return built


def _step(progress: gr.Progress, fraction: float, desc: str) -> None:
    check_current()  # each step of a build: it stops when the visitor leaves
    progress(fraction, desc=desc)


@gpu_task(AOT_COMPILE_SECONDS)
def compile_decode_step(key: str, version: int) -> AotStep:
    """On ZeroGPU, in a GPU call: the decode step of the build under `key`, compiled ahead of time
    by the Space's own compiler (torch.compile is forbidden there); the package comes back as bytes."""
    import spaces

    from merger.generate.aot import compile_step

    built = held_build(SESSIONS, key, version)
    return compile_step(
        built.model, built.context_tokens, lambda program: spaces.aoti_compile(program).archive_file.getvalue()
    )


def built_status(built: Built) -> str:
    counts = count(built.plan)
    devices = " + ".join(built.placement.devices) if built.placement else built.device
    dtype = str(built.model.dtype).removeprefix("torch.")
    status = (
        f"Built {counts.num_layers} layers ({counts.total_params:,} parameters, {dtype}) on {devices} "
        f"in {built.seconds:.2f} s."
    )
    if on_zero_gpu():  # no decoder here: each GPU call's worker makes its own
        status += " Replies run on the GPU ZeroGPU lends each of them."
        if built.aot_step is not None:
            status += " Its fast decode step is compiled ahead of time."
        elif built.aot_error:
            status += f" Its decode step could not be compiled ahead of time ({built.aot_error}): replies run slower."
    elif built.device.startswith("cuda") and (why := compile_unavailable()):
        status += f" Its decode step runs uncompiled ({why}): replies replay a CUDA graph instead."
    elif built.decoder.reuses_compiled_step:
        status += " Its fast decode step was compiled for an earlier build of this shape: it serves at once."
    elif built.decoder.compiled:
        status += (
            " Replies start now on the eager step in a CUDA graph; the fast decode step compiles meanwhile "
            "(42-74 s for an 8B model on an H200) and takes over once ready."
        )
    return status


def build_merge(plan: Plan, request: gr.Request | None, progress: gr.Progress) -> str:
    """Assemble the plan on the best device (CUDA when present) for this session's chat."""
    return built_status(build_into(slot(request), plan, progress)) + " Chat below."


@web_handler(work="the build", model_code=True)
@as_visitor
def build_model(
    recipe_yaml: str,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = gr.Progress(),
) -> str:
    """The /build endpoint: a recipe's YAML, built for this session's chat."""
    return build_merge(plan_for(recipe_yaml), request, progress)


def build_notice(request: gr.Request | None, recipe: Recipe | None) -> tuple[Any, Any]:
    """The build status and the Build button for the recipe on the page: while the session's built
    model is another recipe (the stack was edited since), say so and offer Rebuild."""
    built = SESSIONS.get(slot(request))
    if built is None:
        return gr.skip(), gr.skip()
    if recipe is not None and built.plan.recipe.compacted() == recipe.compacted():
        return built_status(built) + " Chat below.", gr.Button(value="Build")
    stale = (
        f"⚠️ The stack has changed since the build: chat still answers with the model built before "
        f"({built.plan.num_layers} layers). Press **Rebuild** to build what the stack shows."
    )
    return stale, gr.Button(value="Rebuild")


def built_for(request: gr.Request | None, name: str | None = None) -> Built:
    """This session's model in a slot, or a message saying how to get one."""
    key = slot(request, name)
    built = SESSIONS.get(key)
    if built is None:
        notice = SESSIONS.notice(key)
        if notice:
            raise said(notice)
        raise gr.Error("Build the comparison first." if name else "Build the merge first: press Build.")
    return built


# ---- chat -------------------------------------------------------------------------------------


def generation_settings(
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
) -> GenerationSettings:
    """The settings panel's values, in the order of the settings inputs in the wiring."""
    return GenerationSettings(  # checks each value's range (an API call can send anything)
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )


def text_of(content: Any) -> str:
    """Chatbot message content arrives as a string or a list of {'type': 'text', 'text': ...} blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content or "")


def turns_of(history: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]


def stream_turns(
    request: gr.Request | None,
    turns: list[dict[str, str]],
    shown: list[dict[str, Any]],
    settings: GenerationSettings,
    *,
    prefix: str = "",
    **prompting: Any,
) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """The conversation on screen (`shown`) plus the session's model's reply (after `prefix`) as it
    streams, then the reply's speed; the session's Stop button, the visitor leaving or the time
    budget ends it."""
    key = slot(request)
    frames = reply_frames(key, built_for(request).version, turns, shown, settings, prefix, prompting)
    yield from until_stopped(frames, stop_event(request), request, "the reply")


def until_stopped(
    frames: Iterator[tuple[Any, Any]], stop: threading.Event, request: gr.Request | None, what: str
) -> Iterator[Any]:
    """The outputs of a GPU call's frames ((outputs, outputs if stopped here) each) until the visitor
    presses Stop: then the last frame's stopped outputs (the speed so far), and the call is closed,
    which ends its generation (in a ZeroGPU worker, at spaces' next item). Past the time budget
    (or when the visitor leaves) the same, with the reason after the speed."""
    with closing(frames), session_work(request, what, current=False) as work:
        for outputs, if_stopped in frames:
            if stop.is_set():
                yield if_stopped
                return
            try:
                work.check()
            except Stopped as exc:
                note = md(sentence(exc))
                yield tuple((f"{o} · {note}" if o else note) if isinstance(o, str) else o for o in if_stopped)
                return
            yield outputs


def stop_event(request: gr.Request | None) -> threading.Event:
    """A fresh Stop for the session's next reply (kept in this process: a GPU worker cannot see it)."""
    stop = STOPS[session_id(request)] = threading.Event()
    return stop


def reply_call_seconds(key: str, version: int, turns, shown, settings: GenerationSettings, *_: Any) -> int:
    """ZeroGPU's duration for `reply_frames`: sized to the max new tokens asked for."""
    return reply_seconds(settings.max_new_tokens)


@gpu_task(reply_call_seconds)
def reply_frames(
    key: str,
    version: int,
    turns: list[dict[str, str]],
    shown: list[dict[str, Any]],
    settings: GenerationSettings,
    prefix: str,
    prompting: dict[str, Any],
) -> Iterator[tuple[tuple[list[dict[str, Any]], str], tuple[list[dict[str, Any]], str]]]:
    """In a GPU call: the reply of the build under `key` as it streams, each frame (the conversation
    with the reply so far and what shows under it, the same with the speed so far); at the end, its
    speed and the step that decoded it. A mistake (too long for the window) is said."""
    try:
        built = held_build(SESSIONS, key, version)
    except UserError as exc:
        raise said(exc) from None
    stats = ReplyStats()

    def frame(reply: str, note: str) -> tuple[tuple[list[dict[str, Any]], str], tuple[list[dict[str, Any]], str]]:
        conversation = [*shown, {"role": "assistant", "content": prefix + reply}]
        return (conversation, note), (conversation, speed_line(stats, settings))

    reply = ""
    try:
        with closing(stream_reply(built, turns, settings, None, stats, **prompting)) as pieces:
            for reply in pieces:
                yield frame(reply, "")
    except UserError as exc:
        raise said(exc) from None
    yield frame(reply, speed_line(stats, settings))


def speed_line(stats: ReplyStats, settings: GenerationSettings) -> str:
    """Under a reply: its speed and the seed that reproduces it."""
    if settings.temperature == 0:
        return f"{stats.summary()} · greedy (temperature 0: the same reply every time)"
    return f"{stats.summary()} · seed {settings.seed}"


def fresh_seed() -> int:
    return secrets.randbelow(2**31)


_replying: set[str] = set()  # sessions with a reply streaming
_replying_changed = threading.Condition()
STOPPING_WAIT_S = 5.0  # how long a new request waits for a reply that Stop has ended to wind down


@contextmanager
def one_reply(request: gr.Request | None) -> Iterator[None]:
    """At most one reply streams per session (one conversation, one Stop button): another request
    meanwhile is refused in words, never dropped unsaid. A reply that Stop has ended is waited for."""
    session = session_id(request)
    with _replying_changed:
        stop = STOPS.get(session)
        if session in _replying and stop is not None and stop.is_set():
            _replying_changed.wait_for(lambda: session not in _replying, timeout=STOPPING_WAIT_S)
        if session in _replying:
            raise said("a reply is still being written: wait for it to end or press Stop, then send again")
        _replying.add(session)
    try:
        yield
    finally:
        with _replying_changed:
            _replying.discard(session)
            _replying_changed.notify_all()


def one_reply_at_a_time(handler: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """`handler` (a streaming handler with a `request` parameter) under `one_reply`."""
    signature = inspect.signature(handler)

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with one_reply(signature.bind(*args, **kwargs).arguments.get("request")):
            yield from handler(*args, **kwargs)

    return guarded


def reply_to(
    message: str, history: list[dict[str, Any]], settings: GenerationSettings, request: gr.Request | None
) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """Stream the built model's reply to `message` after `history`."""
    built_for(request)  # refused here, before any GPU time is asked for
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    turns = [*turns_of(history), {"role": "user", "content": message}]
    yield from stream_turns(request, turns, turns, settings)


@web_handler()
@one_reply_at_a_time
def chat(
    message: str,
    history: list[dict[str, Any]],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    request: gr.Request = None,
):
    """Stream the built model's reply; yields the conversation and the reply's speed after each piece."""
    settings = generation_settings(temperature, top_p, max_new_tokens, top_k, min_p, repetition_penalty, seed)
    yield from reply_to(message, history, settings, request)


# The private handlers below take the settings panel's values as *settings: gradio puts gr.Request
# and gr.EditData into the named parameters before them.
def sending(handler: Callable[..., Iterator[tuple[Any, ...]]]) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """A page's Send for a streaming `handler`: its frames, plus its message box emptied once the
    message is taken; a message refused (while a reply is still being written, say) stays there."""

    @functools.wraps(handler)
    def send(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        taken = False
        for frame in handler(*args, **kwargs):
            yield (*frame, gr.skip() if taken else "")
            taken = True

    send.__name__ = f"send_{handler.__name__}"  # Gradio names endpoints after functions: /chat stays the API's
    return send


@web_handler()
@one_reply_at_a_time
def regenerate(history: list[dict[str, Any]], pinned: bool, request: gr.Request, *settings: Any):
    """Drop the last reply and answer the last user message again, with the settings on screen and a
    new seed unless the seed is pinned; the seed box shows the seed used."""
    turns = list(history or [])
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns:
        raise gr.Error("Nothing to regenerate yet.")
    last = turns.pop()
    options = generation_settings(*settings)
    if not pinned:
        options = dataclasses.replace(options, seed=fresh_seed())
    for frame in reply_to(text_of(last["content"]), turns, options, request):
        yield (*frame, options.seed)


@web_handler()
@one_reply_at_a_time
def continue_reply(history: list[dict[str, Any]], request: gr.Request, *settings: Any):
    """Carry on writing the last reply (cut short by the token limit, or by Stop) where it ended."""
    built = built_for(request)
    turns = turns_of(history)
    if not turns or turns[-1]["role"] != "assistant":
        raise gr.Error("There is no reply to continue yet.")
    prompt = format_prompt(built.tokenizer, turns, continue_last=True, model=built.plan.tokenizer_model.label)
    options = generation_settings(*settings)
    yield from stream_turns(request, turns, history[:-1], options, prefix=turns[-1]["content"], prompt=prompt)


@web_handler()
@one_reply_at_a_time
def edit_and_resend(history: list[dict[str, Any]], edit: gr.EditData, request: gr.Request, *settings: Any):
    """A user message was edited in place: the conversation resumes from it, later turns dropped."""
    index = edit.index if isinstance(edit.index, int) else edit.index[0]
    settings_now = generation_settings(*settings)
    yield from reply_to(text_of(edit.value), list(history or [])[:index], settings_now, request)


@web_handler()
@one_reply_at_a_time
def roleplay_chat(
    message: str,
    history: list[dict[str, Any]],
    card_state: dict[str, Any] | None,
    user: str,
    request: gr.Request,
    *settings: Any,
):
    """One in-character reply, streamed: the card's prompt through the model's chat template (or a
    transcript for base models), stopping where the model would speak for the user."""
    card = card_from_state(card_state)
    built = built_for(request)
    user = (user or "").strip() or "User"
    turns = turns_of(history)
    if turns and turns[0]["role"] == "assistant":
        turns = turns[1:]  # the greeting: roleplay_prompt puts it back as the opening turn
    turns.append({"role": "user", "content": message})
    prompt = roleplay_prompt(built.tokenizer, card, user, turns, model=built.plan.tokenizer_model.label)
    shown = [*(history or []), {"role": "user", "content": message}]
    options = generation_settings(*settings)
    yield from stream_turns(request, turns, shown, options, prompt=prompt, stop_strings=stop_strings(user))


def stop_chat(request: gr.Request) -> None:
    event = STOPS.get(session_id(request))
    if event is not None:
        event.set()


def forget_session(request: gr.Request) -> None:
    """The visitor left: stop their reply and free their models."""
    session = session_id(request)
    event = STOPS.pop(session, None)
    if event is not None:
        event.set()
    stop_session_work(session)
    SESSIONS.drop_session(session)


# ---- side by side -----------------------------------------------------------------------------


def compare_targets(value: dict[str, Any]) -> gr.Dropdown:
    """What the merge can be compared with: each parent in the stack as it is, or a second recipe."""
    choices = [(f"parent: {m.get('label') or m['ref']}", m["ref"]) for m in value.get("models", [])]
    choices.append(("a second recipe (YAML below)", SECOND_RECIPE))
    return gr.Dropdown(choices=choices, value=choices[0][1])


@web_handler(work="the comparison's build", model_code=True)
@as_visitor
def build_comparison(
    target: str | None,
    second_yaml: str,
    request: gr.Request,
    oauth_token: gr.OAuthToken | None = None,
    progress: gr.Progress = gr.Progress(),
) -> str:
    """Build the comparison model for this session: a parent as it is, or the second recipe."""
    if target == SECOND_RECIPE:
        if not (second_yaml or "").strip():
            raise UserError("paste the second recipe's YAML first")
        plan, what = plan_for(second_yaml), "the second recipe"
    elif target:
        plan, what = make_plan(as_it_is(target, model_info), model_info), target.removeprefix("bundled:")
    else:
        raise UserError("pick what to compare with")
    return f"**{md(what)}**: {built_status(build_into(slot(request, COMPARE), plan, progress))}"


@web_handler()
@one_reply_at_a_time
def compare_send(
    message: str,
    merge_history: list[dict[str, Any]],
    other_history: list[dict[str, Any]],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    top_k: int,
    min_p: float,
    repetition_penalty: float,
    seed: int,
    request: gr.Request,
):
    """The message, settings and seed sent to the merge and to the comparison model at once; both
    replies stream next to each other, each under its own speed and the step that decoded it."""
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    held = tuple((slot(request, name), built_for(request, name).version) for name in (None, COMPARE))
    settings = generation_settings(temperature, top_p, max_new_tokens, top_k, min_p, repetition_penalty, seed)
    shown = [[*(h or []), {"role": "user", "content": message}] for h in (merge_history, other_history)]
    yield from until_stopped(side_by_side_frames(held, shown, settings), stop_event(request), request, "the replies")


def side_by_side_seconds(held: tuple[tuple[str, int], ...], shown, settings: GenerationSettings) -> int:
    """ZeroGPU's duration for `side_by_side_frames`: one reply of the max new tokens per column."""
    return reply_seconds(settings.max_new_tokens, replies=len(held))


@gpu_task(side_by_side_seconds)
def side_by_side_frames(
    held: tuple[tuple[str, int], ...], shown: list[list[dict[str, Any]]], settings: GenerationSettings
) -> Iterator[tuple[tuple, tuple]]:
    """In a GPU call: the replies of the builds `held` ((key, version) each) to the same turns,
    streamed next to each other; each frame as `reply_frames`' (both columns and their speeds)."""
    try:
        built = [held_build(SESSIONS, key, version) for key, version in held]
    except UserError as exc:
        raise said(exc) from None
    requests = [(b, turns_of(s), {}) for b, s in zip(built, shown, strict=True)]

    def frame(replies, done: bool) -> tuple[tuple, tuple]:
        chats = [
            [*s, {"role": "assistant", "content": r.text or (f"⚠️ {md(r.error, lines=True)}" if r.error else "")}]
            for s, r in zip(shown, replies, strict=True)
        ]
        speeds = [speed_line(r.stats, settings) if not r.error else "" for r in replies]
        shown_speeds = speeds if done else ["", ""]
        return (*chats, *shown_speeds), (*chats, *speeds)

    replies = None
    with closing(stream_side_by_side(requests, settings)) as frames:
        for replies in frames:
            yield frame(replies, done=False)
    if replies is not None:
        yield frame(replies, done=True)


# ---- layout and wiring ------------------------------------------------------------------------


def build_chat_tab() -> dict[str, Any]:
    """The Chat tab's components, by name."""
    chatbot = gr.Chatbot(
        label="Chat with the merge (edit a message of yours to resend it)",
        height=380,
        elem_id="chatbot",
        editable="user",
    )
    stats = gr.Markdown(elem_id="reply-stats")
    with gr.Row():
        message = gr.Textbox(placeholder="Say something to the merge…", show_label=False, scale=5, elem_id="chat-input")
        send = gr.Button("Send", scale=1, elem_id="send-btn")
        stop = gr.Button("Stop", scale=1, elem_id="stop-btn")
        regenerate_btn = gr.Button("Regenerate", scale=1, elem_id="regen-btn")
        more = gr.Button("Continue", scale=1, elem_id="continue-btn")
        clear = gr.Button("Clear", scale=1, elem_id="clear-btn")
    return {
        "chatbot": chatbot,
        "stats": stats,
        "message": message,
        "send": send,
        "stop": stop,
        "regenerate": regenerate_btn,
        "continue": more,
        "clear": clear,
    }


def build_compare_tab() -> dict[str, Any]:
    """The Side by side tab's components, by name."""
    gr.Markdown(
        "Send one message to the merge and to a parent (or a second recipe) with the same settings and seed; "
        "the replies stream next to each other."
    )
    with gr.Row():
        # custom values too (API callers name a model): build_comparison resolves it under the web policy
        target = gr.Dropdown(label="Compare the merge with", scale=3, elem_id="compare-target", allow_custom_value=True)
        build_btn = gr.Button("Build comparison", scale=1, elem_id="compare-build")
    with gr.Accordion("Second recipe (mergekit YAML)", open=False):
        second = gr.Code(language="yaml", label="Used when 'a second recipe' is picked", interactive=True)
    status = gr.Markdown(elem_id="compare-status")
    with gr.Row():
        with gr.Column():
            merge_chat = gr.Chatbot(label="The merge", height=340, elem_id="compare-merge")
            merge_stats = gr.Markdown(elem_id="compare-merge-stats")
        with gr.Column():
            other_chat = gr.Chatbot(label="Comparison", height=340, elem_id="compare-other")
            other_stats = gr.Markdown(elem_id="compare-other-stats")
    with gr.Row():
        message = gr.Textbox(placeholder="One message to both…", show_label=False, scale=5, elem_id="compare-input")
        send = gr.Button("Send to both", scale=1, elem_id="compare-send")
        stop = gr.Button("Stop", scale=1)
        clear = gr.Button("Clear", scale=1)
    return {
        "target": target,
        "build": build_btn,
        "second": second,
        "status": status,
        "merge_chat": merge_chat,
        "merge_stats": merge_stats,
        "other_chat": other_chat,
        "other_stats": other_stats,
        "message": message,
        "send": send,
        "stop": stop,
        "clear": clear,
    }


def wire_chat_tab(tab: dict[str, Any], settings_inputs: list[Any], *, seed: Any, pin_seed: Any) -> None:
    """`settings_inputs`: the settings panel's controls in generation_settings' order; `seed` is its
    seed box (Regenerate writes the seed it drew there) and `pin_seed` the box that keeps it."""
    private = {"api_visibility": "private"}
    outputs = [tab["chatbot"], tab["stats"]]
    inputs = [tab["message"], tab["chatbot"], *settings_inputs]
    for trigger in (tab["send"].click, tab["message"].submit):
        # "multiple": a message sent while a reply streams reaches the server and is refused in words
        trigger(sending(chat), inputs, [*outputs, tab["message"]], trigger_mode="multiple", **private)
    gr.on([], chat, inputs, outputs, api_name="chat")  # the HTTP API: no page state, no message box
    tab["regenerate"].click(regenerate, [tab["chatbot"], pin_seed, *settings_inputs], [*outputs, seed], **private)
    tab["continue"].click(continue_reply, [tab["chatbot"], *settings_inputs], outputs, **private)
    tab["chatbot"].edit(edit_and_resend, [tab["chatbot"], *settings_inputs], outputs, **private)
    tab["stop"].click(stop_chat, api_name="stop")
    tab["clear"].click(lambda: ([], ""), outputs=outputs, **private)


def wire_compare_tab(tab: dict[str, Any], stack: gr.HTML, settings_inputs: list[Any]) -> None:
    private = {"api_visibility": "private"}
    stack.change(compare_targets, stack, tab["target"], **private)
    tab["build"].click(build_comparison, [tab["target"], tab["second"]], tab["status"], api_name="build_comparison")
    inputs = [tab["message"], tab["merge_chat"], tab["other_chat"], *settings_inputs]
    outputs = [tab["merge_chat"], tab["other_chat"], tab["merge_stats"], tab["other_stats"]]
    for trigger in (tab["send"].click, tab["message"].submit):
        trigger(sending(compare_send), inputs, [*outputs, tab["message"]], trigger_mode="multiple", **private)
    gr.on([], compare_send, inputs, outputs, api_name="compare")  # the HTTP API: no message box
    tab["stop"].click(stop_chat, **private)
    tab["clear"].click(lambda: ([], [], "", ""), outputs=outputs, **private)
