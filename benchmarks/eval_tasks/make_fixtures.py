"""Writes the benchmark's local lm-eval tasks: the quick suite's five tasks in the shape of the real
ones (prompt formats, few-shot counts, choices, generation lengths and stop strings, item lengths
in words), over synthetic text, since the machines that run the benchmark cannot reach the Hub.

    python benchmarks/eval_tasks/make_fixtures.py   # rewrites the *.yaml and *.jsonl beside it
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out about who them "
    "time can only new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three water number apples train miles hours price total cost"
)
WORDS = WORDS_TEXT.split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def paragraph(rng: random.Random, words: int) -> str:
    parts, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 18))
        parts.append(sentence(rng, n))
        left -= n
    return " ".join(parts)


def write(name: str, splits: dict[str, list[dict]], yaml_text: str) -> None:
    files = {}
    for split, docs in splits.items():
        path = HERE / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[split] = path.name
    data_files = "".join(f"    {split}: {json.dumps(file)}\n" for split, file in files.items())
    (HERE / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{data_files}" + yaml_text
    )


def main() -> None:
    rng = random.Random(0)
    # IFEval: 0-shot instructions of about 40-80 words, up to 1,280 new tokens, no stop string
    ifeval = [{"prompt": paragraph(rng, rng.randint(40, 80)), "key": i} for i in range(40)]
    write(
        "bench_ifeval",
        {"test": ifeval},
        "test_split: test\noutput_type: generate_until\nnum_fewshot: 0\ndoc_to_text: prompt\ndoc_to_target: 0\n"
        "generation_kwargs:\n  until: []\n  do_sample: false\n  temperature: 0.0\n  max_gen_toks: 1280\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    )

    # GSM8K: 5-shot word problems (about 45 words) with worked answers (about 60 words), 256 new tokens
    def problem() -> dict:
        return {
            "question": paragraph(rng, rng.randint(30, 60)),
            "answer": paragraph(rng, rng.randint(40, 90)) + " #### 42",
        }

    write(
        "bench_gsm8k",
        {"train": [problem() for _ in range(8)], "test": [problem() for _ in range(40)]},
        "training_split: train\nfewshot_split: train\ntest_split: test\noutput_type: generate_until\n"
        "fewshot_config:\n  sampler: first_n\nnum_fewshot: 5\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["Question:", "</s>", "<|im_end|>"]\n  do_sample: false\n  temperature: 0.0\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    )

    # MMLU-Pro (the leaderboard's): 5-shot, ten options, the answer letter scored as one continuation
    def question() -> dict:
        options = [paragraph(rng, rng.randint(3, 12)).rstrip(".") for _ in range(10)]
        return {"question": paragraph(rng, rng.randint(25, 70)), "options": options, "answer_index": rng.randrange(10)}

    write(
        "bench_mmlu_pro",
        {"validation": [question() for _ in range(5)], "test": [question() for _ in range(80)]},
        "fewshot_split: validation\ntest_split: test\noutput_type: multiple_choice\n"
        "fewshot_config:\n  sampler: first_n\nnum_fewshot: 5\n"
        "doc_to_text: \"{{question}}\\n{% for o in options %}{{ 'ABCDEFGHIJ'[loop.index0] }}. {{o}}\\n{% endfor %}"
        'Answer:"\n'
        'doc_to_choice: ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"]\ndoc_to_target: answer_index\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    )

    # ARC-Challenge: 0-shot, a short question and four short answers
    four_choices(rng, "bench_arc_challenge", "question", (12, 40), lambda: sentence(rng, rng.randint(2, 9)),
                 "Question: {{question}}\nAnswer:")  # fmt: skip
    # HellaSwag: 0-shot, a context of about 40 words and four endings of about 20
    four_choices(rng, "bench_hellaswag", "query", (25, 55), lambda: paragraph(rng, rng.randint(12, 30)), "{{query}}")


def four_choices(
    rng: random.Random, name: str, field: str, words: tuple[int, int], choice: Callable[[], str], doc_to_text: str
) -> None:
    """A 0-shot task of 80 items: a text of `words` words in `field`, four continuations, acc and acc_norm."""
    docs = [
        {
            field: paragraph(rng, rng.randint(*words)),
            "choices": [" " + choice() for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(80)
    ]
    write(
        name,
        {"test": docs},
        f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: {json.dumps(doc_to_text)}\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
    )


if __name__ == "__main__":
    main()
