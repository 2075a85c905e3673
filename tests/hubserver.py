"""A fake Hugging Face Hub for tests, built on the standard library only (http.server + threading).

`FakeHub` serves, from memory, the part of the Hub's HTTP API that huggingface_hub 2.4 uses to read model
metadata, download files and push models:

- `GET  /api/models/{repo}[/revision/{rev}]`           model_info / repo_info (`?blobs=true` adds sizes and LFS data)
- `GET  /api/models/{repo}/tree/{rev}[/{path}]`         list_repo_tree / list_repo_files / snapshot_download
- `GET  /api/models/{repo}/safetensors-metadata/{file}` get_sharded_safetensors_metadata (main only)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`               hf_hub_download, file_exists, safetensors header reads (Range)
- `GET  /api/whoami-v2`, `POST /api/repos/create`, `DELETE /api/repos/delete`, `POST /api/validate-yaml`
- `POST /api/models/{repo}/preupload/{rev}`, `POST /{repo}.git/info/lfs/objects/batch` (basic transfer, PUT to this
  server), `POST /api/models/{repo}/commit/{rev}` (NDJSON)                           create_commit / upload_folder

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which is what
huggingface_hub maps to its exceptions; the status code alone is not enough on an http:// endpoint.

Safetensors weights can be lazy: a real header followed by a virtual data section of zeros generated while it is
sent, so an 8B-parameter model costs a few hundred KB of memory. Bytes sent are counted per file.

Scope: model repos only (no datasets/spaces), branches only (no tags or PRs), never xet. A request no route matches
gets a 404 without `X-Error-Code` and is recorded in `FakeHub.unhandled`.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET once, when first imported: see
`start_session_hub` to point a whole pytest session at a FakeHub. In a process that already imported it,
`HfApi(endpoint=hub.url)` and `hf_hub_download(..., endpoint=hub.url)` work too, provided
`huggingface_hub.constants.HF_HUB_DISABLE_XET` is True (hf_xet is installed, and the upload path would take it).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Tensor spec: name -> (shape, safetensors dtype such as "BF16").
TensorSpec = Mapping[str, tuple[Sequence[int], str]]

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip

# huggingface_hub 2.4 reads every safetensors header with a first `Range: bytes=0-100000` GET.
SAFETENSORS_PREFETCH_BYTES = 100_001

# The Hub stores files as LFS when large or binary, or when .gitattributes says so (these are its defaults).
_LFS_MIN_SIZE = 10 * 1024 * 1024
_LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in _LFS_SUFFIXES).encode()

_JSON = "application/json; charset=utf-8"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_DATE = "2024-04-18T00:00:00.000Z"  # fixed, so model_info answers are reproducible
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_REPO_ID_RE = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


# --------------------------------------------------------------------------------------------------------- blobs


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # The 512-byte sample may end inside a multi-byte character: that alone is not binary.
        return not (err.reason == "unexpected end of data" and err.start >= len(sample) - 3)
    return False


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    return size >= _LFS_MIN_SIZE or path.lower().endswith(_LFS_SUFFIXES) or _is_binary(sample)


def tensor_nbytes(shape: Sequence[int], dtype: str) -> int:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    return math.prod(shape) * DTYPE_SIZES[dtype]


def _safetensors_header(head: bytes) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, from its first bytes; None if it is not one."""
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + length:
        return None
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


