"""Start app.py as a Hugging Face Space starts it, on this CPU machine (DESIGN.md, Spaces).

    python tests/space_app.py        # with the Space's variables set (tests/spacekit.py sets them)

- Only what a Space installs can be imported: requirements.txt, `gradio[oauth]`, `spaces`,
  `gradio_client`, and what they depend on (plus triton, which the Space's CUDA torch wheel brings);
  every other installed distribution (the bundled models, mergekit, the test tools) is hidden.
- With SPACES_ZERO_GPU set, the real `spaces` package runs its ZeroGPU machinery against the device
  API named by SPACES_ZERO_DEVICE_API_URL. This machine's torch is a CPU build, so it first gets
  what spaces reads of a CUDA build at import (DESIGN.md's stubs); CUDA work that escapes spaces'
  emulation then fails as on a Space, whose server process has no GPU either (the message differs:
  "Torch not compiled with CUDA enabled" for "Low-level CUDA init reached"). Inside a GPU call's
  worker, the two steps that need
  the GPU itself are replaced: attaching it does not touch CUDA, and moving spaces' emulated tensors
  onto it refuses any (there is nowhere to put them), while the fork, the queues and the device
  API's schedule / allow / release calls are the real package's. The driver reports the GPU ZeroGPU
  runs on now (RTX PRO 6000: spaces multiplies durations by its factor, 1.5).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SPACE_IMAGE = ["gradio[oauth]", "spaces", "gradio_client", "triton"]
ZERO_GPU_MODEL = "NVIDIA RTX PRO 6000 Blackwell Server Edition"


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def space_distributions() -> set[str]:
    """The installed distributions a Space has: requirements.txt and the Space image's packages,
    with everything they require (markers and extras evaluated here)."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    top = [Requirement(line) for line in lines + SPACE_IMAGE if line]
    wanted = [(r.name, frozenset(r.extras)) for r in top if r.marker is None or r.marker.evaluate()]
    found: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        name, extras = wanted.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = (_name(dist.metadata["Name"]), extras)
        if key in found:
            continue
        found.add(key)
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras or {""}):
                wanted.append((dep.name, frozenset(dep.extras)))
    return {name for name, _ in found}


def hide_all_but(allowed: set[str]) -> set[str]:
    """Make every top-level module of the other installed distributions unimportable (find_spec
    answers None, as for a package that is not installed); returns their names."""
    hidden = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(_name(d) in allowed for d in dists)
    }

    class SpaceFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = SpaceFinder
    return hidden


def cpu_torch_as_a_driverless_cuda_build() -> None:
    """This CPU build of torch as far as spaces reads it at import: a CUDA version, a low-level init
    that fails (no driver), no bad fork. CUDA work outside spaces' emulation still fails here, with
    "Torch not compiled with CUDA enabled" where a Space says "Low-level CUDA init reached"."""
    import torch

    def no_driver() -> None:
        raise RuntimeError("no NVIDIA driver on this machine")

    torch.version.cuda = "12.8"
    torch._C._cuda_init = no_driver
    torch.cuda._is_in_bad_fork = bool  # False; a builtin, as spaces sends it to a process pool
    torch.cuda.synchronize = lambda device=None: None  # nothing runs asynchronously on the CPU


def workers_without_a_gpu() -> None:
    """In a GPU call's worker: attach no GPU (none here) and move no emulated tensor (nowhere to)."""
    import spaces.zero.config
    import spaces.zero.torch

    def attach(nvidia_uuid: str) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = nvidia_uuid  # as spaces does, before its CUDA init

    def move(callback=None) -> None:
        if spaces.zero.torch.size():
            raise RuntimeError("emulated CUDA tensors reached a GPU call: this machine has no GPU to move them to")

    spaces.zero.torch.init = attach
    spaces.zero.torch.move = move
    spaces.zero.config._read_gpu_information = lambda: f"Model: {ZERO_GPU_MODEL}\n"
    spaces.zero.config.get_config.cache_clear()  # read once at import, before the driver said


def main() -> None:
    hide_all_but(space_distributions())
    if os.environ.get("SPACES_ZERO_GPU"):
        cpu_torch_as_a_driverless_cuda_build()
        import spaces  # noqa: F401  (as a Space imports it: before the app touches torch)

        workers_without_a_gpu()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")


if __name__ == "__main__":
    main()
