"""Names are text: hostile names (model references, a model's config and chat template, a card's
name and greeting) go through every surface that shows them: the share link's notice, the add
message, the note by the YAML box, the preview, the stack widget, error toasts, the roleplay card
and chat. Each is shown as text: no link, image or element is made from them, and no request
leaves for their host."""

import json
from pathlib import Path

import pytest

from merger.recipe import passthrough
from merger.recipe.share_links import to_share_token
from merger.sources.catalog import LocalPolicy

from browserkit import wait_for
from tiny import make_tiny, tiny_tokenizer

EVIL = "evil.test"
IMG = f'<img src="http://{EVIL}/img.png" id="hostile-img">'
LINK = f"[Session expired: sign in again](http://{EVIL}/login)"
HOSTILE = f'{IMG} ![x](http://{EVIL}/md.png) {LINK} <a href="http://{EVIL}/a" id="hostile-a">a</a> www.{EVIL}'
FOLDER = '<b id="hostile-b">bold'  # a folder name a file system takes (no slash)
ARCH = f'<img src="http://{EVIL}/arch.png" id="hostile-arch">'
TEMPLATE_ERROR = f'<img src="http://{EVIL}/tpl.png" id="hostile-tpl"> [sign in](http://{EVIL}/tpl)'


@pytest.fixture
def hostile_root(tmp_path_factory, monkeypatch):
    """Allowed folders: one named like markup whose config names markup, one whose chat template
    raises an error made of markup."""
    import ui.models

    root = tmp_path_factory.mktemp("hostile-root")
    make_tiny(root / FOLDER, "llama", layers=2)
    config = json.loads((root / FOLDER / "config.json").read_text())
    (root / FOLDER / "config.json").write_text(json.dumps({**config, "architectures": [ARCH]}))
    make_tiny(root / "evil-template", "llama", layers=2)
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = "{{ raise_exception(" + json.dumps(TEMPLATE_ERROR) + ") }}"
    tokenizer.save_pretrained(root / "evil-template")
    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=(root.resolve(),)))
    ui.models.public_info.cache_clear()
    yield root
    ui.models.public_info.cache_clear()


def toast(page, text: str) -> None:
    """Wait for an error toast showing `text` as text, then close it."""
    body = page.get_by_test_id("toast-body")
    wait_for(lambda: any(text in body.nth(i).inner_text() for i in range(body.count())), f"a toast with {text[:40]}")
    for close in page.get_by_test_id("toast-close").all():
        close.click()


def type_yaml(page, text: str) -> None:
    editor = page.locator("#recipe-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(text)


def test_hostile_names_are_text_on_every_surface(app_url, page, hostile_root, tmp_path):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    message = page.locator("#model-msg")

    # a share link naming a hostile model: the notice says so, as text, over the default stack
    token = to_share_token(passthrough((HOSTILE, 0, 2)))
    page.goto(f"{app_url}?r={token}")
    wait_for(lambda: f"unknown model '{IMG}" in message.inner_text(), "the share link's notice")

    # the add-model message: a hostile reference, then a folder named like markup whose config names markup
    ref = page.locator("#model-ref input")
    for name, shown in ((HOSTILE, f"unknown model '{IMG}"), (FOLDER, f"Added {FOLDER}: 2 layers, {ARCH}.")):
        ref.fill(name)
        ref.press("Enter")
        page.locator("#add-model-btn").click()
        wait_for(lambda shown=shown: shown in message.inner_text(), f"the add message for {name[:20]}")
    # the stack widget draws the folder's name as its column label
    wait_for(lambda: FOLDER in page.get_by_test_id("stack-col-1").inner_text(), "the hostile column")

    # pasted YAML naming it: the note by the box says why it was not applied (and Build does not build it)
    page.get_by_role("button", name="Recipe (mergekit YAML)").click()
    type_yaml(page, passthrough((HOSTILE, 0, 2)).to_yaml())
    page.locator("#apply-yaml").click()
    wait_for(lambda: f"unknown model '{IMG}" in page.locator("#yaml-note").inner_text(), "the note by the box")
    page.locator("#build-btn").click()
    toast(page, "holds YAML you have not applied")

    # the preview's parents list names the hostile folder
    type_yaml(page, passthrough((FOLDER, 0, 2)).to_yaml())
    page.locator("#apply-yaml").click()
    wait_for(lambda: f"parents: {FOLDER}" in page.locator("#preview").inner_text(), "the preview naming the folder")

    # the comparison target named by hand (a toast)
    page.get_by_role("tab", name="Side by side").click()
    target = page.locator("#compare-target input")
    target.fill(HOSTILE)
    target.press("Enter")
    page.locator("#compare-build").click()
    toast(page, f"Unknown model '{IMG}")

    # a character card whose name and greeting are markup: the summary and the chat's greeting
    card = tmp_path / "card.json"
    greeting = f"Hi, {{{{user}}}}. {HOSTILE}"
    card.write_text(json.dumps({"name": HOSTILE, "description": "{{char}} waits.", "first_mes": greeting}))
    page.get_by_role("tab", name="Roleplay").click()
    page.locator("#rp-upload input[type=file]").set_input_files(str(card))
    page.locator("#rp-start").click()
    wait_for(lambda: page.locator("#rp-card textarea").input_value().startswith(HOSTILE), "the card's summary")
    wait_for(lambda: f"Hi, User. {IMG}" in page.locator("#rp-chatbot").inner_text(), "the greeting as text")

    # a model whose chat template raises an error made of markup (a toast naming the model)
    type_yaml(page, passthrough(("evil-template", 0, 2)).to_yaml())
    page.locator("#apply-yaml").click()
    wait_for(lambda: "parents: evil-template" in page.locator("#preview").inner_text(), "the template's model")
    page.locator("#build-btn").click()
    wait_for(lambda: "Built 2 layers" in page.locator("#build-status").inner_text(), "the build", timeout=90)
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-input textarea").fill("hi")
    page.locator("#send-btn").click()
    toast(page, f"The chat template of evil-template failed on this conversation: {TEMPLATE_ERROR}")

    for made in ("img[src*='evil.test']", "a[href*='evil.test']", "[id^='hostile-']"):
        assert page.locator(made).count() == 0, f"the page made {made} from a name"
    assert not [url for url in requests if EVIL in url], "a request left for the hostile host"
    assert Path(hostile_root / FOLDER).is_dir()
