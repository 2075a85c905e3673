"""The chat tab's controls in the page: Regenerate answers again with a new seed (shown, and put in
the seed box), or with the same seed and reply once it is pinned; editing one of your messages
resends it, dropping what came after."""

from browserkit import build_default, wait_for

BOT = "#chatbot .message.bot, #chatbot [data-testid='bot']"


def test_regenerate_draws_a_new_seed_unless_pinned_and_an_edited_message_is_resent(app_url, page):
    build_default(page, app_url, max_new_tokens=24)

    stats = page.locator("#reply-stats")
    seed = page.locator("#seed input")
    page.locator("#chat-input textarea").fill("Hi there")
    page.locator("#send-btn").click()
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the reply", timeout=90)
    assert "seed 0" in stats.inner_text()
    assert page.locator("#chat-input textarea").input_value() == ""  # the message was taken

    def regenerate() -> str:
        page.locator("#regen-btn").click()
        wait_for(lambda: "tokens/s" not in stats.inner_text(), "the regenerated reply to start", timeout=30)
        wait_for(lambda: "tokens/s" in stats.inner_text(), "the regenerated reply", timeout=90)
        return page.locator(BOT).last.inner_text().strip()

    regenerate()
    drawn = seed.input_value()
    assert drawn != "0" and f"seed {drawn}" in stats.inner_text()  # a new seed, shown and kept in the box
    again = page.locator(BOT).last.inner_text().strip()
    page.locator("#pin-seed input").check()
    assert regenerate() == again and seed.input_value() == drawn  # pinned: the same seed, the same reply
    assert page.locator("#chatbot").inner_text().count("Hi there") == 1  # answered again, not twice

    page.locator("#chatbot .message.user, #chatbot [data-testid='user']").last.hover()
    page.locator("#chatbot button[aria-label='Edit']").click()
    page.locator("#chatbot textarea").fill("Tell me about boats")
    page.locator("#chatbot button[aria-label='Submit']").click()
    chat = page.locator("#chatbot")
    wait_for(lambda: "Tell me about boats" in chat.inner_text(), "the edited message", timeout=30)
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the reply to the edited message", timeout=90)
    assert "Hi there" not in chat.inner_text()  # the edited turn and its old reply are gone
