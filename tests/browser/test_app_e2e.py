"""The whole first-visit path in headless Chromium: splice SmolLM2 [0,20) + [10,30) on the stack,
see 40 layers and 169,915,968 parameters and where they would run, build, and get a streamed chat reply."""

from browserkit import sweep, wait_for


def preview_text(page) -> str:
    return page.locator("#preview").inner_text()


def test_splice_on_the_stack_updates_counts_then_builds_and_chats(app_url, page):
    page.goto(app_url)
    page.get_by_test_id("cell-0-0").wait_for()
    wait_for(lambda: "134,515,008" in preview_text(page), "the default model's count")

    page.get_by_test_id("slice-remove-0").click()
    sweep(page, 0, 0, 19)
    page.get_by_test_id("stack-add-0").click()
    wait_for(lambda: "20 layers" in preview_text(page), "the first slice's preview")
    sweep(page, 0, 10, 29)
    page.get_by_test_id("stack-add-0").click()
    wait_for(lambda: "169,915,968" in preview_text(page), "the splice's exact count")
    assert "40 layers" in preview_text(page)
    placement = page.locator("#placement")
    wait_for(lambda: "one device, cpu, all 40 layers" in placement.inner_text(), "the placement next to it")
    assert page.get_by_test_id("merged-layers").inner_text().strip() == "40"
    assert page.get_by_test_id("seam-1").is_visible()

    page.locator("#build-btn").click()
    status = page.locator("#build-status")
    wait_for(lambda: "Built 40 layers" in status.inner_text(), "the build", timeout=60)

    page.locator("#chat-input textarea").fill("Hello! Who are you?")
    page.locator("#send-btn").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    wait_for(lambda: bot.count() and bot.inner_text().strip(), "a streamed reply", timeout=60)
    wait_for(lambda: "tokens/s" in page.locator("#reply-stats").inner_text(), "the reply's speed", timeout=90)
