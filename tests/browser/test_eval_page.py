"""The Eval tab in the real page: the default stack scored beside its parent on two local tasks,
with progress, a table with paired differences, the bar chart and the per-item JSONL."""

from evalkit import GEN_TASK, MC_TASK

from browserkit import wait_for


def test_a_tiny_eval_shows_the_table_and_the_chart(app_url, page, eval_tasks):
    page.goto(app_url)
    wait_for(lambda: "134,515,008" in page.locator("#preview").inner_text(), "the default stack")
    page.get_by_role("tab", name="Eval").click()
    note = page.locator("#eval-local-tasks")
    wait_for(lambda: MC_TASK in note.inner_text(), "the local tasks named")
    tasks = page.locator("#eval-tasks")
    while tasks.locator(".token").count():  # the quick suite needs the Hub: keep only local tasks
        tasks.locator(".token .token-remove").first.click()
    box = tasks.locator("input")
    for name in (MC_TASK, GEN_TASK):
        box.fill(name)
        box.press("Enter")
    wait_for(lambda: tasks.locator(".token").count() == 2, "both tasks picked")
    items = page.locator("#eval-items input[type=number]")
    items.fill("2")
    items.press("Enter")
    parents = page.locator("#eval-parents")
    wait_for(lambda: parents.locator("input[type=checkbox]:checked").count() == 1, "the parent offered and picked")

    page.locator("#eval-run").click()
    table = page.locator("#eval-table")
    wait_for(lambda: table.locator("tbody tr").count() == 2, "a row per task", timeout=300)
    header = table.locator("thead").inner_text()
    assert "merge" in header and "smollm2-135m-instruct" in header and "merge − smollm2-135m-instruct" in header
    first = table.locator("tbody tr").first.inner_text()
    assert MC_TASK in first and "±" in first and "[" in first
    assert "Scored merge, smollm2-135m-instruct on 2 task(s)" in page.locator("#eval-status").inner_text()
    chart = page.locator("#eval-plot .js-plotly-plot")
    wait_for(lambda: chart.count() == 1, "the bar chart")
    chart.scroll_into_view_if_needed()
    assert page.locator("#eval-plot .barlayer .trace").count() == 2  # a bar trace per model
    assert page.locator("#eval-plot path.yerror").count() == 4  # an error bar on each bar (2 models x 2 tasks)
    assert page.locator("#eval-samples a").count() >= 1  # the per-item JSONL to download
