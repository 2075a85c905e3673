"""The app as a ZeroGPU Space runs it (tests/spacekit.py): the real `spaces` package forks a worker
per GPU call and talks to a stand-in device API; Gradio runs handlers in its worker threads, where
spaces' CUDA emulation does not reach; only what a Space installs can be imported."""

import time
import zipfile

import pytest
from evalkit import GEN_TASK, MC_TASK
from gradio_client import Client

from merger.recipe import passthrough

from spacekit import GATED_MODEL, GATED_READER_TOKEN, OPERATOR_TOKEN, SPACE_MODEL

SPLICE = passthrough((SPACE_MODEL, 0, 4), (SPACE_MODEL, 2, 6)).to_yaml()
SHORT = passthrough((SPACE_MODEL, 0, 3)).to_yaml()
GATED = passthrough((GATED_MODEL, 0, 12)).to_yaml()
GREEDY = (0.0, 0.9)  # temperature, top-p; then max new tokens
ANONYMOUS_QUOTA_SECONDS = 120  # ZeroGPU's daily GPU time for a visitor who is not signed in


def visitor(app, **kwargs) -> Client:
    return Client(app.url, verbose=False, **kwargs)


def test_a_build_in_a_gradio_worker_thread_succeeds_without_spending_gpu_time(space_app):
    before = space_app.device.count("/schedule")
    assert "Built 8 layers" in visitor(space_app).predict(SPLICE, api_name="/build")
    assert space_app.device.count("/schedule") == before  # built on the CPU, outside any GPU call


def test_chatting_before_building_is_refused_without_asking_for_a_gpu(space_app):
    before = space_app.device.count("/schedule")
    with pytest.raises(Exception, match="Build the merge first"):
        visitor(space_app).predict("Hello", [], *GREEDY, 8, api_name="/chat")
    assert space_app.device.count("/schedule") == before


