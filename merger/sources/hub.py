"""Hub models: metadata from the Hub's API (config, tokenizer files, safetensors headers);
weights only when a build needs them. Tests point `HF_ENDPOINT` at a local fake Hub.

Every call here runs with the token `hub_token` names for the current request: the web app's
visitor's sign-in, or False (no token at all: never the server's own login, which a Space's
secrets may hold, and on a Space never by default either); the CLI sets none, so huggingface_hub
uses the user's saved login. A Hub that
does not answer (a connection error, or nothing within FRANKENMERGE_HUB_TIMEOUT_S) is one sentence.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from merger.errors import HubUnavailableError, ModelRefError, UnsafeCheckpointError, UserError
from merger.host import on_space
from merger.sources import disk
from merger.sources.model_info import PICKLE_SUFFIXES, TOKENIZER_FILES, ModelInfo, check_supported, read_config
from merger.sources.safetensors_files import TensorMeta, read_header, tensor_meta

HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
HUB_TIMEOUT_SECONDS = float(os.environ.get("FRANKENMERGE_HUB_TIMEOUT_S", "10"))

# None: huggingface_hub's default (HF_TOKEN or the saved login); False: no token; else the token
_TOKEN: ContextVar[str | bool | None] = ContextVar("hub_token", default=None)


@contextmanager
def hub_token(token: str | bool | None) -> Iterator[None]:
    """Make the Hub calls inside use `token` (a visitor's sign-in; False: none). The token lives in
    this context only: never stored, never logged."""
    reset = _TOKEN.set(token)
    try:
        yield
    finally:
        _TOKEN.reset(reset)


def current_token() -> str | bool | None:
    """The token Hub calls use now. On a Space nothing falls back to the Space's own login: what no
    visitor's sign-in names runs with no token at all."""
    token = _TOKEN.get()
    return False if token is None and on_space() else token


@contextmanager
def hub_answers() -> Iterator[None]:
    """Turn a Hub that does not answer into one sentence (HubUnavailableError). huggingface_hub raises
    httpx2's transport errors, or LocalEntryNotFoundError when a file it could not fetch is not cached."""
    try:
        yield
    except (httpx2.TransportError, LocalEntryNotFoundError):
        raise HubUnavailableError() from None


def split_ref(ref: str) -> tuple[str, str | None]:
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def read_hub(ref: str) -> ModelInfo:
    repo_id, revision = split_ref(ref)
    token = current_token()
    try:
        with hub_answers():
            info, paths, st_meta = _read_metadata(ref, repo_id, revision, token)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        gated = isinstance(exc, GatedRepoError)
        why = "is gated: accept its licence on the Hub and sign in" if gated else "was not found on the Hub"
        raise ModelRefError(f"'{repo_id}' {why}") from None
    except RevisionNotFoundError:
        raise ModelRefError(f"'{repo_id}' has no revision '{revision}'") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelRefError(f"could not read '{ref}' from the Hub: {type(exc).__name__}") from None
    tensors = {
        name: tensor_meta(name, t.dtype, t.shape, ref)
        for file_meta in st_meta.files_metadata.values()
        for name, t in file_meta.tensors.items()
    }
    card = info.card_data
    model = ModelInfo(
        ref=ref,
        config=read_config(paths["config.json"], ref),
        tensors=tensors,
        repo_id=repo_id,
        revision=revision,
        commit=info.sha or revision,
        license=getattr(card, "license", None) if card else None,
        tokenizer_dir=paths["config.json"].parent,
    )
    check_supported(model)
    return model


def _read_metadata(ref: str, repo_id: str, revision: str | None, token: str | bool | None):
    """The repo's info, its config and tokenizer files on disk, and its safetensors headers."""
    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token, timeout=HUB_TIMEOUT_SECONDS)
    names = {s.rfilename for s in info.siblings or []}
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise UnsafeCheckpointError(
                f"'{ref}' only has pickled weights ({', '.join(pickled[:3])}); they can run code "
                "when loaded, so we never open them. Pick a repo with .safetensors weights"
            )
        raise ModelRefError(f"'{ref}' has no .safetensors weights")
    commit = info.sha or revision
    small = [n for n in ("config.json", *TOKENIZER_FILES) if n in names]
    paths = {
        n: Path(hf_hub_download(repo_id, n, revision=commit, token=token, etag_timeout=HUB_TIMEOUT_SECONDS))
        for n in small
    }
    if "config.json" not in paths:
        raise ModelRefError(f"'{ref}' has no config.json, so it is not a transformers model")
    st_meta = get_safetensors_metadata(repo_id, revision=commit, token=token, timeout=HUB_TIMEOUT_SECONDS)
    return info, paths, st_meta


def download_weights(model: ModelInfo) -> ModelInfo:
    """The same model with its safetensors on disk (and byte offsets known); the Hub cache is then
    kept within the disk budget (`merger.sources.disk`), least recently used models evicted first."""
    if model.local_dir is not None:
        return model

    disk.check_fits(model)
    try:
        with hub_answers():
            folder = Path(
                snapshot_download(
                    model.repo_id,
                    revision=model.commit,
                    allow_patterns=["*.safetensors", "*.json", *TOKENIZER_FILES],
                    token=current_token(),
                    etag_timeout=HUB_TIMEOUT_SECONDS,
                )
            )
    except (HfHubHTTPError, OSError) as exc:
        raise ModelRefError(f"could not download '{model.ref}': {type(exc).__name__}") from None
    disk.trim_hub_cache(keep=model.repo_id)
    tensors: dict[str, TensorMeta] = {}
    for st in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(st)[0])
    return ModelInfo(**{**model.__dict__, "tensors": tensors, "local_dir": folder, "tokenizer_dir": folder})


def push_folder(folder: Path, repo_name: str, *, token: str | bool | None, private: bool = False) -> str:
    """Upload an exported model folder as a new repo; returns its URL. `repo_name` without an
    owner goes to the token's own namespace. `token` False: the visitor has none (never fall back to
    the server's own login). The token is passed through, never stored or logged."""
    if token is False:
        raise UserError("sign in with Hugging Face (or paste a token with write access) to publish")
    api = HfApi(token=token or None)
    with hub_answers():
        return _push(api, folder, repo_name, private)


def _push(api: HfApi, folder: Path, repo_name: str, private: bool) -> str:
    try:
        owner = api.whoami()["name"]
    except HfHubHTTPError:
        raise UserError("the Hub refused this token: sign in again or paste a token with write access") from None
    except (OSError, KeyError):
        raise UserError("not signed in to the Hub: sign in or paste a token with write access") from None
    repo_id = repo_name.strip() if "/" in repo_name else f"{owner}/{repo_name.strip()}"
    if not HUB_REPO_RE.match(repo_id):
        raise UserError(f"'{repo_name}' is not a valid repo name (letters, digits, '-', '_', '.')")
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 409:
            raise UserError(f"'{repo_id}' already exists on the Hub; choose another name") from None
        if status in (401, 403):
            raise UserError(f"the Hub refused to create '{repo_id}' with this token (no write access?)") from None
        raise UserError(f"the Hub could not create '{repo_id}' ({status})") from None
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload a Frankenmerge Studio merge")
    return str(url)
