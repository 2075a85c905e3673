"""Plan -> a Hugging Face model folder, streamed tensor by tensor.

Shard headers are known from the plan before any weight is read, so each tensor's bytes go
straight from the parent's file to the output (same dtype) or through one conversion (other
dtype); a blended tensor is computed from its inputs (merger.build.parent_reader) and written: memory
stays about one tensor and its inputs whatever the model's size. Same-dtype bytes move with
`os.copy_file_range` (the kernel copies, no user-space buffer: about twice a read/write loop's
speed here), each parent file opened once. The folder is written under a temporary sibling name
and renamed last, so it appears complete or not at all.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merger.dtypes import BY_CODE, bytes_per_value, code_of
from merger.errors import UserError
from merger.methods.specs import PASSTHROUGH
from merger.plan import Blend, Plan, TensorSource
from merger.plan.counts import count
from merger.recipe import Recipe
from merger.sizes import human_params
from merger.sources import bundled
from merger.sources.model_info import TOKENIZER_FILES, ModelInfo

if TYPE_CHECKING:  # torch is imported only when a tensor is converted or blended
    import torch

BytesProgress = Callable[[int, int], None]
COPY_CHUNK = 64 * 1024 * 1024  # for the read/write fallback
# copy_file_range refusals that mean "not between these files", not a failed copy
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
FALLOC_FL_KEEP_SIZE = 1


@dataclass(frozen=True)
class ExportResult:
    path: Path
    shards: list[str]
    bytes: int
    seconds: float


def shard_layout(plan: Plan, shard_size: int) -> list[list[str]]:
    """Output tensor names grouped into shards of at most `shard_size` bytes (a tensor larger
    than that gets a shard of its own)."""
    per = bytes_per_value(plan.dtype)
    shards: list[list[str]] = [[]]
    size = 0
    for name, src in plan.tensors.items():
        nbytes = src.meta.numel * per
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A staging folder that becomes `out_dir` only when the block completes: an interrupted
    write leaves at most a `.NAME.partial-*` sibling, which the next attempt removes."""
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"'{out_dir}' is a file, not a folder; choose a new folder to write into")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise UserError(f"'{out_dir}' already exists and is not empty; choose a new folder")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as exc:  # a name part over 255 bytes, a file where a folder should be, no permission
        raise UserError(f"cannot write '{out_dir}': {exc.strerror or exc}") from None
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_plan(
    plan: Plan,
    out_dir: Path,
    *,
    shard_size: int = 5 * 10**9,
    progress: BytesProgress | None = None,
    device: str = "cpu",
) -> ExportResult:
    """Write the plan's model folder; `device` is where blended tensors are computed."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    with atomic_folder(out_dir) as staging:  # refuses a non-empty folder before any download
        models = {ref: _on_disk(info) for ref, info in plan.models.items()}
        layout = shard_layout(plan, shard_size)
        names = (
            ["model.safetensors"]
            if len(layout) == 1
            else [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
        )
        total = sum(src.meta.numel for src in plan.tensors.values()) * bytes_per_value(plan.dtype)
        written = 0
        with ByteCopier() as copier, _Blender(plan, models, device) as blender:
            for shard_name, tensor_names in zip(names, layout, strict=True):
                written = _write_shard(
                    staging / shard_name, plan, models, tensor_names, written, total, progress, copier, blender
                )
        if len(layout) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t: s for s, group in zip(names, layout, strict=True) for t in group},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        write_metadata_files(plan, models, staging)
    return ExportResult(out_dir, names, total, time.perf_counter() - start)


def _on_disk(info: ModelInfo) -> ModelInfo:
    if info.local_dir is not None:
        return info  # local parents skip importing the Hub client (a fifth of a small build's time)
    from merger.sources.hub import download_weights

    return download_weights(info)


def _write_shard(
    path: Path,
    plan: Plan,
    models: dict,
    tensor_names: list[str],
    written: int,
    total: int,
    progress: BytesProgress | None,
    copier: ByteCopier,
    blender: _Blender,
) -> int:
    code = code_of(plan.dtype)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in tensor_names:
        meta = plan.tensors[name].meta
        nbytes = meta.numel * BY_CODE[code].bytes
        header[name] = {"dtype": code, "shape": list(meta.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # unbuffered: copy_file_range writes at the descriptor's position, which a buffer would skew
    with open(path, "wb", buffering=0) as out:
        fd = out.fileno()
        head = encode_header(header)
        reserve_space(fd, len(head) + offset)
        write_all(fd, head)
        for name in tensor_names:
            src = plan.tensors[name]
            if isinstance(src, Blend):
                write_all(fd, blender.bytes_of(src))
            else:
                stored = models[src.model].tensors[src.name]
                if stored.dtype == code:
                    copier.copy(stored.file, stored.offsets, fd)
                else:
                    write_all(fd, _converted_bytes(stored.file, src, plan.dtype))
            written += src.meta.numel * BY_CODE[code].bytes
            if progress:
                progress(written, total)
    return written


def encode_header(header: dict) -> bytes:
    """A safetensors header: 8-byte little-endian length, then the JSON, space-padded so the
    data section starts 8-byte aligned (as safetensors itself writes it)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):  # not Linux/glibc
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_FALLOCATE = _libc_fallocate()


