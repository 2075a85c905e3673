"""Local lm-eval task definitions for the eval tests: `dataset_path: json` over JSONL files written
on the spot (no Hub), a multiple-choice task and a generation task shaped like the real ones."""

from __future__ import annotations

import json
from pathlib import Path

MC_TASK = "tiny_choice"
GEN_TASK = "tiny_answer"
MC_DOCS = [
    {"question": "The quick brown", "choices": [" fox", " dog", " cat", " hello"], "label": 0},
    {"question": "Hello! How are", "choices": [" you", " fox", " layers", " dog"], "label": 0},
    {"question": "Frankenmerges stack", "choices": [" layers", " fox", " today", " fine"], "label": 0},
    {"question": "I am fine, thank", "choices": [" you", " lazy", " brown", " stack"], "label": 0},
    {"question": "The lazy", "choices": [" dog", " you", " are", " of"], "label": 0},
    {"question": "How are you", "choices": [" today", " fox", " quick", " models"], "label": 0},
]
GEN_DOCS = [
    {"question": "The quick brown fox", "answer": "jumps"},
    {"question": "Hello! How are you", "answer": "today"},
    {"question": "Frankenmerges stack layers of", "answer": "transformer"},
]


def write_tasks(folder: Path) -> Path:
    """Both tasks' YAML and data in `folder` (lm-eval's `include_path`); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in ((MC_TASK, MC_DOCS), (GEN_TASK, GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = {name: json.dumps(str(folder / f"{name}.jsonl")) for name in (MC_TASK, GEN_TASK)}
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data[MC_TASK]}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data[GEN_TASK]}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder
