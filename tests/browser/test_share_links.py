"""Share links reopen the same recipe and settings; damaged links fall back to the default stack."""

import pytest

from merger.recipe import passthrough
from merger.recipe.share_links import from_share_token, to_share_token

from browserkit import wait_for

SMOL = "bundled:smollm2-135m-instruct"


def preview_text(page) -> str:
    return page.locator("#preview").inner_text()


def test_share_link_restores_the_stack_and_settings(app_url, page):
    recipe = passthrough((SMOL, 0, 20), (SMOL, 10, 30))
    token = to_share_token(recipe, {"temperature": 0.35, "top_p": 0.8, "max_new_tokens": 77})
    page.goto(f"{app_url}?r={token}")
    wait_for(lambda: "169,915,968" in preview_text(page), "the shared splice's count")
    assert page.get_by_test_id("merged-layers").inner_text().strip() == "40"
    assert "Opened a shared recipe" in page.locator("#model-msg").inner_text()
    # the link box and the address bar carry the same recipe and settings again
    expected = (recipe, {"temperature": 0.35, "top_p": 0.8, "max_new_tokens": 77})

    def carried() -> bool:
        link = page.locator("#share-link textarea").input_value()
        return "?r=" in link and from_share_token(link.split("?r=", 1)[1]) == expected and page.url == link

    wait_for(carried, "the link box and address bar to carry the recipe and settings")


def test_editing_the_stack_updates_the_link_that_reopens_it(app_url, page):
    page.goto(app_url)
    wait_for(lambda: "134,515,008" in preview_text(page), "the default stack")
    page.get_by_test_id("slice-dup-0").click()
    wait_for(lambda: "60 layers" in preview_text(page), "the duplicated stack")

    def link_of_60_layers() -> str | None:
        link = page.locator("#share-link textarea").input_value()
        if "?r=" in link and from_share_token(link.split("?r=", 1)[1])[0].num_layers == 60:
            return link
        return None

    link = wait_for(link_of_60_layers, "the link to follow the edit")
    reopened = page.context.browser.new_page()  # a fresh visit, as the person the link is sent to makes
    reopened.goto(link)
    wait_for(lambda: "240,717,888" in preview_text(reopened), "the reopened stack", timeout=60)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("v1.AAAA", "damaged"),
        ("v9.abc", "is not one this app reads"),
        ("v1." + "A" * 9000, "more than the 8,192 characters"),
        ("v1.%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", "damaged"),
    ],
)
def test_damaged_links_show_a_message_and_the_default_stack(app_url, page, token, message):
    page.goto(f"{app_url}?r={token}")
    wait_for(lambda: "134,515,008" in preview_text(page), "the default stack")
    wait_for(lambda: message in page.locator("#model-msg").inner_text(), "the message")
    assert page.locator("#model-msg img").count() == 0
