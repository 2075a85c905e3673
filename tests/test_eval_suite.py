"""Which tasks an eval runs: names checked, and a task whose data cannot load named in one sentence
beside the tasks defined on this machine."""

import pytest
from evalkit import GEN_TASK, MC_TASK

from merger.errors import UserError
from merger.eval.suite import TASK_FOLDERS_VARIABLE, load_tasks, parse_task_names, why_not_loaded


def test_task_names_are_read_once_each_and_anything_else_is_refused():
    assert parse_task_names("gsm8k, arc_challenge gsm8k") == ["gsm8k", "arc_challenge"]
    assert parse_task_names(["hellaswag", " ", "hellaswag"]) == ["hellaswag"]
    with pytest.raises(UserError, match="at least one task"):
        parse_task_names("  ")
    with pytest.raises(UserError, match="is not an lm-eval task name"):
        parse_task_names(["<img src=x>"])
    with pytest.raises(UserError, match="more than the 16 tasks"):
        parse_task_names([f"task{i}" for i in range(17)])


def test_a_task_whose_data_cannot_load_is_named_beside_the_local_tasks(tmp_path, monkeypatch, eval_tasks):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "offline_task.yaml").write_text(
        "task: offline_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\ndoc_to_target: 0\n'
    )
    monkeypatch.setenv(TASK_FOLDERS_VARIABLE, f"{eval_tasks}:{broken}")
    with pytest.raises(UserError) as refused:
        load_tasks([MC_TASK, "offline_task"])
    said = str(refused.value)
    assert said.startswith("these tasks could not load: offline_task (") and "missing.jsonl" in said
    assert said.endswith(f"; tasks defined on this machine: offline_task, {GEN_TASK}, {MC_TASK}")
    # an lm-eval task's data is on the Hub: offline, that is the reason given
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reason = why_not_loaded(ConnectionError("offline mode is enabled"), on_hub=True)
    assert reason == "its data is on the Hub, which cannot be reached from here"
