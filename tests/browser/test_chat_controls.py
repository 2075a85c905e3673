"""The chat tab's controls in the page: Regenerate answers again (the same seed, the same reply) and
editing one of your messages resends it, dropping what came after."""

from browserkit import build_default, wait_for

BOT = "#chatbot .message.bot, #chatbot [data-testid='bot']"


def test_regenerate_repeats_a_seeded_reply_and_an_edited_message_is_resent(app_url, page):
    build_default(page, app_url, max_new_tokens=24)

    stats = page.locator("#reply-stats")
    page.locator("#chat-input textarea").fill("Hi there")
    page.locator("#send-btn").click()
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the reply", timeout=90)
    first = page.locator(BOT).last.inner_text().strip()
    page.locator("#regen-btn").click()
    wait_for(lambda: "tokens/s" not in stats.inner_text(), "the regenerated reply to start", timeout=30)
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the regenerated reply", timeout=90)
    assert page.locator(BOT).last.inner_text().strip() == first
    assert page.locator("#chatbot").inner_text().count("Hi there") == 1  # answered again, not twice

    page.locator("#chatbot .message.user, #chatbot [data-testid='user']").last.hover()
    page.locator("#chatbot button[aria-label='Edit']").click()
    page.locator("#chatbot textarea").fill("Tell me about boats")
    page.locator("#chatbot button[aria-label='Submit']").click()
    chat = page.locator("#chatbot")
    wait_for(lambda: "Tell me about boats" in chat.inner_text(), "the edited message", timeout=30)
    wait_for(lambda: "tokens/s" in stats.inner_text(), "the reply to the edited message", timeout=90)
    assert "Hi there" not in chat.inner_text()  # the edited turn and its old reply are gone
