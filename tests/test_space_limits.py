"""A Space's limits: its memory is the container's (cgroup, or the Space's MEMORY variable), not the
host's that psutil reports; its disk (50 GB) holds the Hub cache within a budget and export
archives only while they are wanted."""

import os
import time
import zipfile
from types import SimpleNamespace

import huggingface_hub.constants
import psutil
import pytest
from gradio.utils import get_upload_folder

from merger.errors import PlacementError, UserError
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import container, devices
from merger.sources import disk
from merger.sources.hub import download_weights
from ui import models

from refs import ANY_PATH
from spacekit import publish

GIB = 2**30


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """A cgroup v2 memory controller of our own making: write its files, then read limits from it."""
    monkeypatch.setattr(container, "CGROUP_ROOT", tmp_path)
    monkeypatch.delenv("MEMORY", raising=False)

    def write(limit: str, current: int, inactive_file: int = 0) -> None:
        (tmp_path / "memory.max").write_text(f"{limit}\n")
        (tmp_path / "memory.current").write_text(f"{current}\n")
        (tmp_path / "memory.stat").write_text(f"anon {current}\ninactive_file {inactive_file}\nactive_file 0\n")

    return write


def test_the_memory_a_build_may_take_is_the_containers_not_the_hosts(cgroup, monkeypatch):
    monkeypatch.delenv("FRANKENMERGE_MEMORY_BUDGET_GB", raising=False)
    cgroup("17179869184", current=6 * GIB, inactive_file=1 * GIB)  # a 16 GiB Space, 5 GiB in use
    assert container.memory_available() == min(psutil.virtual_memory().available, 11 * GIB)
    assert devices.default_budget("cpu") == min(psutil.virtual_memory().total, 16 * GIB) // 2


def test_no_limit_in_the_cgroup_leaves_the_machines_memory(cgroup):
    cgroup("max", current=GIB)
    assert container.memory_limit() is None
    assert container.memory_total() == psutil.virtual_memory().total


def test_a_cgroup_v1_limit_and_the_spaces_memory_variable_count_too(tmp_path, monkeypatch):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(8 * GIB))
    monkeypatch.setattr(container, "CGROUP_ROOT", tmp_path)
    monkeypatch.setenv("MEMORY", "16Gi")
    assert container.memory_limit() == 8 * GIB  # the smaller of the two
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert container.memory_limit() == 16 * GIB
    assert container.parse_quantity("15G") == 15 * 10**9 and container.parse_quantity("lots") is None


def test_a_build_larger_than_the_containers_free_memory_is_refused_before_anything_loads(cgroup, tiny_llama):
    cgroup(str(64 * 2**20), current=63 * 2**20)  # 1 MiB left in the container, whatever the host has
    plan = make_plan(passthrough((str(tiny_llama), 0, 6)), ANY_PATH)
    with pytest.raises(PlacementError, match="needs about"):
        devices.plan_placement(plan, "cpu")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache of the test's own, within a budget of about two tiny models."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv(disk.BUDGET_ENV, str(2.5 * 2**20 / GIB))
    models.public_info.cache_clear()
    return tmp_path / "hub-cache"


def used_an_hour_ago(cache, repo_id: str, minutes: int = 60) -> None:
    path = cache / f"models--{repo_id.replace('/', '--')}"
    then = time.time() - minutes * 60
    os.utime(path, (then, then))


def test_the_hub_cache_keeps_within_its_budget_evicting_the_least_recently_built(hub, hub_cache, tiny_llama):
    for name in ("a", "b", "c"):
        publish(hub, f"org/{name}", tiny_llama)
    download_weights(models.model_info("org/a"))
    download_weights(models.model_info("org/b"))
    used_an_hour_ago(hub_cache, "org/a", 90)
    used_an_hour_ago(hub_cache, "org/b", 60)
    download_weights(models.model_info("org/a"))  # built again: now the most recently used of the two
    used_an_hour_ago(hub_cache, "org/a", 30)
    download_weights(models.model_info("org/c"))
    kept = sorted(p.name for p in hub_cache.iterdir() if p.name.startswith("models--"))
    assert kept == ["models--org--a", "models--org--c"]


def test_a_model_larger_than_the_disk_budget_is_refused_before_any_weight_downloads(
    hub, hub_cache, tiny_llama, monkeypatch
):
    publish(hub, "org/big", tiny_llama)
    monkeypatch.setenv(disk.BUDGET_ENV, str(0.5 * 2**20 / GIB))
    info = models.model_info("org/big")
    served = sum(hub.weight_bytes_served.values())  # the header read (a tiny file's first 100 KB)
    with pytest.raises(UserError, match="more than this server keeps on disk"):
        download_weights(info)
    assert sum(hub.weight_bytes_served.values()) == served


def test_an_export_archive_is_served_from_gradios_cache_and_deleted_when_the_visitor_leaves(hub, tiny_llama):
    import app

    publish(hub, "org/exported", tiny_llama)
    request = SimpleNamespace(session_hash="archive-visitor")
    recipe = passthrough(("org/exported", 0, 3)).to_yaml()
    status, archive = app.export_merge(recipe, "bfloat16", "", False, "", None, request, lambda *a, **k: None)
    assert "Download it below" in status
    assert archive.startswith(str(get_upload_folder()))  # Gradio serves it where it is: no second copy
    with zipfile.ZipFile(archive) as z:
        assert "model.safetensors" in z.namelist()
    assert app.demo.delete_cache == (600, app.ARCHIVE_SECONDS)  # and sweeps it after an hour at most
    app.forget_archives(request)
    assert not os.path.exists(archive)
