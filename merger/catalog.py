"""Model reference -> ModelInfo: config, tensor index and tokenizer files, never weights.

References (DESIGN.md): `bundled:NAME`; a local folder when the reference starts with `/`, `./`,
`../` or `~` or names an existing folder; otherwise a Hub id `owner/name[@revision]`.
Which local folders a reference may name is a `LocalPolicy` that every caller chooses, with no
default: the CLI's admits any path, the web app's only folders under operator-set roots.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger import bundled, families, lora
from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.limits import LAYERS
from merger.safetensors_files import TORCH_NAMES, CheckpointError, TensorMeta, read_header
from merger.untrusted_json import json_object

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
ST_TO_DTYPE = {code: name for name, code in TORCH_NAMES.items()}
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
    adapter: lora.Adapter | None = None  # a `model+lora` reference's adapter, merged in when tensors are read
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> families.Layout:
        """Where the checkpoint keeps its text decoder (a multimodal model's text tower included)."""
        return families.layout_of(self.config)

    @property
    def text_config(self) -> dict[str, Any]:
        """The text decoder's config: a multimodal model's `text_config`, else the config."""
        return self.layout.text_settings(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def tied(self) -> bool:
        """Whether the head reuses the embeddings. A config without the flag is tied exactly
        when the checkpoint has no separate head."""
        flag = self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings"))
        if flag is None:
            return self.layout.head not in self.tensors
        return bool(flag)

    @property
    def declared_dtype(self) -> str:
        """The dtype the model is loaded in by default: its config's, else its first stored float type."""
        declared = self.config.get("dtype") or self.config.get("torch_dtype")
        if declared in TORCH_NAMES:
            return declared
        codes = {m.dtype for m in self.tensors.values()}
        return next((ST_TO_DTYPE[code] for code in ("BF16", "F16", "F32") if code in codes), "float32")

    @property
    def weights_ref(self) -> str:
        """The reference whose stored tensors these are: a `model+lora` reference's model."""
        return lora.split_ref(self.ref)[0] if self.adapter else self.ref

    def delta_for(self, name: str) -> lora.LoraDelta | None:
        """What the reference's adapter adds to tensor `name` (None: the tensor as stored)."""
        return self.adapter.deltas.get(name) if self.adapter else None

    @property
    def label(self) -> str:
        return self.ref.removeprefix("bundled:")

    def layer_tensors(self, layer: int) -> dict[str, TensorMeta]:
        """Tensors of one decoder layer, keyed by the name below `model.layers.N.` (or the text
        tower's `language_model.model.layers.N.`)."""
        prefix = self.layout.layer_prefix(layer)
        return {n[len(prefix) :]: m for n, m in self.tensors.items() if n.startswith(prefix)}

    def non_layer_tensors(self) -> dict[str, TensorMeta]:
        return {n: m for n, m in self.tensors.items() if self.layout.layer_of(n) is None}


def is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or _is_dir(Path(ref), ref)


def _is_dir(path: Path, ref: str) -> bool:
    """`path.is_dir()`, with a name no file system takes (a part over 255 bytes, a NUL) said."""
    try:
        return path.is_dir()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not a valid file name"
        raise ModelRefError(f"'{ref}' cannot name a folder: {why}") from None


Resolver = Callable[[str], ModelInfo]  # a model reference -> its metadata, under one policy


def resolver_for(policy: LocalPolicy) -> Resolver:
    """`resolve` under `policy`: what the plan and the lens take to read model references."""
    return functools.partial(resolve, policy=policy)


def resolve(ref: str, policy: LocalPolicy) -> ModelInfo:
    """Metadata for one model reference (`model+lora` included: both halves under `policy`);
    raises ModelRefError in the user's words."""
    ref = ref.strip()
    model_ref, adapter_ref = lora.split_ref(ref)
    if adapter_ref is None:
        return _resolve_model(ref, policy)
    base = _resolve_model(model_ref, policy)
    adapter = _resolve_adapter(adapter_ref, policy)
    lora.check_fits(adapter, model_ref, base.tensors, tied=base.tied)
    return dataclasses.replace(base, ref=ref, adapter=adapter)


def _resolve_model(ref: str, policy: LocalPolicy) -> ModelInfo:
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        if name not in bundled.MODELS:
            known = ", ".join(f"bundled:{n}" for n in bundled.MODELS)
            raise ModelRefError(f"unknown model '{ref}': the bundled models are {known}")
        return read_local(bundled.ensure(name), ref=ref)
    found = local_folder(ref, policy)
    if found is not None:
        folder, root = found
        return read_local(folder, ref=ref, root=root)
    _check_hub_id(ref)
    from merger import hub  # imported lazily: only Hub references need huggingface_hub

    return hub.read_hub(ref)


def _resolve_adapter(ref: str, policy: LocalPolicy) -> lora.Adapter:
    if ref.startswith("bundled:"):
        raise ModelRefError(f"'{ref}' is a model, not a LoRA adapter; write MODEL+LORA")
    found = local_folder(ref, policy)
    if found is not None:
        folder, root = found
        return read_local_adapter(folder, ref=ref, root=root)
    _check_hub_id(ref)
    from merger import hub

    return hub.read_hub_adapter(ref)


def _check_hub_id(ref: str) -> None:
    if not HUB_ID_RE.match(ref):
        raise ModelRefError(
            f"unknown model '{ref}': expected bundled:NAME, a local folder, or a Hub id like owner/name"
        )


def local_folder(ref: str, policy: LocalPolicy) -> tuple[Path, Path | None] | None:
    """The local folder `ref` names under `policy` and the allowed root it lies in (None: any path
    allowed), or None when it names no local folder (then it is a Hub id)."""
    if policy.allow_any_path:
        if not is_local_ref(ref):
            return None
        path = Path(ref).expanduser()
        if not _is_dir(path, ref):
            raise ModelRefError(f"unknown model '{ref}': no such folder")
        return path, None
    found = allowed_folder(ref, policy)
    return None if found is None else (found[1], found[0])


def allowed_folder(ref: str, policy: LocalPolicy) -> tuple[Path, Path] | None:
    """The allowed root and the folder under it that a web visitor's reference names, or None if
    it names none there. Absolute paths, `..` and symlinks leading out of a root are refused."""
    if ref.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", ref):
        raise ModelRefError(f"'{ref}': absolute paths are not allowed here; name a folder under the allowed roots")
    parts = Path(ref).parts
    if ".." in parts:
        raise ModelRefError(f"'{ref}': '..' is not allowed in a folder name")
    for root in policy.roots:
        candidate = root / ref
        if not _is_dir(candidate, ref) and not candidate.is_symlink():
            continue
        real = candidate.resolve()
        if not _inside(real, root):
            raise ModelRefError(f"'{ref}' leads outside the allowed folders (through a symbolic link)")
        if real.is_dir():
            return root, real
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


MAX_FOLDER_ENTRIES = 10_000  # a model folder holds tens of files; walking a huge tree is not a lookup


def check_files_inside(folder: Path, root: Path, ref: str) -> None:
    """Every file and folder under `folder` (what we and transformers read: config, shards,
    tokenizer, templates) must resolve inside `root`: a symlink out of an allowed folder is refused
    like a folder outside it."""
    seen = 0
    for parent, dirs, files in os.walk(folder):  # does not descend into symlinked folders
        for name in [*dirs, *files]:
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                raise ModelRefError(f"'{ref}' holds more than {MAX_FOLDER_ENTRIES:,} files; it is not a model folder")
            entry = Path(parent) / name
            if not _inside(entry.resolve(), root):
                inner = entry.relative_to(folder)
                raise ModelRefError(f"'{ref}/{inner}' leads outside the allowed folders (through a symbolic link)")


def list_allowed_folders(policy: LocalPolicy) -> list[str]:
    """Model folders (those with a config.json) directly under the allowed roots."""
    found = []
    for root in policy.roots:
        if root.is_dir():
            found += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    return found


def read_local(path: Path, *, ref: str, root: Path | None = None) -> ModelInfo:
    """A local model folder's metadata; with `root` (the web policy's), every file in it must
    resolve inside that root."""
    if root is not None:
        check_files_inside(path, root, ref)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelRefError(f"'{ref}' has no config.json, so it is not a Hugging Face model folder")
    config = read_config(config_path, ref)
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
        try:
            tensors.update(read_header(st)[0])
        except CheckpointError as exc:
            raise CheckpointError(f"'{ref}': {exc}") from None
    info = ModelInfo(ref=ref, config=config, tensors=tensors, local_dir=path, tokenizer_dir=path)
    check_supported(info)
    return info


def read_local_adapter(path: Path, *, ref: str, root: Path | None = None) -> lora.Adapter:
    """A local LoRA adapter folder's metadata (adapter_config.json, adapter_model.safetensors);
    with `root`, every file in it must resolve inside that root."""
    if root is not None:
        check_files_inside(path, root, ref)
    weights = path / lora.WEIGHTS_FILE
    if not weights.is_file():
        refuse_missing_adapter_weights(ref, [p.name for p in path.iterdir()])
    config = read_adapter_config(path / lora.CONFIG_FILE, ref)
    try:
        tensors = read_header(weights)[0]
    except CheckpointError as exc:
        raise CheckpointError(f"'{ref}': {exc}") from None
    return lora.parse_adapter(ref, config, tensors, local_dir=path)


def refuse_missing_adapter_weights(ref: str, files: list[str]) -> None:
    """An adapter without adapter_model.safetensors: pickled weights are never opened."""
    pickled = sorted(name for name in files if name in lora.PICKLED_WEIGHTS)
    if pickled:
        raise UnsafeCheckpointError(
            f"adapter '{ref}' only has pickled weights ({', '.join(pickled)}); they can run code when loaded, "
            "so we never open them. Save the adapter as safetensors first"
        )
    raise ModelRefError(f"'{ref}' has no {lora.WEIGHTS_FILE}, so it is not a PEFT LoRA adapter")


def read_adapter_config(path: Path, ref: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelRefError(f"'{ref}' has no {lora.CONFIG_FILE}, so it is not a PEFT LoRA adapter")
    return json_object(lambda: path.read_bytes(), f"the {lora.CONFIG_FILE} of '{ref}'", ModelRefError)


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
    text = info.text_config
    if "num_hidden_layers" not in text or "hidden_size" not in text:
        nested = "text_config" in config
        why = " (a multimodal model of a family whose text tower this app does not know)" if nested else ""
        raise ModelRefError(f"'{info.ref}' has no num_hidden_layers/hidden_size in its config{why}")
    for key in ("num_hidden_layers", "hidden_size"):
        if not _whole(text[key]) or text[key] < 1:
            shown = str(text[key])[:40]
            raise ModelRefError(f"'{info.ref}' has {key} {shown!r} in its config, not a whole number of at least 1")
    LAYERS.check(text["num_hidden_layers"], f"'{info.ref}'")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise ModelRefError(f"'{info.ref}' has `architectures` in its config that is not a list of names")
    if not any(info.layout.layer_of(n) for n in info.tensors):
        where = f"{info.layout.text}layers.N.*"
        raise ModelRefError(f"'{info.ref}' has no tensors named {where}; its layout is not supported")
