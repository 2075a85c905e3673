"""What a model is, read from its metadata (config, tensor index, tokenizer files): `ModelInfo`,
and the checks that refuse what we would misbuild."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.architecture import HEAD, LAYER_RE, layer_tensor
from merger.errors import ModelRefError
from merger.limits import LAYERS
from merger.sources.safetensors_files import TensorMeta
from merger.sources.untrusted_json import json_object

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "generation_config.json",
)


@dataclass
class ModelInfo:
    ref: str
    config: dict[str, Any]
    tensors: dict[str, TensorMeta]
    local_dir: Path | None = None  # weights and tokenizer files on disk (None: Hub, not downloaded)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    license: str | None = None
    tokenizer_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def tied(self) -> bool:
        """Whether the head reuses the embeddings. A config without the flag is tied exactly
        when the checkpoint has no separate head."""
        flag = self.config.get("tie_word_embeddings")
        if flag is None:
            return HEAD not in self.tensors
        return bool(flag)

    @property
    def label(self) -> str:
        return self.ref.removeprefix("bundled:")

    def layer_tensors(self, layer: int) -> dict[str, TensorMeta]:
        """Tensors of one decoder layer, keyed by the name below `model.layers.N.`."""
        prefix = layer_tensor(layer, "")
        return {n[len(prefix) :]: m for n, m in self.tensors.items() if n.startswith(prefix)}

    def non_layer_tensors(self) -> dict[str, TensorMeta]:
        return {n: m for n, m in self.tensors.items() if not LAYER_RE.match(n)}


Resolver = Callable[[str], ModelInfo]  # a model reference -> its metadata, under one policy


def read_config(path: Path, ref: str) -> dict[str, Any]:
    """A model's config.json as a mapping; unreadable or malformed is a ModelRefError."""
    return json_object(lambda: path.read_bytes(), f"the config.json of '{ref}'", ModelRefError)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_supported(info: ModelInfo) -> None:
    """Refuse what we would misbuild: remote code, configs without layers (or with nonsense in
    them), unknown layer names."""
    config = info.config
    if config.get("auto_map"):
        raise ModelRefError(f"'{info.ref}' needs custom code (auto_map in its config); we never run remote code")
    if "num_hidden_layers" not in config or "hidden_size" not in config:
        nested = "text_config" in config
        why = " (a multimodal model: pick its text-only variant)" if nested else ""
        raise ModelRefError(f"'{info.ref}' has no num_hidden_layers/hidden_size in its config{why}")
    for key in ("num_hidden_layers", "hidden_size"):
        if not _whole(config[key]) or config[key] < 1:
            shown = str(config[key])[:40]
            raise ModelRefError(f"'{info.ref}' has {key} {shown!r} in its config, not a whole number of at least 1")
    LAYERS.check(config["num_hidden_layers"], f"'{info.ref}'")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise ModelRefError(f"'{info.ref}' has `architectures` in its config that is not a list of names")
    if not any(LAYER_RE.match(n) for n in info.tensors):
        raise ModelRefError(f"'{info.ref}' has no tensors named model.layers.N.*; its layout is not supported")
