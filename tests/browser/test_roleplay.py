"""Roleplay in the page: a sample character's greeting opens the chat and the reply streams."""

from browserkit import build_default, wait_for


def test_sample_character_greets_and_answers_in_character(app_url, page):
    build_default(page, app_url)

    page.get_by_role("tab", name="Roleplay").click()
    page.locator("#rp-user textarea").fill("Rin")
    page.locator("#rp-start").click()
    card = page.locator("#rp-card textarea")
    wait_for(lambda: card.input_value().startswith("Captain Mirela"), "the card summary")
    bubbles = page.locator("#rp-chatbot .message")
    wait_for(lambda: "looks Rin up and down" in page.locator("#rp-chatbot").inner_text(), "the greeting")

    page.locator("#rp-input textarea").fill("Aye, Captain. I can read a pressure chart.")
    page.locator("#rp-send").click()
    wait_for(lambda: bubbles.count() >= 3 and bubbles.last.inner_text().strip(), "a streamed reply", timeout=60)
    wait_for(lambda: "tokens/s" in page.locator("#rp-stats").inner_text(), "the reply's speed", timeout=90)
