"""Where this process runs: a Hugging Face Space, and a ZeroGPU one (read from the environment the
Space sets)."""

from __future__ import annotations

import os


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def on_zero_gpu() -> bool:
    """A ZeroGPU Space: the GPU is attached only inside `spaces.GPU` calls (the `spaces` package reads
    the same variable; it is never set anywhere else)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")  # as `spaces` reads it
