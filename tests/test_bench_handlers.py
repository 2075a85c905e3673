"""The test bench's handlers below the page: continue a reply, edit and resend a message, the
messages a visitor reads, and the ZeroGPU wrapping (a stand-in `spaces` package)."""

import io
import sys
import threading
import types
from types import SimpleNamespace

import gradio as gr
import pytest

from merger.chat.prompts import format_prompt
from merger.chat.replies import stream_reply
from merger.generate import aot as aot_step
from merger.generate import loop
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import builds, devices
from merger.runtime import zero_gpu as zero_gpu_module
from ui import chat as bench

from refs import ANY_PATH

GREEDY = (0.0, 0.9, 10, 0, 0.0, 1.0, 0)  # temperature, top-p, max new tokens, top-k, min-p, penalty, seed


def no_progress(fraction, desc=None):
    pass


@pytest.fixture
def visitor(tiny_llama):
    request = SimpleNamespace(session_hash="bench-visitor")
    plan = make_plan(passthrough((str(tiny_llama), 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH)
    built = bench.build_into(bench.slot(request), plan, no_progress)
    yield request, built
    bench.SESSIONS.drop_session("bench-visitor")


def last_frame(frames):
    *_, (history, speed) = frames
    return history, speed


def test_continue_appends_to_the_last_reply_what_the_model_writes_next(visitor):
    request, built = visitor
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "The quick"}]
    shown, speed = last_frame(bench.continue_reply(history, request, *GREEDY))
    prompt = format_prompt(built.tokenizer, history, continue_last=True)
    *_, more = stream_reply(built, history, bench.generation_settings(*GREEDY), prompt=prompt)
    assert shown == [history[0], {"role": "assistant", "content": "The quick" + more}]
    assert "tokens/s" in speed


def test_continue_needs_a_reply_to_continue(visitor):
    request, _ = visitor
    with pytest.raises(gr.Error, match="no reply to continue"):
        next(bench.continue_reply([{"role": "user", "content": "Hi"}], request, *GREEDY))


def test_editing_a_message_resends_it_and_drops_what_came_after(visitor):
    request, _ = visitor
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once upon a time"},
    ]
    edit = gr.EditData(None, {"index": 2, "value": "Tell me a joke", "previous_value": "Tell me a story"})
    edited, _ = last_frame(bench.edit_and_resend(history, edit, request, *GREEDY))
    resent, _ = last_frame(bench.chat("Tell me a joke", history[:2], *GREEDY, request=request))
    assert edited == resent and edited[2] == {"role": "user", "content": "Tell me a joke"} and len(edited) == 4


SAMPLED = (1.0, 1.0, 12, 0, 0.0, 1.0, 0)  # temperature 1: the seed decides the reply


def test_a_message_sent_while_a_reply_streams_is_refused_in_words_and_stays_in_the_box(visitor):
    request, _ = visitor
    streaming = bench.sending(bench.chat)("Hello", [], *SAMPLED, request=request)
    *_, box = next(streaming)
    assert box == ""  # the first message was taken
    second = bench.sending(bench.chat)("And another thing", [], *SAMPLED, request=request)
    with pytest.raises(gr.Error, match="A reply is still being written: wait for it to end or press Stop"):
        next(second)  # refused before any frame: the box keeps the message
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    for other in (  # every other way to ask for a reply meanwhile: refused in words too
        bench.regenerate(history, False, request, *SAMPLED),
        bench.compare_send("Hi", [], [], *SAMPLED, request=request),
        bench.roleplay_chat("Hi", [], None, "Ann", request, *SAMPLED),
    ):
        with pytest.raises(gr.Error, match="still being written"):
            next(other)
    *_, (history, speed, _) = streaming  # the first reply ends as it would have
    assert "tokens/s" in speed
    *_, (history, speed, _) = bench.sending(bench.chat)("And another thing", history, *SAMPLED, request=request)
    assert bench.text_of(history[-2]["content"]) == "And another thing" and "tokens/s" in speed


def test_stop_then_send_waits_for_the_stopped_reply_instead_of_refusing(visitor):
    request, _ = visitor
    streaming = bench.chat("Hello", [], *SAMPLED, request=request)
    next(streaming)
    bench.stop_chat(request)
    threading.Timer(0.2, streaming.close).start()  # the stopped reply winds down meanwhile
    *_, (_, speed) = bench.chat("Hello again", [], *SAMPLED, request=request)
    assert "tokens/s" in speed


