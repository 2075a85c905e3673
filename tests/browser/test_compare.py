"""Side by side in the page: the merge and a parent answer one message next to each other, each
reply streamed with its own speed; then Continue extends the chat tab's reply."""

from browserkit import build_default, wait_for


def test_merge_and_parent_answer_side_by_side_and_a_reply_continues(app_url, page):
    build_default(page, app_url, max_new_tokens=24)

    page.get_by_role("tab", name="Side by side").click()
    target = page.locator("#compare-target input")
    wait_for(lambda: "parent: " in target.input_value(), "the parent offered for comparison")
    page.locator("#compare-build").click()
    status = page.locator("#compare-status")
    wait_for(lambda: "Built 30 layers" in status.inner_text(), "the comparison's build", timeout=60)
    page.locator("#compare-input textarea").fill("Name three colours.")
    page.locator("#compare-send").click()
    for side in ("merge", "other"):
        bot = page.locator(f"#compare-{side} .message.bot, #compare-{side} [data-testid='bot']").last
        wait_for(lambda b=bot: b.count() and b.inner_text().strip(), f"the {side} reply", timeout=60)
        stats = page.locator(f"#compare-{side}-stats")
        wait_for(lambda s=stats: "tokens/s" in s.inner_text(), f"the {side} reply's speed", timeout=90)
    # the parent as it is and the default stack are one model: with one seed, one reply
    merge = page.locator("#compare-merge .message.bot, #compare-merge [data-testid='bot']").last.inner_text()
    other = page.locator("#compare-other .message.bot, #compare-other [data-testid='bot']").last.inner_text()
    assert merge.strip() == other.strip()

    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").fill("Tell me a long story about the sea.")
    page.locator("#send-btn").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    wait_for(lambda: "tokens/s" in page.locator("#reply-stats").inner_text(), "the reply", timeout=90)
    first = bot.inner_text().strip()
    page.locator("#continue-btn").click()
    wait_for(lambda: len(bot.inner_text().strip()) > len(first), "the continued reply", timeout=90)
    assert bot.inner_text().strip().startswith(first[:20])
