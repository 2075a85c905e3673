"""The Eval tab's table, summary and chart show model and task names as text."""

from merger.eval.figure import eval_figure
from merger.eval.runner import Candidate, EvalReport, EvalSettings, TaskScore
from merger.eval.suite import LoadedTask
from ui.eval_tab import summary, table

from markdown_text import shown

HOSTILE = "evil/![x](https://elsewhere.example/p.png)<b>bold</b>"


def test_names_in_the_eval_table_summary_and_chart_are_text():
    task = LoadedTask("tiny_choice", 2, "multiple_choice", ["acc"], ["none"], {}, {"acc": True})
    models = [Candidate("merge", None, "float32", is_merge=True), Candidate(HOSTILE, None, "float32")]
    report = EvalReport(models, [task], EvalSettings())
    for label, values in (("merge", {0: 1.0, 1: 1.0}), (HOSTILE, {0: 0.0, 1: 1.0})):
        score = TaskScore(
            "tiny_choice", 2, {"acc,none": (sum(values.values()) / 2, 0.5)}, {"acc,none": values}, [], 0.0
        )
        report.scores[(label, "tiny_choice")] = score
    report.reused.append((HOSTILE, "tiny_choice"))
    for markdown in (table(report), summary(report, 1.0)):
        assert "![x](https://elsewhere.example/p.png)<b>bold</b>" in shown(markdown)  # shown as written
        assert "](" not in markdown and "<b>" not in markdown  # neither a link nor an element
    assert "merge − evil/" in shown(table(report)) and "+0.5000 [" in table(report)
    names = [trace.name for trace in eval_figure(report).data]
    assert names == ["merge", "evil/![x](https://elsewhere.example/p.png)&lt;b&gt;bold&lt;/b&gt;"]