def test_regenerate_draws_a_new_seed_shows_it_and_repeats_its_reply_when_pinned(visitor):
    request, _ = visitor
    *_, (history, speed) = bench.chat("Tell me a story.", [], *SAMPLED, request=request)
    assert speed.endswith("· seed 0")
    *_, (again, speed, seed) = bench.regenerate(history, False, request, *SAMPLED)
    assert seed != 0 and speed.endswith(f"· seed {seed}")
    assert again[-1] != history[-1]  # a new seed, a new reply
    reproduced = (*SAMPLED[:-1], seed)
    *_, (by_seed, _) = bench.chat("Tell me a story.", [], *reproduced, request=request)
    assert by_seed == again  # the seed shown reproduces the reply
    *_, (pinned, speed, kept) = bench.regenerate(again, True, request, *reproduced)
    assert kept == seed and pinned == again and speed.endswith(f"· seed {seed}")
    *_, (_, speed) = bench.chat("Hi", [], *GREEDY, request=request)
    assert "greedy" in speed


def test_chat_before_any_build_says_to_build():
    with pytest.raises(gr.Error, match="Build the merge first"):
        next(bench.chat("Hi", [], *GREEDY, request=SimpleNamespace(session_hash="never-built")))


def test_comparing_before_the_comparison_is_built_says_to_build_it(visitor):
    request, _ = visitor
    with pytest.raises(gr.Error, match="Build the comparison first"):
        next(bench.compare_send("Hi", [], [], *GREEDY, request=request))


def test_comparison_of_a_path_outside_the_allow_list_is_refused(visitor):
    request, _ = visitor
    with pytest.raises(gr.Error, match="absolute paths are not allowed here"):
        bench.build_comparison("/etc", "", request, progress=no_progress)


def test_leaving_the_page_frees_both_of_the_visitors_models(visitor):
    request, built = visitor
    other = bench.build_into(bench.slot(request, bench.COMPARE), built.plan, no_progress)
    bench.forget_session(request)
    assert bench.SESSIONS.get("bench-visitor") is None and bench.SESSIONS.get("bench-visitor:compare") is None
    assert built.model is None and other.model is None


@pytest.fixture
def zero_gpu(monkeypatch):
    """A ZeroGPU Space, as far as our code can tell: the variable set and a `spaces` package whose
    GPU decorator records the durations it is asked for."""
    asked: list[int] = []

    def gpu(duration):
        def wrap(fn):
            def run(*args, **kwargs):
                asked.append(duration(*args, **kwargs) if callable(duration) else duration)
                return fn(*args, **kwargs)

            return run

        return wrap

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    return asked


def test_on_zero_gpu_a_reply_asks_for_gpu_time_sized_to_its_tokens(zero_gpu):
    def frames(key, version, turns, shown, settings, prefix, prompting):
        yield "reply"

    wrapped = zero_gpu_module.gpu_task(bench.reply_call_seconds)(frames)
    settings = bench.generation_settings(0.7, 0.9, 400)
    assert list(wrapped("visitor", 1, [], [], settings, "", {})) == ["reply"]
    assert zero_gpu == [zero_gpu_module.reply_seconds(400)] and zero_gpu[0] == 15 + 400 // 20
    assert devices.best_device() == "cpu"  # the GPU exists only inside GPU calls: builds wait on the CPU
    assert devices.free_memory("cuda") == devices.ZERO_GPU_DEFAULT_GB * 2**30


@pytest.mark.parametrize(("factor", "longest"), [(1.0, 117), (1.5, 80)])
def test_on_zero_gpu_no_reply_asks_for_more_than_an_anonymous_visitors_daily_quota(monkeypatch, factor, longest):
    monkeypatch.setattr(zero_gpu_module, "duration_factor", lambda: factor)
    assert zero_gpu_module.reply_seconds(200) == 25  # the page's default reply: well inside
    assert zero_gpu_module.reply_seconds(1024, replies=2) == longest  # two of the longest, side by side
    assert longest * factor <= 120  # spaces multiplies by the factor before asking


def test_on_zero_gpu_replies_run_in_the_callers_thread_uncompiled(zero_gpu, tiny_llama):
    built = builds.build(make_plan(passthrough((str(tiny_llama), 0, 6)), ANY_PATH), device="cpu")
    threads = threading.active_count()
    *_, reply = stream_reply(built, [{"role": "user", "content": "Hi"}], bench.generation_settings(*GREEDY))
    assert reply and not built.decoder.compiled and not built.decoder._threaded
    assert threading.active_count() == threads  # a forked GPU worker has no thread of ours to hand work to


@pytest.fixture
def spaces_compiler(zero_gpu, monkeypatch):
    """The stand-in `spaces` with an AOT compiler that records the programs it is given, a load
    check that passes its packages, and the opt-in to use it set."""
    programs = []

    def aoti_compile(program):
        programs.append(program)
        return SimpleNamespace(archive_file=io.BytesIO(f"package {len(programs)}".encode()))

    sys.modules["spaces"].aoti_compile = aoti_compile
    monkeypatch.setattr(aot_step, "LOAD_PACKAGE", "pass")
    monkeypatch.setenv("FRANKENMERGE_ZERO_GPU_AOT", "1")
    return programs