@dataclass(frozen=True, eq=False)
class _Blob:
    """One immutable file version. `head` holds its real bytes from offset 0; lazy files have a `head` shorter than
    `size` and read as zeros past it."""

    size: int
    sha256: str  # for lazy files a stand-in derived from the header: hashing gigabytes of zeros per fixture is waste
    git_oid: str  # what git stores: the content, or the LFS pointer of an LFS file
    lfs: bool
    head: bytes
    data_start: int | None = None  # offset of a safetensors data section
    params: dict[str, int] | None = None  # safetensors parameter count per dtype

    @classmethod
    def of(cls, data: bytes, path: str, lfs: bool | None = None) -> _Blob:
        sha = hashlib.sha256(data).hexdigest()
        return cls._build(data, len(data), sha, path, lfs)

    @classmethod
    def lazy(cls, head: bytes, size: int, path: str) -> _Blob:
        sha = hashlib.sha256(b"fakehub-lazy\0%d\0" % size + head).hexdigest()
        return cls._build(head, size, sha, path, lfs=True)

    @classmethod
    def _build(cls, head: bytes, size: int, sha: str, path: str, lfs: bool | None) -> _Blob:
        if lfs is None:
            lfs = _wants_lfs(path, size, head[:512])
        git_oid = _git_oid(_lfs_pointer(sha, size) if lfs else head)
        data_start: int | None = None
        params: dict[str, int] | None = None
        header = _safetensors_header(head) if path.endswith(".safetensors") else None
        if header is not None:
            data_start = 8 + struct.unpack("<Q", head[:8])[0]
            params = {}
            for name, info in header.items():
                if name != "__metadata__":
                    params[info["dtype"]] = params.get(info["dtype"], 0) + math.prod(info["shape"])
        return cls(size, sha, git_oid, lfs, head, data_start, params)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))

    @property
    def is_lazy(self) -> bool:
        return len(self.head) < self.size

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            if pos < len(self.head):
                chunk = self.head[pos : min(end, len(self.head), pos + _CHUNK)]
            else:
                chunk = _ZEROS[: min(end - pos, _CHUNK)]
            yield chunk
            pos += len(chunk)


