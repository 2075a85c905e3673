"""Helpers for browser tests: Debian's Chromium with the flags this machine needs, waiting, dragging."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sweep(page: Page, col: int, first: int, last: int) -> None:
    """Mouse down on one cell, move across the column, release on another."""
    a = page.get_by_test_id(f"cell-{col}-{first}").bounding_box()
    b = page.get_by_test_id(f"cell-{col}-{last}").bounding_box()
    page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2, steps=8)
    page.mouse.up()


def build_default(page: Page, url: str, *, max_new_tokens: int | None = None) -> None:
    """Open the page on its default stack (SmolLM2 as it is), optionally set max new tokens, press Build."""
    page.goto(url)
    page.get_by_test_id("cell-0-0").wait_for()
    wait_for(lambda: "134,515,008" in page.locator("#preview").inner_text(), "the default stack")
    if max_new_tokens is not None:
        page.get_by_role("button", name="Generation settings").click()
        tokens = page.locator("#max-new-tokens input[type=number]")
        tokens.fill(str(max_new_tokens))
        tokens.press("Enter")
    page.locator("#build-btn").click()
    wait_for(lambda: "Built 30 layers" in page.locator("#build-status").inner_text(), "the build", timeout=60)
