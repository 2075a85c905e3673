"""Model reference -> ModelInfo: config, tensor index and tokenizer files, never weights.

References (DESIGN.md): `bundled:NAME`; a local folder when the reference starts with `/`, `./`,
`../` or `~` or names an existing folder; otherwise a Hub id `owner/name[@revision]`.
Which local folders a reference may name is a `LocalPolicy` that every caller chooses, with no
default: the CLI's admits any path, the web app's only folders under operator-set roots.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger import bundled
from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.safetensors_files import TensorMeta, read_header

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
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
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
LOCAL_ROOTS_ENV = "FRANKENMERGE_LOCAL_DIRS"


@dataclass(frozen=True)
class LocalPolicy:
    """Which local folders a reference may name. The CLI allows any; the web app only `roots`."""

    allow_any_path: bool
    roots: tuple[Path, ...] = ()

    @classmethod
    def any_path(cls) -> LocalPolicy:
        """The CLI's: the user's own machine, any folder."""
        return cls(allow_any_path=True)

    @classmethod
    def for_web(cls) -> LocalPolicy:
        raw = os.environ.get(LOCAL_ROOTS_ENV, "")
        roots = tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())
        return cls(allow_any_path=False, roots=roots)


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
            return "lm_head.weight" not in self.tensors
        return bool(flag)

    @property
    def label(self) -> str:
        return self.ref.removeprefix("bundled:")

    def layer_tensors(self, layer: int) -> dict[str, TensorMeta]:
        """Tensors of one decoder layer, keyed by the name below `model.layers.N.`."""
        prefix = f"model.layers.{layer}."
        return {n[len(prefix) :]: m for n, m in self.tensors.items() if n.startswith(prefix)}

    def non_layer_tensors(self) -> dict[str, TensorMeta]:
        return {n: m for n, m in self.tensors.items() if not LAYER_RE.match(n)}


def is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).is_dir()


Resolver = Callable[[str], ModelInfo]  # a model reference -> its metadata, under one policy


def resolver_for(policy: LocalPolicy) -> Resolver:
    """`resolve` under `policy`: what the plan and the lens take to read model references."""
    return functools.partial(resolve, policy=policy)


def resolve(ref: str, policy: LocalPolicy) -> ModelInfo:
    """Metadata for one model reference; raises ModelRefError in the user's words."""
    ref = ref.strip()
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        if name not in bundled.MODELS:
            known = ", ".join(f"bundled:{n}" for n in bundled.MODELS)
            raise ModelRefError(f"unknown model '{ref}': the bundled models are {known}")
        return read_local(bundled.ensure(name), ref=ref)
    if policy.allow_any_path:
        if is_local_ref(ref):
            path = Path(ref).expanduser()
            if not path.is_dir():
                raise ModelRefError(f"unknown model '{ref}': no such folder")
            return read_local(path, ref=ref)
    else:
        local = allowed_folder(ref, policy)
        if local is not None:
            return read_local(local, ref=ref)
    if not HUB_ID_RE.match(ref):
        raise ModelRefError(
            f"unknown model '{ref}': expected bundled:NAME, a local folder, or a Hub id like owner/name"
        )
    from merger import hub  # imported lazily: only Hub references need huggingface_hub

    return hub.read_hub(ref)


def allowed_folder(ref: str, policy: LocalPolicy) -> Path | None:
    """The folder a web visitor's reference names under an allowed root, or None if it names
    none there. Absolute paths, `..` and symlinks leading out of a root are refused."""
    if ref.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", ref):
        raise ModelRefError(f"'{ref}': absolute paths are not allowed here; name a folder under the allowed roots")
    parts = Path(ref).parts
    if ".." in parts:
        raise ModelRefError(f"'{ref}': '..' is not allowed in a folder name")
    for root in policy.roots:
        candidate = root / ref
        if not candidate.exists():
            continue
        real = candidate.resolve()
        if real != root and root not in real.parents:
            raise ModelRefError(f"'{ref}' leads outside the allowed folders (through a symbolic link)")
        if real.is_dir():
            return real
    return None


def list_allowed_folders(policy: LocalPolicy) -> list[str]:
    """Model folders (those with a config.json) directly under the allowed roots."""
    found = []
    for root in policy.roots:
        if root.is_dir():
            found += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    return found


def read_local(path: Path, *, ref: str) -> ModelInfo:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelRefError(f"'{ref}' has no config.json, so it is not a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    st_files = sorted(path.glob("*.safetensors"))
    if not st_files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise UnsafeCheckpointError(
                f"'{ref}' only has pickled weights ({', '.join(pickled)}); they can run code when "
                "loaded, so we never open them. Convert the model to safetensors first"
            )
        raise ModelRefError(f"'{ref}' has no .safetensors weights")
    tensors: dict[str, TensorMeta] = {}
    for st in st_files:
        tensors.update(read_header(st)[0])
    info = ModelInfo(ref=ref, config=config, tensors=tensors, local_dir=path, tokenizer_dir=path)
    check_supported(info)
    return info


def check_supported(info: ModelInfo) -> None:
    """Refuse what we would misbuild: remote code, configs without layers, unknown layer names."""
    if info.config.get("auto_map"):
        raise ModelRefError(f"'{info.ref}' needs custom code (auto_map in its config); we never run remote code")
    if "num_hidden_layers" not in info.config or "hidden_size" not in info.config:
        nested = "text_config" in info.config
        why = " (a multimodal model: pick its text-only variant)" if nested else ""
        raise ModelRefError(f"'{info.ref}' has no num_hidden_layers/hidden_size in its config{why}")
    if not any(LAYER_RE.match(n) for n in info.tensors):
        raise ModelRefError(f"'{info.ref}' has no tensors named model.layers.N.*; its layout is not supported")
