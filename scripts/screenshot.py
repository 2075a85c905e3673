"""Take the README's screenshot of the real page: SmolLM2 spliced as [0,20) + [10,30) on the stack,
built, then compared side by side with its parent on one message.

    python scripts/screenshot.py [--out docs/screenshot.png]

Serves the app in-process on a free port and drives Debian's Chromium (as the browser tests do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "browser")]

from browserkit import CHROMIUM, CHROMIUM_ARGS, free_port, sweep, wait_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from app import demo

    port = free_port()
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_test_id("cell-0-0").wait_for()
        preview = page.locator("#preview")
        wait_for(lambda: "134,515,008" in preview.inner_text(), "the default stack")
        page.get_by_test_id("slice-remove-0").click()
        sweep(page, 0, 0, 19)
        page.get_by_test_id("stack-add-0").click()
        wait_for(lambda: "20 layers" in preview.inner_text(), "the first slice")
        sweep(page, 0, 10, 29)
        page.get_by_test_id("stack-add-0").click()
        wait_for(lambda: "169,915,968" in preview.inner_text(), "the splice")
        page.get_by_role("button", name="Generation settings").click()
        tokens = page.locator("#max-new-tokens input[type=number]")
        tokens.fill("48")
        tokens.press("Enter")
        page.get_by_role("button", name="Generation settings").click()
        page.locator("#build-btn").click()
        wait_for(lambda: "Built 40 layers" in page.locator("#build-status").inner_text(), "the build", timeout=120)

        page.get_by_role("tab", name="Side by side").click()
        page.locator("#compare-build").click()
        wait_for(lambda: "Built 30 layers" in page.locator("#compare-status").inner_text(), "the parent", timeout=120)
        page.locator("#compare-input textarea").fill("Write one sentence about Frankenstein.")
        page.locator("#compare-send").click()
        for side in ("merge", "other"):
            stats = page.locator(f"#compare-{side}-stats")
            wait_for(lambda s=stats: "tokens/s" in s.inner_text(), f"the {side} reply", timeout=180)
        page.mouse.move(0, 0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    demo.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
