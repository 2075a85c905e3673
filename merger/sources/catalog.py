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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError, ModelRefError, UnsafeCheckpointError
from merger.sources import bundled, lora
from merger.sources.model_info import PICKLE_SUFFIXES, ModelInfo, Resolver, check_supported, read_config
from merger.sources.safetensors_files import TensorMeta, read_header

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


def is_local_ref(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or _is_dir(Path(ref), ref)


def _is_dir(path: Path, ref: str) -> bool:
    """`path.is_dir()`, with a name no file system takes (a part over 255 bytes, a NUL) said."""
    try:
        return path.is_dir()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not a valid file name"
        raise ModelRefError(f"'{ref}' cannot name a folder: {why}") from None


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
    return _folder_or_hub(ref, policy, read_local, "read_hub")


def _resolve_adapter(ref: str, policy: LocalPolicy) -> lora.Adapter:
    if ref.startswith("bundled:"):
        raise ModelRefError(f"'{ref}' is a model, not a LoRA adapter; write MODEL+LORA")
    return _folder_or_hub(ref, policy, read_local_adapter, "read_hub_adapter")


def _folder_or_hub(ref: str, policy: LocalPolicy, read_folder: Callable[..., Any], hub_reader: str) -> Any:
    """What `ref` names: a local folder under `policy` (read by `read_folder`), else a Hub repo
    (read by merger.sources.hub's `hub_reader`)."""
    found = local_folder(ref, policy)
    if found is not None:
        folder, root = found
        return read_folder(folder, ref=ref, root=root)
    _check_hub_id(ref)
    from merger.sources import hub  # imported lazily: only Hub references need huggingface_hub

    return getattr(hub, hub_reader)(ref)


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
        lora.refuse_missing_weights(ref, [p.name for p in path.iterdir()])
    config = lora.read_config(path / lora.CONFIG_FILE, ref)
    try:
        tensors = read_header(weights)[0]
    except CheckpointError as exc:
        raise CheckpointError(f"'{ref}': {exc}") from None
    return lora.parse_adapter(ref, config, tensors, local_dir=path)
