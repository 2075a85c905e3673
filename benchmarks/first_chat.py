"""Time the issue's first-visit path through the app's HTTP API, as a visitor's browser would:
preview, build and the first chat reply of SmolLM2-135M-Instruct [0,20) + [10,30).

Starts the real app in-process on a free port and drives it with gradio_client. Prints JSON.

    python benchmarks/first_chat.py
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradio_client import Client

from app import demo
from merger.recipe import passthrough
from ui.chat import text_of

SMOL = "bundled:smollm2-135m-instruct"


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    recipe = passthrough((SMOL, 0, 20), (SMOL, 10, 30)).to_yaml()

    start = time.perf_counter()
    counts = client.predict(recipe, api_name="/preview")
    preview_s = time.perf_counter() - start

    start = time.perf_counter()
    status = client.predict(recipe, api_name="/build")
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    job = client.submit("Hello! Who are you?", [], 0.0, 0.9, 64, api_name="/chat")
    first_piece_s = None
    for history, _speed in job:  # the conversation so far, and the reply's speed once it ends
        if first_piece_s is None and history and text_of(history[-1]["content"]):
            first_piece_s = time.perf_counter() - start
    reply_s = time.perf_counter() - start
    history, speed = job.outputs()[-1]
    reply = text_of(history[-1]["content"])
    demo.close()
    print(
        json.dumps(
            {
                "recipe": "SmolLM2-135M-Instruct [0,20)+[10,30)",
                "total_params": counts["total_params"],
                "preview_seconds": round(preview_s, 3),
                "build_seconds": round(build_s, 2),
                "build_status": status,
                "first_reply_piece_seconds": round(first_piece_s or reply_s, 2),
                "first_reply_seconds": round(reply_s, 2),
                "reply_speed": speed,
                "reply": reply,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