def test_on_zero_gpu_a_build_gets_a_decode_step_compiled_ahead_of_time_once_per_structure(
    spaces_compiler, tiny_llama, tiny_llama_b
):
    def merge(key, ref, *ranges):
        return bench.build_into(
            key, make_plan(passthrough(*[(str(ref), a, b) for a, b in ranges]), ANY_PATH), no_progress
        )

    first = merge("zero-a", tiny_llama, (0, 4), (2, 6))
    again = merge("zero-b", tiny_llama_b, (0, 4), (2, 6))  # the same structure, other weights
    reseamed = merge("zero-c", tiny_llama, (0, 5), (3, 6))  # the same depth, other layers repeated
    try:
        assert [type(p).__name__ for p in spaces_compiler] == ["ExportedProgram", "ExportedProgram"]
        assert first.aot_step.package == b"package 1" and again.aot_step is first.aot_step
        assert reseamed.aot_step.package == b"package 2"
        assert first._decoder is None  # made in each GPU call's worker, never in the main process
        assert "compiled ahead of time" in bench.built_status(first)
    finally:
        for key in ("zero-a", "zero-b", "zero-c"):
            bench.SESSIONS.drop_session(key)


def refuse_to_compile(monkeypatch):
    def refuse(program):
        raise RuntimeError("no AOT for this one")

    monkeypatch.setattr(sys.modules["spaces"], "aoti_compile", refuse)


def crash_the_loader(monkeypatch):  # as AOTInductor's loader does on the H200 (torch 2.11)
    monkeypatch.setattr(aot_step, "LOAD_PACKAGE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [(refuse_to_compile, "no AOT for this one"), (crash_the_loader, "loader crashed (SIGSEGV)")],
)
def test_on_zero_gpu_a_step_that_fails_to_compile_or_load_leaves_replies_eager_and_says_why(
    spaces_compiler, tiny_llama, monkeypatch, failure, reason
):
    failure(monkeypatch)
    ref = str(tiny_llama)
    built = bench.build_into("zero-d", make_plan(passthrough((ref, 1, 6)), ANY_PATH), no_progress)
    try:
        assert built.aot_step is None and reason in built.aot_error
        assert "replies run slower" in bench.built_status(built)
        *_, reply = stream_reply(built, [{"role": "user", "content": "Hi"}], bench.generation_settings(*GREEDY))
        assert reply
    finally:
        bench.SESSIONS.drop_session("zero-d")


def test_off_zero_gpu_the_handlers_are_the_functions_themselves(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    handler = lambda: None  # noqa: E731
    assert zero_gpu_module.gpu_task(60)(handler) is handler


@pytest.mark.parametrize(
    ("compiled", "reuses", "expected"),
    [
        (True, False, "Replies start now on the eager step in a CUDA graph; the fast decode step compiles meanwhile"),
        (True, True, "compiled for an earlier build of this shape: it serves at once"),
        (False, False, None),
    ],
)
def test_build_status_says_replies_start_at_once_and_what_serves_them(visitor, compiled, reuses, expected):
    _, built = visitor
    decoder = SimpleNamespace(compiled=compiled, reuses_compiled_step=reuses)
    status = bench.built_status(SimpleNamespace(**{**vars(built), "decoder": decoder}))
    assert status.startswith("Built 8 layers")
    if expected is None:
        assert "compil" not in status
    else:
        assert expected in status


def test_a_replys_status_says_which_step_decoded_it(visitor):
    request, built = visitor
    *_, (history, status) = bench.chat("Hello", [], *GREEDY, request=request)
    assert history[-1]["content"] and " tokens/s · on the eager step · " in status  # the CPU's
    bench.build_into(bench.slot(request, bench.COMPARE), built.plan, no_progress)
    *_, (*_, merge_status, other_status) = bench.compare_send("Hello", [], [], *GREEDY, request=request)
    assert "· on the eager step · " in merge_status and "· on the eager step · " in other_status


def test_without_a_c_compiler_a_gpu_build_replays_a_cuda_graph_and_says_why(visitor, monkeypatch):
    _, built = visitor
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # a Space image without gcc
    made = []
    monkeypatch.setattr(loop, "ModelDecoder", lambda model, **options: made.append(options) or SimpleNamespace())
    on_gpu = builds.Built(plan=built.plan, model=built.model, tokenizer=None, device="cuda", seconds=0.1)
    assert on_gpu.decoder is not None and made[-1]["compile"] is False
    status = bench.built_status(on_gpu)
    assert "runs uncompiled (no C compiler on this machine, which torch.compile needs)" in status
    assert "replay a CUDA graph" in status
