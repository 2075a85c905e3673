"""Plan -> a Hugging Face model folder, streamed tensor by tensor.

Shard headers are known from the plan before any weight is read, so each tensor's bytes go
straight from the parent's file to the output (same dtype) or through one conversion (other
dtype): memory stays about one tensor whatever the model's size. The folder is written under a
temporary sibling name and renamed last, so it appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merger.catalog import TOKENIZER_FILES
from merger.errors import UserError
from merger.params import count, human_params
from merger.plan import Plan, TensorSource
from merger.safetensors_files import DTYPE_SIZES, TORCH_NAMES

BytesProgress = Callable[[int, int], None]
COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ExportResult:
    path: Path
    shards: list[str]
    bytes: int
    seconds: float


def shard_layout(plan: Plan, shard_size: int) -> list[list[str]]:
    """Output tensor names grouped into shards of at most `shard_size` bytes (a tensor larger
    than that gets a shard of its own)."""
    per = DTYPE_SIZES[TORCH_NAMES[plan.dtype]]
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


def export_plan(
    plan: Plan, out_dir: Path, *, shard_size: int = 5 * 10**9, progress: BytesProgress | None = None
) -> ExportResult:
    from merger.hub import download_weights

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"'{out_dir}' already exists and is not empty; choose a new folder")
    start = time.perf_counter()
    models = {ref: download_weights(info) for ref, info in plan.models.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted export
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        layout = shard_layout(plan, shard_size)
        names = (
            ["model.safetensors"]
            if len(layout) == 1
            else [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
        )
        total = sum(src.meta.numel for src in plan.tensors.values()) * DTYPE_SIZES[TORCH_NAMES[plan.dtype]]
        written = 0
        for shard_name, tensor_names in zip(names, layout, strict=True):
            written = _write_shard(staging / shard_name, plan, models, tensor_names, written, total, progress)
        if len(layout) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t: s for s, group in zip(names, layout, strict=True) for t in group},
            }
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        write_metadata_files(plan, models, staging)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir, names, total, time.perf_counter() - start)


def _write_shard(
    path: Path,
    plan: Plan,
    models: dict,
    tensor_names: list[str],
    written: int,
    total: int,
    progress: BytesProgress | None,
) -> int:
    code = TORCH_NAMES[plan.dtype]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in tensor_names:
        meta = plan.tensors[name].meta
        nbytes = meta.numel * DTYPE_SIZES[code]
        header[name] = {"dtype": code, "shape": list(meta.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in tensor_names:
            src = plan.tensors[name]
            stored = models[src.model].tensors[src.name]
            if stored.dtype == code:
                _copy_range(stored.file, stored.offsets, out)
            else:
                out.write(_converted_bytes(stored.file, src, plan.dtype))
            written += stored.numel * DTYPE_SIZES[code]
            if progress:
                progress(written, total)
    return written


def _copy_range(file: str, offsets: tuple[int, int], out) -> None:
    begin, end = offsets
    with open(file, "rb") as f:
        f.seek(begin)
        remaining = end - begin
        while remaining:
            chunk = f.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{file} ended early")
            out.write(chunk)
            remaining -= len(chunk)


def _converted_bytes(file: str, src: TensorSource, dtype: str) -> bytes:
    import torch
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        tensor = f.get_tensor(src.name).to(getattr(torch, dtype)).contiguous()
    # a byte view of the tensor's storage: safetensors stores little-endian, as torch does here
    return tensor.view(torch.uint8).numpy().tobytes()


def write_metadata_files(plan: Plan, models: dict, out: Path) -> None:
    """config.json, generation config, tokenizer files, mergekit YAML and a model card."""
    (out / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    tok_dir = models[plan.tokenizer_model.ref].tokenizer_dir
    primary_dir = models[plan.primary.ref].tokenizer_dir
    for name in TOKENIZER_FILES:
        source_dir = primary_dir if name == "generation_config.json" else tok_dir
        if source_dir and (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    (out / "mergekit_config.yml").write_text(plan.recipe.to_yaml())
    (out / "README.md").write_text(model_card(plan))


def model_card(plan: Plan) -> str:
    counts = count(plan)
    bases = [ref for ref in plan.models if not ref.startswith("bundled:")]
    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- frankenmerge"]
    if bases:
        front += ["base_model:", *(f"- {ref.partition('@')[0]}" for ref in bases)]
    front.append("---")
    parents = "\n".join(
        f"- `{ref}`"
        + (f" (revision `{info.commit}`)" if info.commit else "")
        + (f", licence {info.license}" if info.license else "")
        for ref, info in plan.models.items()
    )
    return "\n".join(
        [
            *front,
            "",
            "# Frankenmerge",
            "",
            f"A passthrough layer merge: {counts.num_layers} layers, {counts.total_params:,} parameters "
            f"({human_params(counts.total_params)}), {plan.dtype}.",
            "",
            "## Parents",
            parents,
            "",
            "## Recipe (mergekit YAML)",
            "```yaml",
            plan.recipe.to_yaml().rstrip(),
            "```",
            "",
        ]
    )
