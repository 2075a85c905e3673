"""The fake Hub (tests/hubserver.py), driven through huggingface_hub 2.4 itself.

huggingface_hub froze HF_ENDPOINT and friends when this module imported it, so these tests pass the endpoint
explicitly (HfApi(endpoint=...), hf_hub_download(endpoint=...)) and patch the few constants the calls read. One test
runs a fresh interpreter to check the env-var route that conftest uses (start_session_hub)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import hubserver
from hubserver import (
    SAFETENSORS_PREFETCH_BYTES,
    FakeHub,
    add_sharded_lazy_model,
    llama3_8b_config,
    llama3_8b_tensors,
    start_hub,
    start_session_hub,
)

LLAMA = "meta-llama/Meta-Llama-3-8B"
LLAMA_PARAMS = 8_030_261_248
SHARDS = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
ALICE, BOB = "hf_alice_token", "hf_bob_token"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with start_hub() as hub:
        add_sharded_lazy_model(hub, LLAMA, llama3_8b_config(), llama3_8b_tensors())
        hub.add_token(ALICE, "alice")
        hub.add_token(BOB, "bob")
        yield hub


@pytest.fixture(autouse=True)
def hf_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # hf_xet is installed and would take over uploads/downloads; the cache must not be the user's.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(autouse=True)
def fake_handled_everything(hub: FakeHub) -> Iterator[None]:
    yield
    assert hub.unhandled == [], "huggingface_hub called Hub API that FakeHub lacks"
    assert hub.errors == []


@pytest.fixture
def api(hub: FakeHub) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)  # anonymous unless a call passes a token


def test_model_info_lists_siblings_with_sizes(hub: FakeHub, api: HfApi) -> None:
    info = api.model_info(LLAMA, files_metadata=True)
    assert info.sha == hub.commit_sha(LLAMA)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {"config.json", "tokenizer_config.json", "model.safetensors.index.json", *SHARDS}
    config = siblings["config.json"]
    assert config.lfs is None and config.size == len(json.dumps(llama3_8b_config(), indent=2))
    for name in SHARDS:
        shard = siblings[name]
        assert shard.lfs is not None and shard.lfs.size == shard.size and re.fullmatch("[0-9a-f]{64}", shard.lfs.sha256)
    shard_bytes = sum(siblings[name].size or 0 for name in SHARDS)
    assert 2 * LLAMA_PARAMS < shard_bytes < 2 * LLAMA_PARAMS + 4 * 2 * SAFETENSORS_PREFETCH_BYTES  # data + headers
    assert info.safetensors is not None and info.safetensors.total == LLAMA_PARAMS
    assert info.config == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}

    plain = api.model_info(LLAMA, revision=info.sha)  # by commit sha, without blobs
    assert plain.sha == info.sha and all(s.size is None for s in plain.siblings or [])


def test_hf_hub_download_returns_the_file(hub: FakeHub) -> None:
    before = hub.bytes_served[(LLAMA, "config.json")]
    path = Path(hf_hub_download(LLAMA, "config.json", endpoint=hub.url, token=False))
    assert json.loads(path.read_text()) == llama3_8b_config()
    assert hub.bytes_served[(LLAMA, "config.json")] - before == path.stat().st_size
    assert [r.method for r in hub.requests if r.path.endswith("/config.json")][-2:] == ["HEAD", "GET"]


def test_get_safetensors_metadata_reads_headers_only(hub: FakeHub, api: HfApi) -> None:
    meta = api.get_safetensors_metadata(LLAMA)
    assert meta.sharded and set(meta.files_metadata) == set(SHARDS)
    tensors = {name: (t.shape, t.dtype) for fm in meta.files_metadata.values() for name, t in fm.tensors.items()}
    assert tensors == {name: (shape, dtype) for name, (shape, dtype) in llama3_8b_tensors().items()}
    assert len(tensors) == 291
    assert meta.parameter_count == {"BF16": LLAMA_PARAMS}
    assert meta.metadata == {"total_size": 2 * LLAMA_PARAMS}
    assert sum(n for (repo, _), n in hub.weight_bytes_served.items() if repo == LLAMA) == 0
    shard_gets = [r for r in hub.requests if r.method == "GET" and "/model-0000" in r.path]
    assert shard_gets and all(r.status == 206 and r.range for r in shard_gets)  # never a whole-file GET

    one_call = api.get_sharded_safetensors_metadata(LLAMA)  # the Hub-side API
    assert one_call.parameter_count == meta.parameter_count and one_call.weight_map == meta.weight_map


def test_compact_and_large_headers_take_one_and_two_range_reads(hub: FakeHub, api: HfApi) -> None:
    # A real-sized header: the client's 100,001-byte first read reaches into the (zero) data, which is counted.
    hub.add_lazy_safetensors("fixtures/compact", "model.safetensors", {"w": ([1024, 1024], "F32")}, pad_header=False)
    meta = api.get_safetensors_metadata("fixtures/compact")
    assert not meta.sharded and meta.parameter_count == {"F32": 1024 * 1024}
    key = ("fixtures/compact", "model.safetensors")
    assert hub.bytes_served[key] == SAFETENSORS_PREFETCH_BYTES
    assert 0 < hub.weight_bytes_served[key] < SAFETENSORS_PREFETCH_BYTES

    # A header past 100 KB: the client asks for the rest with a second Range GET.
    many = {f"model.layers.{i}.some_rather_long_projection_name.weight": ([64, 64], "BF16") for i in range(1500)}
    hub.add_lazy_safetensors("fixtures/big-header", "model.safetensors", many, pad_header=False)
    meta = api.get_safetensors_metadata("fixtures/big-header")
    assert len(meta.files_metadata["model.safetensors"].tensors) == 1500
    ranges = [r.range for r in hub.requests if r.path.startswith("/fixtures/big-header/") and r.method == "GET"]
    assert len(ranges) == 2 and ranges[0] == "bytes=0-100000" and (ranges[1] or "").startswith("bytes=8-")
    assert hub.weight_bytes_served[("fixtures/big-header", "model.safetensors")] == 0


def test_lazy_file_downloads_as_valid_safetensors(hub: FakeHub, api: HfApi) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    hub.add_lazy_safetensors("fixtures/tiny-lazy", "model.safetensors", {"a": ([2, 3], "BF16"), "b": ([4], "F32")})
    path = api.hf_hub_download("fixtures/tiny-lazy", "model.safetensors")
    tensors = load_file(path)
    assert tensors["a"].dtype == torch.bfloat16 and tuple(tensors["a"].shape) == (2, 3)
    assert tensors["b"].dtype == torch.float32 and not tensors["b"].any()
    key = ("fixtures/tiny-lazy", "model.safetensors")
    assert hub.weight_bytes_served[key] == 2 * 3 * 2 + 4 * 4
    assert hub.bytes_served[key] == os.path.getsize(path)


def _fetch(url: str, range_: str | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Range": range_} if range_ else {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_range_requests_are_honoured(hub: FakeHub) -> None:
    url = f"{hub.url}/{LLAMA}/resolve/main/config.json"
    status, headers, data = _fetch(url)
    assert status == 200 and len(data) == int(headers["Content-Length"])
    size = len(data)

    status, headers, body = _fetch(url, "bytes=0-9")
    assert (status, body, headers["Content-Range"]) == (206, data[:10], f"bytes 0-9/{size}")
    assert _fetch(url, "bytes=-5")[2] == data[-5:]
    assert _fetch(url, "bytes=600-")[2] == data[600:]
    assert _fetch(url, "bytes=10-99999999")[2] == data[10:]
    for bad in (f"bytes={size}-", "bytes=0-1,4-5", "items=0-1"):
        status, headers, _ = _fetch(url, bad)
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}"

    status, headers, body = _fetch(url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == size
    assert headers["X-Repo-Commit"] == hub.commit_sha(LLAMA) and headers["ETag"].strip('"')
    assert not any(name.lower().startswith("x-xet") or name.lower() == "link" for name in headers)


def test_missing_repo_revision_and_file_raise_hub_errors(hub: FakeHub, api: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", endpoint=hub.url, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(LLAMA, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.hf_hub_download(LLAMA, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(LLAMA, "missing.json")
    assert api.file_exists(LLAMA, "config.json") and not api.file_exists(LLAMA, "model.safetensors")


def test_revisions_have_their_own_files_and_stable_shas(hub: FakeHub, api: HfApi) -> None:
    hub.add_file("fixtures/revs", "config.json", b'{"v": 1}')
    hub.add_file("fixtures/revs", "config.json", b'{"v": 2}', revision="v2")
    main, v2 = hub.commit_sha("fixtures/revs"), hub.commit_sha("fixtures/revs", "v2")
    assert re.fullmatch("[0-9a-f]{40}", main) and main != v2
    assert Path(api.hf_hub_download("fixtures/revs", "config.json", revision="v2")).read_bytes() == b'{"v": 2}'
    assert api.model_info("fixtures/revs", revision="v2").sha == v2
    with start_hub() as other:  # same repo and revision, same sha
        other.add_file("fixtures/revs", "config.json", b"{}")
        assert other.commit_sha("fixtures/revs") == main
        other.reset()  # ...until a reset, so client caches keyed by sha don't serve old files
        other.add_file("fixtures/revs", "config.json", b"{}")
        assert other.commit_sha("fixtures/revs") != main


def test_snapshot_download_fetches_the_tree(hub: FakeHub, api: HfApi) -> None:
    files = {"config.json": b"{}", "sub/dir/notes.txt": b"hello", "weights.bin": os.urandom(2048)}
    for path, data in files.items():
        hub.add_file("fixtures/snap", path, data)
    folder = Path(snapshot_download("fixtures/snap", endpoint=hub.url, token=False))  # in the cache: symlinks
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert sorted(api.list_repo_files("fixtures/snap")) == sorted(files)


def test_create_repo_and_upload_folder_land_files_byte_identical(hub: FakeHub, api: HfApi, tmp_path: Path) -> None:
    local = {
        "config.json": json.dumps({"hidden_size": 8}).encode(),
        "README.md": b"---\nlicense: mit\n---\n# pushed\n",
        "sub/notes.txt": b"plain text",
        "model.safetensors": os.urandom(1 << 20),  # binary: the Hub (so FakeHub) answers preupload with "lfs"
    }
    for name, data in local.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)

    url = api.create_repo("alice/pushed", token=ALICE)
    assert url == f"{hub.url}/alice/pushed" and url.repo_id == "alice/pushed"
    commit = api.upload_folder(repo_id="alice/pushed", folder_path=tmp_path, token=ALICE, commit_message="push")
    assert commit.oid == hub.commit_sha("alice/pushed")

    files = hub.repo_files("alice/pushed")
    assert files.pop(".gitattributes")  # the Hub puts one in every new repo
    assert files == local
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].user is None  # only the LFS file, sent to the batch href without a token
    assert hub.commits[-1].summary == "push" and set(hub.commits[-1].added) == set(local)

    info = api.model_info("alice/pushed", files_metadata=True, token=ALICE)
    assert {s.rfilename for s in info.siblings or [] if s.lfs} == {"model.safetensors"}
    round_trip = api.hf_hub_download("alice/pushed", "model.safetensors")
    assert Path(round_trip).read_bytes() == local["model.safetensors"]


def test_create_repo_twice_is_a_conflict(api: HfApi) -> None:
    api.create_repo("alice/taken", token=ALICE)
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("alice/taken", token=ALICE)
    assert caught.value.response.status_code == 409
    assert api.create_repo("alice/taken", token=ALICE, exist_ok=True).repo_id == "alice/taken"


def test_refused_tokens(api: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("alice/never", token="hf_unknown")
    assert caught.value.response.status_code == 401
    assert not api.repo_exists("alice/never")
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_unknown")
    assert api.whoami(token=ALICE)["name"] == "alice"

    api.create_repo("alice/guarded", token=ALICE)
    with pytest.raises(HfHubHTTPError) as caught:  # a valid token, someone else's namespace
        api.create_repo("alice/bobs", token=BOB)
    assert caught.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as caught:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/guarded", token=BOB)
    assert caught.value.response.status_code == 403


def test_private_and_gated_repos(hub: FakeHub, api: HfApi) -> None:
    hub.add_repo("alice/secret", private=True)
    hub.add_file("alice/secret", "config.json", b"{}")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/secret", token=BOB)
    assert api.model_info("alice/secret", token=ALICE).private

    hub.add_repo("meta/gated", gated=True, allowed_users=["bob"], card_data={"license": "llama3"})
    hub.add_file("meta/gated", "config.json", b"{}")
    info = api.model_info("meta/gated")  # metadata stays public
    assert info.gated == "manual" and info.card_data is not None and info.card_data.license == "llama3"
    for token in (False, ALICE):
        with pytest.raises(GatedRepoError):
            api.hf_hub_download("meta/gated", "config.json", token=token)
    assert Path(api.hf_hub_download("meta/gated", "config.json", token=BOB)).read_bytes() == b"{}"


def test_session_hub_refuses_once_huggingface_hub_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hubserver, "_session_hub", None)
    with pytest.raises(RuntimeError, match="before huggingface_hub is imported"):
        start_session_hub()


def test_session_hub_points_a_fresh_interpreter_at_the_fake() -> None:
    script = textwrap.dedent(
        """
        import json, os, sys
        sys.path.insert(0, sys.argv[1])
        from hubserver import add_sharded_lazy_model, llama3_8b_config, llama3_8b_tensors, start_session_hub

        hub = start_session_hub()  # what conftest does, before anything imports huggingface_hub
        add_sharded_lazy_model(hub, "meta-llama/Meta-Llama-3-8B", llama3_8b_config(), llama3_8b_tensors())
        hub.add_token("tok", "alice")

        from huggingface_hub import constants, get_safetensors_metadata, hf_hub_download, model_info, whoami

        info = model_info("meta-llama/Meta-Llama-3-8B", files_metadata=True)
        config = json.load(open(hf_hub_download("meta-llama/Meta-Llama-3-8B", "config.json", revision=info.sha)))
        meta = get_safetensors_metadata("meta-llama/Meta-Llama-3-8B", revision=info.sha)
        print(json.dumps({
            "endpoint": constants.ENDPOINT == hub.url,
            "xet_off": constants.HF_HUB_DISABLE_XET,
            "cache_in_temp_home": constants.HF_HUB_CACHE.startswith(os.environ["HF_HOME"]),
            "hidden_size": config["hidden_size"],
            "params": sum(meta.parameter_count.values()),
            "weight_bytes": sum(hub.weight_bytes_served.values()),
            "user": whoami(token="tok")["name"],
            "unhandled": hub.unhandled,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(Path(hubserver.__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "endpoint": True,
        "xet_off": True,
        "cache_in_temp_home": True,
        "hidden_size": 4096,
        "params": LLAMA_PARAMS,
        "weight_bytes": 0,
        "user": "alice",
        "unhandled": [],
    }
