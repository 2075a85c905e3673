"""The start-up race: `python app.py` imports model code in the background while the page opens;
a Lens request that arrives meanwhile (Score the seams loads the tokenizer first) waits for that
import instead of failing with "cannot import name 'AutoTokenizer'" (two threads inside
transformers' package at once)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

# The background import is held inside transformers' package (its `utils` module) long enough for
# a Lens request to arrive in the middle of it: where the race struck, now on every run.
EARLY_LENS_REQUEST = """
import importlib.abc, sys, threading, time
held = threading.Event()

class HoldTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "transformers.utils" and not held.is_set():
            held.set()
            time.sleep(2)
        return None

sys.meta_path.insert(0, HoldTransformers())
from merger.runtime.startup import import_in_background
from ui.lens import score_stack_seams
from ui.recipe_state import empty_state, widget_edited

ref = sys.argv[1]
stack = {"models": [], "slices": [{"model": ref, "start": a, "end": b, "repeat": 1} for a, b in ((0, 4), (2, 6))]}
state, _ = widget_edited(empty_state(), stack)  # the page's recipe once the stack shows it
import_in_background()  # what `python app.py` starts before it serves the page
assert held.wait(120)
scored, summary, figure = score_stack_seams(state, "a few words to measure " * 20, lambda *a, **k: None)
print("lens:", summary.split(" over ")[0])
"""


def test_a_lens_request_during_the_start_up_import_waits_for_it(tiny_llama):
    command = [sys.executable, "-c", EARLY_LENS_REQUEST, tiny_llama.name]  # named as a visitor names it
    env = {**os.environ, "FRANKENMERGE_LOCAL_DIRS": str(tiny_llama.parent)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "lens: 1 seam(s)" in run.stdout
