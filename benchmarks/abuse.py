"""Fire the resource cases of a hostile visitor at the app on loopback and measure what each costs
the server: its peak resident memory above the level before the case, the CPU seconds it spent,
and the time until the refusal came back (or the work finished).

Starts `python app.py` as its own process (so the numbers are the server's alone) with an
allowed folder holding a tiny model whose chat template loops, then sends each case the way a
visitor would: the public HTTP API through gradio_client, and the page in headless Chromium for
what only the page does (a share link, a character card). Prints a table; `--json FILE` saves it.

    python benchmarks/abuse.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "browser"))

from merger.recipe import passthrough

from hostile_inputs import (
    NESTED_LOOPS,
    SMOL,
    filter_alias_bomb,
    half_megabyte_card,
    million_layer_link,
    million_layer_yaml,
    slice_alias_recipe,
)

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


class Server:
    """`python app.py` on a free loopback port, with `allowed` as its allowed folder root."""

    def __init__(self, allowed: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "FRANKENMERGE_LOCAL_DIRS": str(allowed),
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.5)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def measure(server: Server, name: str, case: Callable[[], str], limit_s: float = 600) -> dict:
    """Run one case against the server; its peak RSS above the level before, CPU seconds, wall time."""
    before, cpu_before = server.rss(), server.cpu_seconds()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        outcome = case()
    except Exception as exc:  # the refusal, as the client got it
        outcome = str(exc)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    time.sleep(0.2)  # let the server finish what it was doing when the client got its answer
    return {
        "case": name,
        "seconds_to_answer": round(seconds, 3),
        "server_cpu_seconds": round(server.cpu_seconds() - cpu_before, 3),
        "server_peak_rss_growth_mib": round((max(peak, server.rss()) - before) / MB, 1),
        "answer": " ".join(outcome.split())[:160],
    }


@contextmanager
def chromium_page(url: str) -> Iterator:
    """The app's page in headless Chromium, its stack drawn."""
    from playwright.sync_api import sync_playwright

    from browserkit import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.get_by_test_id("cell-0-0").wait_for(timeout=120_000)
            yield page
        finally:
            browser.close()


def page_cases(page, url: str, card: Path) -> list[tuple[str, Callable[[], str]]]:
    """Cases only the page sends: a share link opened, a character card imported."""
    from browserkit import wait_for

    def open_link() -> str:
        page.goto(f"{url}?r={million_layer_link()}")
        message = page.locator("#model-msg")

        def notice() -> str:
            text = message.inner_text()
            return text if "⚠️" in text or "Opened" in text else ""

        return wait_for(notice, "the link's notice", timeout=600)

    def import_card() -> str:
        page.get_by_role("tab", name="Roleplay").click()
        page.locator("#rp-upload input[type=file]").set_input_files(str(card))
        page.locator("#rp-start").click()
        body = page.get_by_test_id("toast-body")
        return wait_for(lambda: body.count() and body.first.inner_text().strip(), "the card's refusal", timeout=600)

    return [("share link: 1.25 M layers (page)", open_link), ("card: 0.5 MB, long name x4000 (page)", import_card)]


def api_cases(client: Client, looping: Client) -> list[tuple[str, Callable[[], str]]]:
    """Cases sent through the public HTTP API; `looping` is a second visitor, who builds the
    model whose chat template loops."""
    greedy = (0.0, 0.9, 8)
    splice = passthrough((SMOL, 0, 20), (SMOL, 10, 30)).to_yaml()
    turn = [{"type": "text", "text": "Tell me about the harbour."}]  # a Chatbot message's content blocks
    history = [{"role": r, "content": turn} for _ in range(200) for r in ("user", "assistant")]
    short, loops = passthrough((SMOL, 0, 6)).to_yaml(), passthrough(("loops", 0, 2)).to_yaml()

    def preview(text: str) -> Callable[[], str]:
        return lambda: str(client.predict(text, api_name="/preview")["num_layers"])

    return [
        ("preview: a plain splice (for scale)", preview(splice)),
        ("preview: 1.3 KB filter alias bomb", preview(filter_alias_bomb())),
        ("preview: 400 KB, a slice aliased 100,000x", preview(slice_alias_recipe())),
        ("preview: 1.25 M layers (660 slices x 64)", preview(million_layer_yaml())),
        ("build: SmolLM2 [0, 6) (for the chats)", lambda: client.predict(short, api_name="/build")),
        ("chat: a 1 MB message", lambda: client.predict("Tell me more. " * (MB // 14), [], *greedy, api_name="/chat")),
        ("chat: a 400-turn history", lambda: client.predict("And then?", history, *greedy, api_name="/chat")),
        ("build: a model whose template loops", lambda: looping.predict(loops, api_name="/build")),
        ("chat: its nested range(99999) loops", lambda: looping.predict("hi", [], *greedy, api_name="/chat")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from tiny import make_tiny, tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        allowed = Path(tmp) / "models"
        make_tiny(allowed / "loops", "llama", layers=2)
        tokenizer = tiny_tokenizer(chat=True)
        tokenizer.chat_template = NESTED_LOOPS
        tokenizer.save_pretrained(allowed / "loops")
        card = Path(tmp) / "card.json"
        card.write_bytes(half_megabyte_card())

        server = Server(allowed)
        try:
            client, looping = Client(server.url, verbose=False), Client(server.url, verbose=False)
            results = [measure(server, name, case) for name, case in api_cases(client, looping)]
            with chromium_page(server.url) as page:
                results += [measure(server, name, case) for name, case in page_cases(page, server.url, card)]
        finally:
            server.stop()

    print("| case | time to answer | server CPU | server peak RSS growth | answer |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['seconds_to_answer']:.2f} s | {r['server_cpu_seconds']:.2f} s | "
            f"{r['server_peak_rss_growth_mib']:.0f} MiB | {r['answer'][:90]} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