def _lazy_safetensors_head(tensors: TensorSpec, pad_header: bool) -> tuple[bytes, int]:
    """(8-byte length + JSON header, data section size) of a safetensors file holding `tensors`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):  # contiguous, in name order, as safetensors lays out same-dtype tensors
        shape, dtype = tensors[name]
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    target = len(raw)
    if pad_header:
        target = max(target, SAFETENSORS_PREFETCH_BYTES - 8)
    target += -target % 8  # safetensors pads its header with spaces to 8-byte alignment
    raw += b" " * (target - len(raw))
    return struct.pack("<Q", len(raw)) + raw, offset


# --------------------------------------------------------------------------------------------------------- state


@dataclass
class _Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    allowed_users: set[str] = field(default_factory=set)
    card_data: dict[str, Any] | None = None
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    trees: dict[str, dict[str, _Blob]] = field(default_factory=dict)  # commit sha -> files
    commits_made: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # path and query as sent
    range: str | None
    status: int
    user: str | None


@dataclass(frozen=True)
class CommitRecord:
    repo_id: str
    revision: str
    oid: str
    summary: str
    user: str
    added: tuple[str, ...]
    deleted: tuple[str, ...]


@dataclass
class _Request:
    method: str
    segments: list[str]  # unquoted path segments
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    user: str | None


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # (repo_id, path, blob, start, end): file bytes streamed after the headers instead of `body`
    stream: tuple[str, str, _Blob, int, int] | None = None


def _json_response(obj: Any, status: int = 200) -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": _JSON})


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> _Response:
        # Header values must be one latin-1 line; the JSON body keeps the full message.
        one_line = " ".join(self.message.split()).encode("latin-1", "replace").decode("latin-1")
        headers = {"Content-Type": _JSON, "X-Error-Message": one_line, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _Response(self.status, json.dumps({"error": self.message, **self.extra}).encode(), headers)


def _repo_not_found(repo_id: str) -> _HttpError:
    return _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


# --------------------------------------------------------------------------------------------------------- hub


class FakeHub:
    """An in-memory Hub serving HTTP on `url` from a daemon thread. All state is guarded by one lock; file versions
    are immutable, so downloads stream without holding it."""

    url: str

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._tokens: dict[str, str] = {}
        self._orgs: dict[str, set[str]] = {}
        self._lfs_objects: dict[str, bytes] = {}  # uploaded LFS content by sha256, waiting for (or used by) commits
        self._generation = 0  # bumped by reset() so reused repo ids get fresh commit shas (client caches key on them)
        self.bytes_served: Counter[tuple[str, str]] = Counter()
        self.weight_bytes_served: Counter[tuple[str, str]] = Counter()
        self.requests: list[RequestRecord] = []
        self.commits: list[CommitRecord] = []
        self.unhandled: list[str] = []  # "METHOD /path" of requests no route matched: Hub API this fake lacks
        self.errors: list[str] = []  # bugs in the fake (answered 500)
        self._server = _Server((host, port), self)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        # A short poll interval keeps shutdown() quick (serve_forever checks for it once per interval).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"FakeHub {self.url}", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- fixtures

    def add_token(self, token: str, user: str, orgs: Iterable[str] = ()) -> None:
        """Accept `token` as `user`, who may write to repos under their name and under `orgs`."""
        with self._lock:
            self._tokens[token] = user
            self._orgs.setdefault(user, set()).update(orgs)

    def add_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        gated: bool = False,
        allowed_users: Iterable[str] = (),
        card_data: Mapping[str, Any] | None = None,
    ) -> None:
        """Create a repo with an empty `main` branch, or update its access settings. Private repos are visible and
        gated repos downloadable only by their namespace's owner (or members) and `allowed_users`. `card_data` is
        what model_info returns as `cardData` (parsed README metadata, e.g. {"license": "llama3"})."""
        with self._lock:
            repo = self._ensure_repo(repo_id)
            repo.private, repo.gated = private, gated
            repo.allowed_users = set(allowed_users)
            repo.card_data = dict(card_data) if card_data is not None else None
            self._branch(repo, "main")

    def add_file(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Put a file in `revision` (a branch, created empty if new). Fixture edits keep the branch's commit sha:
        add files before clients read them, as clients cache by commit sha."""
        self._put(repo_id, revision, path, _Blob.of(bytes(data), path))

    def add_lazy_safetensors(
        self,
        repo_id: str,
        path: str,
        tensors: TensorSpec,
        *,
        revision: str = "main",
        pad_header: bool = True,
    ) -> None:
        """A safetensors file with a real header (shapes, dtypes, offsets) and a virtual data section of zeros.

        pad_header: pad the header with spaces (valid safetensors) to at least 100,001 - 8 bytes, so huggingface_hub's
        fixed first read (`Range: bytes=0-100000`) never reaches the data section and `weight_bytes_served` stays 0
        unless weights are really read. The client then makes its second, header-only Range GET. With False the
        header is compact like real files and that first read also returns up to ~100 KB of the data section."""
        head, data_size = _lazy_safetensors_head(tensors, pad_header)
        self._put(repo_id, revision, path, _Blob.lazy(head, len(head) + data_size, path))

    def reset(self) -> None:
        """Forget repos, tokens, uploads, counters and logs; later commit shas differ from earlier ones."""
        with self._lock:
            self._repos.clear()
            self._tokens.clear()
            self._orgs.clear()
            self._lfs_objects.clear()
            self.bytes_served.clear()
            self.weight_bytes_served.clear()
            self.requests.clear()
            self.commits.clear()
            self.unhandled.clear()
            self.errors.clear()
            self._generation += 1

    # ---- inspection

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].refs[revision]

    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of the files at `revision`; lazy files are left out (they may be gigabytes)."""
        with self._lock:
            repo = self._repos[repo_id]
            tree = repo.trees[repo.refs.get(revision, revision)]
            return {path: blob.head for path, blob in sorted(tree.items()) if not blob.is_lazy}

    # ---- state helpers (call with the lock held)

    def _ensure_repo(self, repo_id: str) -> _Repo:
        if not _REPO_ID_RE.match(repo_id):
            raise ValueError(f"invalid repo id {repo_id!r}")
        return self._repos.setdefault(repo_id, _Repo(repo_id))

    def _mint_sha(self, repo: _Repo, revision: str, n: int) -> str:
        seed = f"{repo.repo_id}@{revision}" + (f"#{n}" if n else "")
        if self._generation:
            seed += f"~{self._generation}"
        return hashlib.sha1(seed.encode()).hexdigest()

    def _branch(self, repo: _Repo, revision: str) -> dict[str, _Blob]:
        if revision not in repo.refs:
            sha = self._mint_sha(repo, revision, 0)
            repo.refs[revision] = sha
            repo.trees[sha] = {}
        return repo.trees[repo.refs[revision]]

    def _put(self, repo_id: str, revision: str, path: str, blob: _Blob) -> None:
        try:
            _check_path(path)
        except _HttpError as err:
            raise ValueError(err.message) from None
        with self._lock:
            self._branch(self._ensure_repo(repo_id), revision)[path] = blob

    def _may_access(self, repo: _Repo, user: str | None) -> bool:
        if user is None:
            return False
        return user == repo.namespace or repo.namespace in self._orgs.get(user, ()) or user in repo.allowed_users

    def _readable_repo(self, repo_id: str, user: str | None, *, files: bool) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not self._may_access(repo, user)):
            raise _repo_not_found(repo_id)
        if files and repo.gated and not self._may_access(repo, user):
            raise _HttpError(
                401 if user is None else 403,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                "GatedRepo",
            )
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> tuple[_Repo, str]:
        if user is None:
            raise _HttpError(401, "Authentication required: pass a token with write access")
        repo = self._readable_repo(repo_id, user, files=False)
        if not self._may_access(repo, user):
            raise _HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    def _revision(self, repo: _Repo, revision: str) -> tuple[str, dict[str, _Blob]]:
        sha = repo.refs.get(revision) or (revision if revision in repo.trees else None)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo.trees[sha]

    def _authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        with self._lock:
            user = self._tokens.get(token)
        if user is None:  # the Hub refuses unknown tokens on every route, reads included
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _count(self, key: tuple[str, str], blob: _Blob, start: int, n: int) -> None:
        weights = 0 if blob.data_start is None else max(0, start + n - max(start, blob.data_start))
        with self._lock:
            self.bytes_served[key] += n
            if weights:
                self.weight_bytes_served[key] += weights

    # ---- routing

    def _dispatch(self, req: _Request) -> _Response:
        seg, method = req.segments, req.method
        if seg[:1] == ["api"]:
            return self._api(req, seg[1:])
        if len(seg) == 3 and seg[:2] == ["__fakehub", "lfs"] and method == "PUT":
            return self._lfs_put(seg[2], req.body)
        if len(seg) == 3 and seg[:2] == ["__fakehub", "lfs-verify"] and method == "POST":
            return self._lfs_verify(req, seg[2])
        lfs_batch = len(seg) >= 6 and seg[-4:] == ["info", "lfs", "objects", "batch"] and seg[-5].endswith(".git")
        if lfs_batch and method == "POST":
            return self._lfs_batch(req, "/".join(seg[:-4]).removesuffix(".git"))
        for at in (2, 1):  # /{ns}/{name}/resolve/... or legacy /{name}/resolve/...
            if len(seg) > at + 2 and seg[at] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(req, "/".join(seg[:at]), seg[at + 1], "/".join(seg[at + 2 :]))
        raise self._no_route(req)

    def _no_route(self, req: _Request) -> _HttpError:
        line = f"{req.method} /{'/'.join(req.segments)}"
        with self._lock:
            self.unhandled.append(line)
        return _HttpError(404, f"FakeHub has no route for {line}")

    _MODEL_ACTIONS = ("revision", "tree", "preupload", "commit", "safetensors-metadata")

    def _api(self, req: _Request, seg: list[str]) -> _Response:
        method = req.method
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami(req)
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(req)
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(req)
        if seg == ["validate-yaml"] and method == "POST":  # sent before committing a README.md
            return _json_response({"errors": [], "warnings": []})
        if seg[:1] == ["models"] and len(seg) >= 2:
            rest = seg[1:]
            cut = 2 if len(rest) == 2 or (len(rest) > 2 and rest[2] in self._MODEL_ACTIONS) else 1
            repo_id, action, args = "/".join(rest[:cut]), rest[cut : cut + 1], rest[cut + 1 :]
            if not action and method == "GET":
                return self._model_info(req, repo_id, "main")
            if action == ["revision"] and args and method == "GET":
                return self._model_info(req, repo_id, "/".join(args))
            if action == ["tree"] and args and method == "GET":
                return self._tree(req, repo_id, args[0], "/".join(args[1:]))
            if action == ["safetensors-metadata"] and args and method == "GET":
                return self._safetensors_metadata(req, repo_id, "/".join(args))
            if action == ["preupload"] and len(args) == 1 and method == "POST":
                return self._preupload(req, repo_id, args[0])
            if action == ["commit"] and len(args) == 1 and method == "POST":
                return self._commit(req, repo_id, args[0])
        raise self._no_route(req)

    # ---- read endpoints

    def _resolve(self, req: _Request, repo_id: str, revision: str, path: str) -> _Response:
        with self._lock:
            repo = self._readable_repo(repo_id, req.user, files=True)
            sha, tree = self._revision(repo, revision)
            blob = tree.get(path)
        if blob is None:  # X-Repo-Commit lets the client cache the miss (.no_exist)
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        start, end, status = 0, blob.size, 200
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        range_header = req.headers.get("Range")
        if range_header is not None:
            start, end = self._parse_range(range_header, blob.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        return _Response(status, headers=headers, stream=(repo_id, path, blob, start, end))

    @staticmethod
    def _parse_range(value: str, size: int) -> tuple[int, int]:
        """[start, end) of a single `bytes=` range. Anything else is refused rather than ignored: ignoring Range
        would make clients download whole files without noticing."""
        match = _RANGE_RE.match(value.strip())
        message = f"Range not satisfiable: {value!r} (size {size})"
        if match is None or not (match[1] or match[2]):
            message += "; FakeHub serves one `bytes=a-b` range per request"
        unsatisfiable = _HttpError(416, message, headers={"Content-Range": f"bytes */{size}"})
        if match is None or not (match[1] or match[2]):
            raise unsatisfiable
        if not match[1]:  # suffix range: the last n bytes
            n = int(match[2])
            if n == 0 or size == 0:
                raise unsatisfiable
            return max(0, size - n), size
        start = int(match[1])
        last = int(match[2]) if match[2] else size - 1
        if start >= size or last < start:
            raise unsatisfiable
        return start, min(last + 1, size)

    def _model_info(self, req: _Request, repo_id: str, revision: str) -> _Response:
        with self._lock:
            repo = self._readable_repo(repo_id, req.user, files=False)
            sha, tree = self._revision(repo, revision)
            files = sorted(tree.items())
            card_data, private, gated = repo.card_data, repo.private, repo.gated
        blobs = _flag(req.query, "blobs")
        siblings: list[dict[str, Any]] = []
        for path, blob in files:
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": private,
            "gated": "manual" if gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(blob.size for _, blob in files),
        }
        if card_data is not None:
            info["cardData"] = card_data
        config_blob = tree.get("config.json")
        if config_blob is not None and not config_blob.is_lazy:
            try:
                config = json.loads(config_blob.head)
            except ValueError:
                config = None
            if isinstance(config, dict):  # the Hub returns a few config fields in model_info
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        params: Counter[str] = Counter()
        for _, blob in files:
            params.update(blob.params or {})
        if params:
            info["safetensors"] = {"parameters": dict(params), "total": sum(params.values())}
        return _json_response(info)

    def _tree(self, req: _Request, repo_id: str, revision: str, prefix: str) -> _Response:
        with self._lock:
            repo = self._readable_repo(repo_id, req.user, files=False)
            _, tree = self._revision(repo, revision)
            files = sorted(tree.items())
        recursive = _flag(req.query, "recursive")
        base = prefix.strip("/")
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, blob in files:
            if base and not path.startswith(base + "/"):
                continue
            parts = path[len(base) + 1 :].split("/") if base else path.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = "/".join(([base] if base else []) + parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    oid = hashlib.sha1(folder.encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
                entries.append(entry)
        if base and not entries:
            raise _HttpError(404, f"Entry not found: {base}", "EntryNotFound")
        return _json_response(entries)

    def _safetensors_metadata(self, req: _Request, repo_id: str, index_path: str) -> _Response:
        # Shape inferred from huggingface_hub's get_sharded_safetensors_metadata: {"index": ..., "headers": ...}.
        with self._lock:
            repo = self._readable_repo(repo_id, req.user, files=True)
            sha, tree = self._revision(repo, "main")
            tree = dict(tree)  # fixtures may still add files to it
        index_blob = tree.get(index_path)
        if index_blob is None:
            raise _HttpError(404, f"Entry not found: {index_path}", "EntryNotFound", {"X-Repo-Commit": sha})
        index = json.loads(index_blob.head)
        headers: dict[str, Any] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            shard_blob = tree.get(shard)
            header = _safetensors_header(shard_blob.head) if shard_blob is not None else None
            if header is None:
                raise _HttpError(404, f"Entry not found: {shard}", "EntryNotFound", {"X-Repo-Commit": sha})
            headers[shard] = header
        return _json_response({"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})

    # ---- account and write endpoints

    def _whoami(self, req: _Request) -> _Response:
        if req.user is None:
            raise _HttpError(401, "Authentication required: pass a token")
        with self._lock:
            orgs = sorted(self._orgs.get(req.user, ()))
        return _json_response({
            "type": "user",
            "id": hashlib.sha1(req.user.encode()).hexdigest()[:24],
            "name": req.user,
            "fullname": req.user,
            "isPro": False,
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fakehub", "role": "write"}},
        })  # fmt: skip

    def _payload(self, req: _Request) -> dict[str, Any]:
        try:
            payload = json.loads(req.body or b"{}")
        except ValueError:
            raise _HttpError(400, "Request body is not JSON") from None
        if not isinstance(payload, dict):
            raise _HttpError(400, "Request body must be a JSON object")
        return payload

    def _repo_payload(self, req: _Request) -> tuple[str, str, dict[str, Any]]:
        """(user, repo id, payload) of /api/repos/* requests, which name the repo in the body."""
        if req.user is None:
            raise _HttpError(401, "Authentication required: pass a token with write access")
        payload = self._payload(req)
        if payload.get("type") not in (None, "model"):
            raise _HttpError(400, f"FakeHub serves model repos only, not {payload['type']!r}")
        name, organization = payload.get("name"), payload.get("organization")
        repo_id = f"{organization or req.user}/{name}"
        if not isinstance(name, str) or not _REPO_ID_RE.match(repo_id):
            raise _HttpError(400, f"Invalid repo id: {repo_id!r}")
        return req.user, repo_id, payload

    def _create_repo(self, req: _Request) -> _Response:
        user, repo_id, payload = self._repo_payload(req)
        url = f"{self.url}/{repo_id}"
        with self._lock:
            namespace = repo_id.split("/")[0]
            if namespace != user and namespace not in self._orgs.get(user, ()):
                raise _HttpError(403, f"You don't have the rights to create a model under the namespace {namespace}")
            if repo_id in self._repos:  # the client reads `url` from the 409 too
                raise _HttpError(409, "You already created this model repo", extra={"url": url})
            repo = self._ensure_repo(repo_id)
            repo.private = payload.get("visibility") == "private" or payload.get("private") is True
            self._branch(repo, "main")[".gitattributes"] = _Blob.of(GITATTRIBUTES, ".gitattributes")
        return _json_response({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: _Request) -> _Response:
        user, repo_id, _ = self._repo_payload(req)
        with self._lock:
            self._writable_repo(repo_id, user)
            del self._repos[repo_id]
        return _json_response({})

    def _preupload(self, req: _Request, repo_id: str, revision: str) -> _Response:
        if _flag(req.query, "create_pr"):
            raise _HttpError(400, "FakeHub does not support pull requests (create_pr)")
        files = self._payload(req).get("files")
        if not isinstance(files, list):
            raise _HttpError(400, "Expected {'files': [...]}")
        with self._lock:
            repo, _ = self._writable_repo(repo_id, req.user)
            sha, tree = self._revision(repo, revision)
            tree = dict(tree)
        answers = []
        for item in files:
            path = _check_path(str(item["path"]))
            lfs = _wants_lfs(path, int(item["size"]), base64.b64decode(item.get("sample", "")))
            existing = tree.get(path)  # its oid lets the client skip unchanged files
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.git_oid
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _json_response({"files": answers, "commitOid": sha})

    def _lfs_batch(self, req: _Request, repo_id: str) -> _Response:
        payload = self._payload(req)
        if payload.get("operation") != "upload":
            raise _HttpError(400, "FakeHub's LFS batch endpoint only handles uploads")
        with self._lock:
            self._writable_repo(repo_id, req.user)
            stored = set(self._lfs_objects)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            if not _SHA256_RE.match(oid):
                raise _HttpError(422, f"Invalid LFS oid {oid!r}")
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in stored:  # no actions = already uploaded
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/__fakehub/lfs/{oid}"},
                    "verify": {"href": f"{self.url}/__fakehub/lfs-verify/{oid}"},
                }
            objects.append(answer)
        response = _json_response({"transfer": "basic", "objects": objects})
        response.headers["Content-Type"] = "application/vnd.git-lfs+json"
        return response

    def _lfs_put(self, oid: str, body: bytes) -> _Response:
        # Reached through the batch answer's href; like a presigned storage URL it takes no Authorization.
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, f"Uploaded bytes do not hash to {oid}")
        with self._lock:
            self._lfs_objects[oid] = body
        return _Response(200)

    def _lfs_verify(self, req: _Request, oid: str) -> _Response:
        payload = self._payload(req)
        with self._lock:
            data = self._lfs_objects.get(oid)
        if data is None or payload.get("size") != len(data):
            raise _HttpError(422, f"LFS object {oid} was not uploaded (or has another size)")
        return _json_response({})

    def _commit(self, req: _Request, repo_id: str, revision: str) -> _Response:
        if _flag(req.query, "create_pr"):
            raise _HttpError(400, "FakeHub does not support pull requests (create_pr)")
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError:
            raise _HttpError(400, "Commit payload is not NDJSON") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise _HttpError(400, "Commit payload has no header line")
        with self._lock:
            repo, user = self._writable_repo(repo_id, req.user)
            head, old_tree = self._revision(repo, revision)
            if revision not in repo.refs:
                raise _HttpError(400, f"Can only commit to a branch, not {revision}")
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise _HttpError(412, f"A commit has happened since {parent}; the head of {revision} is {head}")
            lfs_objects = dict(self._lfs_objects)
            tree = dict(old_tree)
        added: list[str] = []
        deleted: list[str] = []
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "header":
                continue
            path = str(value.get("path", ""))
            path = _check_path(path.rstrip("/") if key == "deletedFolder" else path)
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                tree[path] = _Blob.of(base64.b64decode(value["content"]), path, lfs=False)
                added.append(path)
            elif key == "lfsFile":
                data = lfs_objects.get(value.get("oid", ""))
                if data is None:
                    raise _HttpError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
                tree[path] = _Blob.of(data, path, lfs=True)
                added.append(path)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                deleted.append(path)
            elif key == "deletedFolder":
                gone = [p for p in tree if p.startswith(path + "/")]
                if not gone:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
                deleted.extend(gone)
            else:
                raise _HttpError(400, f"FakeHub does not support commit operation {key!r}")
        with self._lock:
            if repo.refs.get(revision) != head:
                raise _HttpError(409, f"Concurrent commit on {revision}; retry")
            repo.commits_made += 1
            sha = self._mint_sha(repo, revision, repo.commits_made)
            repo.trees[sha] = tree
            repo.refs[revision] = sha
            summary = str(header.get("summary", ""))
            self.commits.append(CommitRecord(repo_id, revision, sha, summary, user, tuple(added), tuple(deleted)))
        return _json_response({
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
            "commitMessage": summary,
            "hookOutput": "",
            "pullRequestUrl": None,
        })  # fmt: skip


# --------------------------------------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: FakeHub) -> None:
        super().__init__(address, _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    timeout = 60  # idle keep-alive connections are dropped so their threads end
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read FakeHub.requests instead of stderr noise

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _read_body(self) -> bytes:
        # Bodies are read before routing so that error answers leave the keep-alive connection in sync.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        hub = self.server.hub
        user: str | None = None
        try:
            body = self._read_body()
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            user = hub._authenticate(self.headers.get("Authorization"))
            request = _Request(method, segments, parse_qs(split.query), self.headers, body, user)
            response = hub._dispatch(request)
        except _HttpError as err:
            response = err.response()
        except Exception as exc:  # a bug in the fake: answer it rather than drop the connection
            with hub._lock:
                hub.errors.append(f"{method} {self.path}: {exc!r}")
            response = _HttpError(500, f"FakeHub internal error: {exc!r}").response()
        with hub._lock:  # logged before answering, so a client that got its answer also sees the record
            hub.requests.append(RequestRecord(method, self.path, self.headers.get("Range"), response.status, user))
        try:
            self._write(method, response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write(self, method: str, response: _Response) -> None:
        stream = response.stream
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(stream[4] - stream[3] if stream else len(response.body)))
        self.end_headers()
        if method == "HEAD":
            return
        if stream is None:
            self.wfile.write(response.body)
            return
        repo_id, path, blob, start, end = stream
        pos = start
        for chunk in blob.chunks(start, end):
            # counted before it is sent: a client that has read the last chunk may look at once
            self.server.hub._count((repo_id, path), blob, pos, len(chunk))
            self.wfile.write(chunk)
            pos += len(chunk)


# --------------------------------------------------------------------------------------------------------- start


def start_hub() -> FakeHub:
    """A FakeHub on 127.0.0.1 at a free port, served from a daemon thread."""
    return FakeHub()


_session_hub: FakeHub | None = None


def start_session_hub() -> FakeHub:
    """Start a FakeHub and point huggingface_hub at it through the environment; returns the same hub if called again.

    huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET into constants when first imported, so this
    must run before anything imports it: call it at the top of tests/conftest.py, at import time, before importing
    the code under test:

        from hubserver import start_session_hub   # or `from tests.hubserver ...` if tests/ is a package
        HUB = start_session_hub()

        @pytest.fixture
        def hub() -> FakeHub:
            HUB.reset()   # optional per-test isolation; commit shas change so client caches don't go stale
            return HUB

    Sets HF_ENDPOINT, HF_HOME (a temporary directory, removed at exit, so no real token or cache is used),
    HF_HUB_DISABLE_XET=1, HF_HUB_DISABLE_TELEMETRY=1, HF_HUB_DISABLE_PROGRESS_BARS=1; removes HF_TOKEN,
    HF_HUB_CACHE, HF_HUB_OFFLINE and the like; adds the hub to NO_PROXY. Pass tokens explicitly in tests.
    """
    global _session_hub
    if _session_hub is not None:
        return _session_hub
    if "huggingface_hub" in sys.modules:
        raise RuntimeError(
            "start_session_hub() must run before huggingface_hub is imported: it reads HF_ENDPOINT once, at import. "
            "Call it at the top of conftest.py, or use HfApi(endpoint=hub.url) with start_hub()."
        )
    hub = start_hub()
    home = tempfile.mkdtemp(prefix="fakehub-hf-home-")
    for name in (
        "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    ):  # fmt: skip
        os.environ.pop(name, None)
    os.environ.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=home,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    for name in ("NO_PROXY", "no_proxy"):  # a proxy from the environment must not intercept 127.0.0.1
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    atexit.register(shutil.rmtree, home, True)
    atexit.register(hub.shutdown)
    _session_hub = hub
    return hub


# --------------------------------------------------------------------------------------------------------- models


def llama3_8b_tensors() -> dict[str, tuple[list[int], str]]:
    """Tensor names and shapes of meta-llama/Meta-Llama-3-8B (BF16, untied lm_head): 8,030,261,248 parameters."""
    hidden, kv, inter, vocab = 4096, 1024, 14336, 128256
    tensors: dict[str, tuple[list[int], str]] = {"model.embed_tokens.weight": ([vocab, hidden], "BF16")}
    for i in range(32):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": ([hidden, hidden], "BF16"),
            p + "self_attn.k_proj.weight": ([kv, hidden], "BF16"),
            p + "self_attn.v_proj.weight": ([kv, hidden], "BF16"),
            p + "self_attn.o_proj.weight": ([hidden, hidden], "BF16"),
            p + "mlp.gate_proj.weight": ([inter, hidden], "BF16"),
            p + "mlp.up_proj.weight": ([inter, hidden], "BF16"),
            p + "mlp.down_proj.weight": ([hidden, inter], "BF16"),
            p + "input_layernorm.weight": ([hidden], "BF16"),
            p + "post_attention_layernorm.weight": ([hidden], "BF16"),
        })  # fmt: skip
    tensors["model.norm.weight"] = ([hidden], "BF16")
    tensors["lm_head.weight"] = ([vocab, hidden], "BF16")
    return tensors


def llama3_8b_config() -> dict[str, Any]:
    """config.json of meta-llama/Meta-Llama-3-8B."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    }


def add_sharded_lazy_model(
    hub: FakeHub,
    repo_id: str,
    config: Mapping[str, Any],
    tensors: TensorSpec,
    shards: int = 4,
    *,
    revision: str = "main",
    pad_header: bool = True,
) -> dict[str, Any]:
    """Publish a transformers-style sharded model: config.json, a tiny tokenizer_config.json,
    model.safetensors.index.json and `shards` lazy files model-0000i-of-0000N.safetensors (tensors in the given
    order, split into runs of about equal bytes). Returns the index."""
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"need 1 <= shards <= {len(names)} (the number of tensors), got {shards}")
    sizes = {name: tensor_nbytes(*tensors[name]) for name in names}
    total = sum(sizes.values())
    target = total / shards
    groups: list[dict[str, tuple[Sequence[int], str]]] = [{} for _ in range(shards)]
    done, shard = 0, 0
    for i, name in enumerate(names):
        wanted = min(shards - 1, int((done + sizes[name] / 2) // target)) if target else 0
        shard = max(shard, wanted, shards - (len(names) - i))  # every shard keeps at least one tensor
        groups[shard][name] = tensors[name]
        done += sizes[name]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{shards:05d}.safetensors"
        hub.add_lazy_safetensors(repo_id, filename, group, revision=revision, pad_header=pad_header)
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tokenizer_config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    hub.add_file(repo_id, "config.json", json.dumps(config, indent=2).encode(), revision)
    hub.add_file(repo_id, "tokenizer_config.json", json.dumps(tokenizer_config, indent=2).encode(), revision)
    hub.add_file(repo_id, "model.safetensors.index.json", json.dumps(index, indent=2).encode(), revision)
    return index
