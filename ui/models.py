"""The page's model metadata: references resolved under the web policy (bundled models, allowed
folders, Hub ids; never a visitor's path), cached because the preview re-plans on every edit, and
read from the Hub as the visitor (their sign-in, or no token at all: never the server's own login).

What anyone may read (bundled, allowed folders, public Hub models) is read without a token and
cached for everyone. A model the anonymous read refuses (gated, private) is read again with the
visitor's token, and that answer is cached for that token only (keyed by its SHA-256, the token
itself never kept), so no visitor is served another's gated or private metadata. Run locally, a
visitor without a sign-in is the machine's own user: their saved login is used.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr

from merger.errors import HubUnavailableError, ModelRefError
from merger.host import on_space
from merger.plan import Plan, make_plan
from merger.recipe import Recipe
from merger.recipe.mergekit_yaml import recipe_from_yaml
from merger.sources.catalog import LocalPolicy, resolve
from merger.sources.hub import current_token, hub_token
from merger.sources.model_info import ModelInfo
from ui.guard import check_current

POLICY = LocalPolicy.for_web()
VISITOR_CACHE_SIZE = 64


@functools.lru_cache(maxsize=64)
def public_info(ref: str) -> ModelInfo:
    """Metadata anyone may read (no token sent)."""
    with hub_token(False):
        return resolve(ref, POLICY)


_visitor_cache: OrderedDict[tuple[str, str], ModelInfo] = OrderedDict()
_visitor_lock = threading.Lock()


def model_info(ref: str) -> ModelInfo:
    """Metadata of `ref` as the current visitor may read it (`as_visitor` names them)."""
    try:
        return public_info(ref)
    except HubUnavailableError:
        raise
    except ModelRefError:
        token = current_token()
        if token is False:
            raise
    key = (ref, "saved login" if token is None else hashlib.sha256(str(token).encode()).hexdigest())
    with _visitor_lock:
        if key in _visitor_cache:
            _visitor_cache.move_to_end(key)
            return _visitor_cache[key]
    info = resolve(ref, POLICY)  # as the visitor: current_token() is theirs
    with _visitor_lock:
        _visitor_cache[key] = info
        while len(_visitor_cache) > VISITOR_CACHE_SIZE:
            _visitor_cache.popitem(last=False)
    return info


def plan_recipe(recipe: Recipe) -> Plan:
    """The recipe's plan under the web policy; before each model's metadata is read, the request's
    work may stop."""

    def checked(ref: str) -> ModelInfo:
        check_current()
        return model_info(ref)

    return make_plan(recipe, checked)


def plan_for(recipe_yaml: str) -> Plan:
    """The plan of a recipe's YAML (`plan_recipe`)."""
    return plan_recipe(recipe_from_yaml(recipe_yaml))


def visitor_token(oauth_token: gr.OAuthToken | None, pasted: str | None = None) -> str | bool | None:
    """The token a visitor's Hub calls run with: their sign-in, else a token they pasted; else on a
    Space none at all (never the Space's own login), and locally the machine's saved login (None)."""
    if oauth_token is not None:
        return oauth_token.token
    if pasted and pasted.strip():
        return pasted.strip()
    return False if on_space() else None


@contextmanager
def visitor(oauth_token: gr.OAuthToken | None, pasted: str | None = None) -> Iterator[None]:
    """Hub reads, downloads and uploads inside run as the visitor (`visitor_token`)."""
    with hub_token(visitor_token(oauth_token, pasted)):
        yield


def as_visitor(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A handler that takes `oauth_token: gr.OAuthToken | None` (Gradio passes the visitor's sign-in)
    and does its Hub work as that visitor."""
    signature = inspect.signature(handler)

    @functools.wraps(handler)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        with visitor(bound.arguments.get("oauth_token")):
            return handler(*args, **kwargs)

    return run