def test_a_reply_streams_from_a_gpu_call(space_app):
    client = visitor(space_app)
    client.predict(SHORT, api_name="/build")
    history, speed = client.predict("Hello", [], *GREEDY, 12, api_name="/chat")
    assert history[-1]["role"] == "assistant" and history[-1]["content"]
    assert "tokens/s" in speed
    assert space_app.device.schedules[-1] == round((15 + 12 // 20) * 1.5)  # seconds asked, times the GPU's factor


def test_an_eval_scores_each_model_and_task_in_gpu_calls_sized_to_their_items(space_app):
    before = len(space_app.device.schedules)
    _, results, _ = visitor(space_app).predict(SHORT, [MC_TASK, GEN_TASK], 3, False, [SPACE_MODEL], api_name="/eval")
    assert list(results["models"]) == ["merge", SPACE_MODEL]
    assert {(p["task"], p["items"]) for p in results["paired_differences"]} == {(MC_TASK, 3), (GEN_TASK, 3)}
    # a call per model and task: 15 s, plus for generation 3 items x 12 new tokens at 20 tokens/s, times the
    # factor (a worker forked before the parent was built refuses, and that call runs again in a fresh fork)
    asked = space_app.device.schedules[before:]
    multiple_choice, generation = round(15 * 1.5), round((15 + 3 * 12 // 20) * 1.5)
    assert set(asked) == {multiple_choice, generation}
    assert asked.count(generation) == 2 and asked.count(multiple_choice) >= 2


def streamed(job, frames: int = 2, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < frames:
        assert not job.done(), f"the reply ended before {frames} frames: {job.outputs()}"
        assert time.monotonic() < deadline, "no streamed frames"
        time.sleep(0.05)


def test_stop_ends_a_reply_running_in_a_gpu_worker_and_a_default_reply_fits_the_quota(space_app):
    client = visitor(space_app)
    client.predict(SHORT, api_name="/build")
    job = client.submit("Tell me a long story", [], *GREEDY, 200, api_name="/chat")  # the page's default length
    streamed(job)
    failed = space_app.device.failed_releases  # a stale worker's refusal, if any, came before the first frame
    client.predict(api_name="/stop")
    history, speed = job.result(timeout=60)
    tokens = int(speed.split(" tokens")[0].rsplit("· ", 1)[1])
    assert 0 < tokens < 200 and history[-1]["content"]  # unstopped, this model writes all 200
    assert space_app.device.failed_releases == failed  # the worker ended the call cleanly
    assert space_app.device.schedules[-1] == 38 <= ANONYMOUS_QUOTA_SECONDS  # 25 s asked, times 1.5


def test_side_by_side_streams_both_replies_in_one_gpu_call_within_the_quota(space_app):
    client = visitor(space_app)
    client.predict(SPLICE, api_name="/build")
    assert "Built 6 layers" in client.predict(SPACE_MODEL, "", api_name="/build_comparison")
    before = space_app.device.count("/schedule")
    # the tiny model's window holds 256 tokens, on the CPU as on a GPU: the longest replies that fit it
    job = client.submit("Hello", [], [], *GREEDY, 200, 0, 0.0, 1.0, 0, api_name="/compare")
    streamed(job)
    client.predict(api_name="/stop")  # long replies: no need to wait for them
    merge, other, merge_speed, other_speed = job.result(timeout=60)
    assert merge[-1]["content"] and other[-1]["content"]
    assert "tokens/s" in merge_speed and "tokens/s" in other_speed
    assert space_app.device.count("/schedule") == before + 1
    assert space_app.device.schedules[-1] <= ANONYMOUS_QUOTA_SECONDS  # two 200-token replies, times 1.5


def test_one_visitors_build_does_not_retire_another_visitors_gpu_worker(space_app):
    alice, bob = visitor(space_app), visitor(space_app)
    alice.predict(SHORT, api_name="/build")
    alice.predict("Hi", [], *GREEDY, 4, api_name="/chat")
    forks = space_app.device.count("/allow")  # each fresh worker asks the device API once
    bob.predict(SPLICE, api_name="/build")
    alice.predict("Hi again", [], *GREEDY, 4, api_name="/chat")
    assert space_app.device.count("/allow") == forks  # Alice's worker still holds her build: reused
    alice.predict(SPLICE, api_name="/build")
    alice.predict("And now?", [], *GREEDY, 4, api_name="/chat")
    assert space_app.device.count("/allow") == forks + 1  # her rebuild: that worker refused, a fresh one answered


def test_export_and_slim_work_without_signing_in_and_publishing_asks_for_a_sign_in(space_app):
    client = visitor(space_app)
    # the page's token box is hidden on a Space: it sends no value
    status, archive = client.predict(SHORT, "bfloat16", "", False, None, api_name="/export")
    assert "Download it below" in status
    with zipfile.ZipFile(archive) as z:
        assert {"config.json", "model.safetensors"} <= set(z.namelist())
    with pytest.raises(Exception, match=r"[Ss]ign in with Hugging Face"):
        client.predict(SHORT, "bfloat16", "my-merge", False, None, api_name="/export")
    status, archive = client.predict(SPACE_MODEL, "", False, None, api_name="/slim")
    assert "Nothing to remove" in status and archive is None


def test_a_gated_model_opens_with_the_visitors_sign_in_and_for_no_one_else(space_app):
    with pytest.raises(Exception, match="is gated"):
        visitor(space_app).predict(GATED, api_name="/preview")  # not with the Space's own token either
    signed_in = visitor(space_app, oauth_token=GATED_READER_TOKEN)
    assert signed_in.predict(GATED, api_name="/preview")["num_layers"] == 12
    assert "Built 12 layers" in signed_in.predict(GATED, api_name="/build")
    with pytest.raises(Exception, match="is gated"):
        visitor(space_app).predict(GATED, api_name="/preview")  # the signed-in visitor's answer is theirs
    log = space_app.log()
    assert GATED_READER_TOKEN not in log and OPERATOR_TOKEN not in log
    users = {r.user for r in space_app.hub.requests if GATED_MODEL in r.path}
    assert users <= {None, "visitor"}  # the Space's token was never sent