def reserve_space(fd: int, nbytes: int) -> None:
    """Reserve a file's blocks before copying into it: on ext4 this skips delayed allocation and
    copies run about 30% faster. Best effort and size-neutral (KEEP_SIZE); where the filesystem
    cannot, nothing happens (posix_fallocate would instead write zeros over the whole file)."""
    if _FALLOCATE is not None and nbytes > 0:
        _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, 0, nbytes)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ByteCopier:
    """Copies byte ranges of source files to the current position of an output descriptor,
    keeping each source open once. Uses the kernel's copy_file_range where the platform and the
    two filesystems allow it, else (for the rest of its life) a pread/write loop."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._kernel_copy = hasattr(os, "copy_file_range")

    def __enter__(self) -> ByteCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def copy(self, file: str, offsets: tuple[int, int], out_fd: int) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        pos, end = offsets
        while pos < end:
            if self._kernel_copy:
                try:
                    n = os.copy_file_range(fd, out_fd, end - pos, pos)
                except OSError as exc:
                    if exc.errno not in NO_KERNEL_COPY:
                        raise
                    self._kernel_copy = False
                    continue
            else:
                chunk = os.pread(fd, min(COPY_CHUNK, end - pos), pos)
                write_all(out_fd, chunk)
                n = len(chunk)
            if n == 0:
                raise OSError(f"{file} ended early")
            pos += n


def _converted_bytes(file: str, src: TensorSource, dtype: str) -> bytes:
    import torch
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return tensor_bytes(f.get_tensor(src.name).to(getattr(torch, dtype)))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    # a byte view of the tensor's storage: safetensors stores little-endian, as torch does here
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


class _Blender:
    """Computes a plan's blended tensors for the writer; opens parent files (and imports torch)
    only when the plan has blends, so a passthrough export stays a byte copy."""

    def __init__(self, plan: Plan, models: dict, device: str) -> None:
        self._plan, self._models, self._device = plan, models, device
        self._reader = None

    def __enter__(self) -> _Blender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.__exit__(*exc)

    def bytes_of(self, item: Blend) -> bytes:
        import torch

        from merger.build.parent_reader import ParentReader, compute_blend

        if self._reader is None:
            self._reader = ParentReader(self._models)
        dtype = getattr(torch, self._plan.dtype)
        return tensor_bytes(compute_blend(item, self._reader, device=self._device, dtype=dtype))


def write_metadata_files(plan: Plan, models: dict, out: Path) -> None:
    """config.json, generation config, tokenizer files, mergekit YAML and a model card."""
    (out / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    tok_dir = models[plan.tokenizer_model.ref].tokenizer_dir
    primary_dir = models[plan.primary.ref].tokenizer_dir
    for name in TOKENIZER_FILES:
        source_dir = primary_dir if name == "generation_config.json" else tok_dir
        if source_dir and (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    (out / "mergekit_config.yml").write_text(public_recipe(plan).to_yaml())
    (out / "README.md").write_text(model_card(plan))


def public_recipe(plan: Plan) -> Recipe:
    """The recipe as mergekit and the Hub can resolve it elsewhere: bundled models by their Hub ids."""
    return plan.recipe.with_models(bundled.public_ref)


def _parent_line(ref: str, info: ModelInfo) -> str:
    model = bundled.model_of(ref)
    line = f"- `{bundled.public_ref(ref)}`"
    if model:
        line += f" (built here from its bundled {model.gguf}, dequantized; mergekit reads the original weights)"
    if info.commit:
        line += f" (revision `{info.commit}`)"
    return line + (f", licence {info.license}" if info.license else "")


def _kind_of_merge(plan: Plan) -> str:
    if plan.recipe.merge_method == PASSTHROUGH and plan.blends:
        return "passthrough layer merge with scaled tensors"
    if not plan.blends:
        return "passthrough layer merge"
    if plan.recipe.is_whole_model_blend:
        return f"whole-model {plan.recipe.merge_method} blend"
    return f"layer merge with {plan.recipe.merge_method}-blended slices"


def model_card(plan: Plan) -> str:
    counts = count(plan)
    # the Hub's base_model names Hub repos: bundled models by their Hub ids, local folders not at all
    bases = [m.hub_id if (m := bundled.model_of(ref)) else info.repo_id for ref, info in plan.models.items()]
    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- frankenmerge"]
    if any(bases):
        front += ["base_model:", *(f"- {repo}" for repo in dict.fromkeys(bases) if repo)]
    front.append("---")
    parents = "\n".join(_parent_line(ref, info) for ref, info in plan.models.items())
    return "\n".join(
        [
            *front,
            "",
            "# Frankenmerge",
            "",
            f"A {_kind_of_merge(plan)}: {counts.num_layers} layers, {counts.total_params:,} parameters "
            f"({human_params(counts.total_params)}), {plan.dtype}.",
            "",
            "## Parents",
            parents,
            "",
            "## Recipe (mergekit YAML)",
            "```yaml",
            public_recipe(plan).to_yaml().rstrip(),
            "```",
            "",
        ]
    )
