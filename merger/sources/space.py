"""A Hugging Face Space as this app sees it: SPACE_ID set (every Space sets it), no bundled models
(a Space installs requirements.txt only), and Hub models that are known to build and chat.

The README's front matter names the same models: `preload_from_hub` fetches the default at build
time so the first visitor does not wait, and `models` links them (tests/test_space_build.py
checks that the two agree with these).
"""

from __future__ import annotations

from merger.sources.bundled import MODELS

# The page's default on a Space: the Hub copy of the bundled SmolLM2 (270 MB in bf16), small enough
# for CPU Basic to build and chat with.
DEFAULT_HUB_MODEL = MODELS["smollm2-135m-instruct"].hub_id
# Offered on the page: architectures this app is tested on (Llama, Gemma 3 text), sizes a CPU Basic
# Space (16 GB) holds; the Gemma ones are gated (sign in, after accepting Google's licence).
HUB_MODELS = (
    DEFAULT_HUB_MODEL,
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "google/gemma-3-270m-it",
    MODELS["gemma3-270m"].hub_id,
)
