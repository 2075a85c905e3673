"""Slim: a copy of a checkpoint without a redundant `lm_head.weight`.

With `tie_word_embeddings` the head is the embedding matrix, so a stored `lm_head.weight` that
equals `model.embed_tokens.weight` is dead weight that still inflates downloads and parameter
counts (mergekit has shipped merges like that). A stored head that differs is not redundant:
transformers 5 then loads it as a separate head whatever the config says, so dropping it would
change the model. The copy drops the redundant head, byte-copies every other tensor, rewrites
the shard index with the right total size and copies the small files, under a temporary sibling
name renamed last, like an export. A Hub model is downloaded only when its metadata makes the
head a candidate (the values are compared on disk).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from merger.architecture import EMBEDDINGS, HEAD
from merger.build.export import ByteCopier, atomic_folder, encode_header, reserve_space, write_all
from merger.sources.model_info import PICKLE_SUFFIXES, ModelInfo, Resolver
from merger.sources.safetensors_files import TensorMeta, read_header

INDEX = "model.safetensors.index.json"
# Weights in other formats would carry the same redundant head: they are not copied.
NOT_COPIED_SUFFIXES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class Redundancy:
    """What a checkpoint stores that its config makes redundant (nothing: `tensors` is empty)."""

    model: str
    tensors: tuple[str, ...]
    params: int
    bytes: int
    reason: str  # why these are redundant, or why nothing is

    @property
    def found(self) -> bool:
        return bool(self.tensors)


@dataclass(frozen=True)
class SlimResult:
    redundancy: Redundancy
    path: Path | None  # None: nothing was redundant, nothing written
    files: list[str]  # safetensors files in the copy
    bytes: int  # tensor bytes in the copy
    seconds: float


def find_redundant(info: ModelInfo) -> Redundancy:
    """The stored head is redundant when the config ties it to the embeddings and it holds the
    very same values. Reads both tensors, so `info` must have its weights on disk."""
    verdict = _metadata_verdict(info)
    if verdict is not None:
        return verdict
    head, embeddings = info.tensors[HEAD], info.tensors[EMBEDDINGS]
    if head.file is None or embeddings.file is None:
        raise ValueError(f"{info.ref}: weights are not on disk; call merger.sources.hub.download_weights first")
    if not _same_bytes(head, embeddings):
        return Redundancy(
            info.ref,
            (),
            0,
            0,
            f"its {HEAD} holds other values than {EMBEDDINGS}, so transformers loads it as a separate head "
            "whatever tie_word_embeddings says (removing it would change the model)",
        )
    return Redundancy(
        info.ref,
        (HEAD,),
        head.numel,
        head.nbytes,
        f"tie_word_embeddings is true and it is a byte-for-byte copy of {EMBEDDINGS}",
    )


def _metadata_verdict(info: ModelInfo) -> Redundancy | None:
    """Nothing-to-remove from metadata alone, or None when the head is a candidate."""
    head, embeddings = info.tensors.get(HEAD), info.tensors.get(EMBEDDINGS)
    why = None
    if info.config.get("tie_word_embeddings") is not True:
        why = "its config does not tie the head to the embeddings"
    elif head is None:
        why = f"it ties the head to the embeddings and stores no {HEAD}"
    elif embeddings is None or (head.shape, head.dtype) != (embeddings.shape, embeddings.dtype):
        why = f"its {HEAD} differs from {EMBEDDINGS} in shape or dtype, so transformers keeps it as a separate head"
    return None if why is None else Redundancy(info.ref, (), 0, 0, why)


def slim_model(ref: str, out_dir: Path, *, resolver: Resolver) -> SlimResult:
    """Write `ref` without its redundant tensors to `out_dir`; write nothing if none are."""
    start = time.perf_counter()
    info = resolver(ref)
    if _metadata_verdict(info) is None and info.local_dir is None:
        from merger.sources.hub import download_weights

        info = download_weights(info)
    redundancy = find_redundant(info)
    if not redundancy.found:
        return SlimResult(redundancy, None, [], 0, time.perf_counter() - start)
    assert info.local_dir is not None  # find_redundant read the head from disk
    out_dir = Path(out_dir)
    drop = set(redundancy.tensors)
    with atomic_folder(out_dir) as staging:
        kept: dict[str, TensorMeta] = {}
        files: list[str] = []
        with ByteCopier() as copier:
            for src in sorted(info.local_dir.glob("*.safetensors")):
                tensors, metadata = read_header(src)
                if drop.isdisjoint(tensors):
                    shutil.copyfile(src, staging / src.name)
                elif not set(tensors) <= drop:
                    _write_without(src, staging / src.name, tensors, metadata, drop, copier)
                else:
                    continue  # a shard that held only the head
                files.append(src.name)
                kept |= {n: m for n, m in tensors.items() if n not in drop}
        total = sum(_stored_bytes(m) for m in kept.values())
        index_path = info.local_dir / INDEX
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n not in drop}
            index.setdefault("metadata", {})["total_size"] = total
            if "total_parameters" in index["metadata"]:
                index["metadata"]["total_parameters"] = sum(m.numel for m in kept.values())
            (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for path in sorted(info.local_dir.iterdir()):
            if path.is_file() and path.name != INDEX and not path.name.endswith(NOT_COPIED_SUFFIXES):
                shutil.copyfile(path, staging / path.name)
    return SlimResult(redundancy, out_dir, files, total, time.perf_counter() - start)


def _write_without(
    src: Path,
    dst: Path,
    tensors: dict[str, TensorMeta],
    metadata: dict[str, str],
    drop: set[str],
    copier: ByteCopier,
) -> None:
    """A copy of one safetensors file minus `drop`, the other tensors in their stored order."""
    keep = sorted((n for n in tensors if n not in drop), key=lambda n: tensors[n].offsets)
    header: dict[str, dict] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in keep:
        size = _stored_bytes(tensors[name])
        header[name] = {
            "dtype": tensors[name].dtype,
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    with open(dst, "wb", buffering=0) as out:  # unbuffered: the copier writes at the fd's position
        head = encode_header(header)
        reserve_space(out.fileno(), len(head) + offset)
        write_all(out.fileno(), head)
        for name in keep:
            copier.copy(tensors[name].file, tensors[name].offsets, out.fileno())


def _stored_bytes(meta: TensorMeta) -> int:
    begin, end = meta.offsets  # from the header itself: also right for dtypes we have no size for
    return end - begin


def _same_bytes(a: TensorMeta, b: TensorMeta, chunk: int = 16 * 2**20) -> bool:
    """Whether two stored tensors of one dtype and shape hold the same bytes, read in chunks."""
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.offsets[0])
        fb.seek(b.offsets[0])
        left = _stored_bytes(a)
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True
