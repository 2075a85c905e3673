"""One recipe on the page: a pasted bf16 recipe with a tokenizer source and a chat template, edited
on the stack, is what the page builds, exports and shares; YAML pasted but not applied is never
built; after an edit the build status says the stack no longer matches the built model."""

import json
import zipfile
from pathlib import Path
from urllib.parse import unquote

import yaml

from merger.recipe.share_links import from_share_token
from merger.sources.bundled import public_ref
from ui.chat import SESSIONS

from browserkit import wait_for

SMOL = "bundled:smollm2-135m-instruct"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"  # one line: read off the editor
PASTED = {
    "slices": [
        {"sources": [{"model": SMOL, "layer_range": [0, 2]}]},
        {"sources": [{"model": SMOL, "layer_range": [1, 3]}]},
    ],
    "merge_method": "passthrough",
    "dtype": "bfloat16",
    "tokenizer_source": SMOL,
    "chat_template": TEMPLATE,
}
KEPT = {"dtype": "bfloat16", "tokenizer_source": SMOL, "chat_template": TEMPLATE}


def carries_the_pasted_keys(mapping: dict, *, exported: bool = False) -> bool:
    """Whether `mapping` has the pasted keys; an export names the bundled model by its Hub id."""
    kept = {**KEPT, "tokenizer_source": public_ref(SMOL)} if exported else KEPT
    return all(mapping.get(k) == v for k, v in kept.items())


def test_a_pasted_bf16_recipe_is_what_the_page_edits_builds_exports_and_shares(app_url, page):
    page.goto(app_url)
    preview = page.locator("#preview")
    status = page.locator("#build-status")
    wait_for(lambda: "134,515,008" in preview.inner_text(), "the default stack")

    # pasted, not applied: the box says so, and Build refuses rather than build it silently
    page.get_by_role("button", name="Recipe (mergekit YAML)").click()
    page.locator("#recipe-yaml .cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(json.dumps(PASTED))  # JSON is YAML, and one line keeps the editor from indenting
    wait_for(lambda: "Not applied yet" in page.locator("#yaml-note").inner_text(), "the not-applied note")
    page.locator("#build-btn").click()
    wait_for(lambda: "not applied" in page.locator(".toast-body").inner_text(), "Build refusing the unapplied YAML")
    assert "Built" not in status.inner_text()

    # applied, then edited on the stack: the YAML box keeps every key, the preview counts bf16
    page.locator("#apply-yaml").click()
    wait_for(lambda: "4 layers" in preview.inner_text(), "the pasted stack")
    page.get_by_test_id("slice-dup-1").click()
    wait_for(lambda: "6 layers" in preview.inner_text(), "the edited stack")
    assert "bfloat16" in preview.inner_text() and "bfloat16" in page.locator("#recipe-dtype input").input_value()
    shown = yaml.safe_load(page.locator("#recipe-yaml .cm-content").inner_text())
    assert carries_the_pasted_keys(shown) and len(shown["slices"]) == 3
    wait_for(lambda: "Not applied" not in page.locator("#yaml-note").inner_text(), "the note gone")

    def shared() -> dict | None:
        link = page.locator("#share-link textarea").input_value()
        if "?r=" not in link:
            return None
        recipe, _ = from_share_token(link.split("?r=", 1)[1])
        return recipe.to_mergekit() if recipe.num_layers == 6 else None

    assert carries_the_pasted_keys(wait_for(shared, "the share link of the edited stack"))

    page.locator("#build-btn").click()
    wait_for(lambda: "Built 6 layers" in status.inner_text(), "the build", timeout=120)
    assert "bfloat16" in status.inner_text()
    (built,) = [b for b in SESSIONS._models.values() if b.plan.recipe.preserved.get("chat_template") == TEMPLATE]
    assert carries_the_pasted_keys(built.plan.recipe.to_mergekit()) and built.plan.num_layers == 6
    assert str(built.model.dtype) == "torch.bfloat16"

    # an edit after the build: the status says chat still uses the old build, and offers Rebuild
    page.get_by_test_id("slice-remove-2").click()
    wait_for(lambda: "changed since the build" in status.inner_text(), "the stale-build notice")
    assert page.locator("#build-btn").inner_text().strip() == "Rebuild"

    page.get_by_role("button", name="Export and publish").click()
    page.locator("#export-btn").click()
    export_status = page.locator("#export-status")
    wait_for(lambda: "in all" in export_status.inner_text(), "the export", timeout=180)
    assert "of bfloat16" in export_status.inner_text()
    href = page.locator("#export-file a").first.get_attribute("href")
    with zipfile.ZipFile(Path(unquote(href.split("file=", 1)[1]))) as archive:
        exported = yaml.safe_load(archive.read("mergekit_config.yml"))
        config = json.loads(archive.read("config.json"))
    assert carries_the_pasted_keys(exported, exported=True)
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 4

    # the next edit clears the export of the earlier recipe
    page.get_by_test_id("slice-dup-0").click()
    wait_for(lambda: "in all" not in export_status.inner_text(), "the earlier export cleared")
    assert page.locator("#export-file a").count() == 0
