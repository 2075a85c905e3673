"""Model code (torch, transformers' model classes) takes seconds to import, so `python app.py`
imports it in the background while the page opens. transformers' lazy module is not safe to
import from two threads at once: a request that imports `AutoTokenizer` while the background
import runs gets "cannot import name 'AutoTokenizer'". So every handler that needs model code
waits here first (a moment, and only in the seconds after a start)."""

from __future__ import annotations

import importlib
import logging
import threading

from merger.errors import exception_line

log = logging.getLogger(__name__)
MODEL_CODE = ("merger.build.assemble", "merger.lens.search", "transformers.models.auto.tokenization_auto")

_imported = threading.Event()
_imported.set()  # nothing is importing until import_in_background() is called


def import_in_background(modules: tuple[str, ...] = MODEL_CODE) -> threading.Thread:
    """Start importing `modules` in a thread; `wait_for_imports()` waits for it to finish."""
    _imported.clear()

    def run() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception as exc:  # the request that needs it imports it again and says why
            log.warning("background import failed: %s", exception_line(exc))
        finally:
            _imported.set()

    thread = threading.Thread(target=run, name="import-model-code", daemon=True)
    thread.start()
    return thread


def wait_for_imports() -> None:
    _imported.wait()
