"""The Lens tab in the real page: SmolLM2's heatmap, a suggestion put into the stack with one
click (saying what it replaced), that stack's seams scored and coloured on the widget, and Undo."""

import re

from browserkit import wait_for

# A short calibration text keeps the CPU run quick; the statistics are the same kind.
TEXT = (
    "The lighthouse keeper climbed the stairs each evening, counting the steps aloud. "
    "At the top she trimmed the wick, wiped the salt from the glass and watched the ships. "
) * 6


def test_lens_plots_a_model_applies_a_suggestion_and_colours_its_seams(app_url, page):
    page.goto(app_url)
    wait_for(lambda: "134,515,008" in page.locator("#preview").inner_text(), "the default stack")
    page.get_by_role("tab", name="Lens").click()
    wait_for(
        lambda: "smollm2" in page.locator("#lens-model input").input_value().lower(), "the stack's model in the lens"
    )
    page.locator("#lens-text textarea").fill(TEXT)

    page.locator("#lens-analyze").click()
    summary = page.locator("#lens-summary")
    wait_for(lambda: "averaged over all" in summary.inner_text(), "the lens summary", timeout=180)
    assert "30 layers" in summary.inner_text()
    heatmap = page.locator("#lens-heatmap .js-plotly-plot")
    wait_for(lambda: heatmap.count() == 1, "the heatmap")
    assert page.locator("#lens-heatmap .hm, #lens-heatmap .heatmaplayer").count() >= 1
    assert page.locator("#lens-influence .js-plotly-plot").count() == 1

    # rank by the instant predictor, confirm the best five by perplexity, put the first in the stack
    page.get_by_label("predicted from the heatmap (instant)").check()
    page.locator("#lens-suggest").click()
    table = page.locator("#lens-suggestions")
    wait_for(lambda: table.locator("tbody tr").count() == 5, "five confirmed suggestions", timeout=300)
    first = table.locator("tbody tr").first.locator("td").first.inner_text().strip()
    start, end = (int(x) for x in re.findall(r"\d+", first))
    wait_for(lambda: page.locator("#lens-pick input").input_value() == first, "the first suggestion picked")
    page.locator("#lens-apply").click()
    layers = 30 + end - start
    wait_for(lambda: f"{layers} layers" in page.locator("#preview").inner_text(), "the suggestion in the stack")
    assert page.get_by_test_id("merged-layers").inner_text().strip() == str(layers)
    assert page.get_by_test_id("seam-1").count() == 1
    assert "It replaced the stack you had (1 slice(s), 30 layers)" in page.locator("#lens-put-note").inner_text()
    assert page.locator("#lens-undo").is_visible()

    # score the stack's seam: the widget colours it with the measured damage
    page.locator("#lens-seams").click()
    badge = page.get_by_test_id("score-seam-1")
    wait_for(lambda: badge.count() == 1, "the seam's score on the stack", timeout=180)
    seam = page.get_by_test_id("seam-1")
    assert "--seam:hsl(" in seam.get_attribute("style")
    assert "measured" in seam.get_attribute("title") and "predicted" in seam.get_attribute("title")
    assert f"depth {end}: predicted" in page.locator("#lens-seams-summary").inner_text()
    assert page.locator("#lens-seams-plot .js-plotly-plot").count() == 1

    # Undo: the stack the suggestion replaced comes back
    page.locator("#lens-undo").click()
    wait_for(lambda: "back as it was" in page.locator("#lens-put-note").inner_text(), "the old stack back")
    assert page.get_by_test_id("merged-layers").inner_text().strip() == "30"
    assert "134,515,008 parameters" in page.locator("#preview").inner_text()
    assert not page.locator("#lens-undo").is_visible()
