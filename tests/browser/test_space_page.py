"""The page as a visitor meets it on a ZeroGPU Space (tests/spacekit.py: the real `spaces`, no bundled
packages, not signed in): it opens on the Space's Hub model, another known-good model is added and
spliced in, the merge builds, a reply streams from a GPU call and Stop ends it, and the merge exports."""

from browserkit import sweep, wait_for
from spacekit import SECOND_MODEL

BOT = "#chatbot .message.bot, #chatbot [data-testid='bot']"


def test_a_visitor_splices_builds_chats_stops_and_exports_on_a_zero_gpu_space(space_app, page):
    page.goto(space_app.url)
    page.get_by_test_id("cell-0-0").wait_for()
    preview = page.locator("#preview")
    wait_for(lambda: "6 layers" in preview.inner_text(), "the default model's preview")
    assert "SmolLM2-135M-Instruct" in preview.inner_text()
    assert page.get_by_role("button", name="Sign in with Hugging Face").is_visible()
    assert "pip" not in page.locator("body").inner_text()

    page.locator("#model-ref input").fill(SECOND_MODEL)
    page.locator("#model-ref input").press("Enter")
    page.locator("#add-model-btn").click()
    wait_for(lambda: "Added" in page.locator("#model-msg").inner_text(), "the second column")
    sweep(page, 1, 2, 5)
    page.get_by_test_id("stack-add-1").click()
    wait_for(lambda: "10 layers" in preview.inner_text(), "the splice's preview")

    page.locator("#build-btn").click()
    wait_for(lambda: "Built 10 layers" in page.locator("#build-status").inner_text(), "the build", timeout=60)

    page.get_by_role("button", name="Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("200")  # the tiny model's window holds 256 tokens, on the CPU stand-in as on a GPU
    tokens.press("Enter")
    page.locator("#chat-input textarea").fill("Tell me a long story")
    page.locator("#send-btn").click()
    bot = page.locator(BOT).last
    wait_for(lambda: bot.count() and len(bot.inner_text().strip()) > 5, "a streamed reply", timeout=60)
    page.locator("#stop-btn").click()
    stats = page.locator("#reply-stats")
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the stopped reply's speed", timeout=60)
    assert int(stats.inner_text().split(" tokens")[0].rsplit("· ", 1)[1]) < 200

    page.get_by_role("button", name="Export and publish").click()
    page.locator("#export-btn").click()
    wait_for(lambda: "Download it below" in page.locator("#export-status").inner_text(), "the export", timeout=60)
    assert page.locator("#export-file a").count() >= 1
