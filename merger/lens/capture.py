"""Residual-stream lens: how the stream changes from layer to layer, and how much a seam will hurt.

Capture points, TransformerLens names, for a model of L decoder layers (index in brackets):
    blocks.{i}.hook_resid_pre     [i]  the residual stream entering decoder layer i, i = 0..L-1
    blocks.{L-1}.hook_resid_post  [L]  the stream leaving the last layer, before the final norm
Point i is read by a forward pre-hook on `model.model.layers[i]` and point L by a forward hook on
the last layer. Each depth is its own module, while a duplicated layer's submodules (mlp, ...) may
be shared objects between depths, so submodules are never hooked (DESIGN.md, "Hooks on shared parts").

Statistics are running sums over tokens: memory grows with (points)² and the hidden size, never
with the length of the text. The tokenizer's own prefix (a BOS) is left out of every statistic.

    angular_distance[i, j]  mean over tokens of arccos(cos(x_i, x_j)) / π, in [0, 1]
    block_influence[i]      1 − mean over tokens of cos(x_i, x_{i+1})   (ShortGPT)

A seam at merged depth d, whose layer is parent layer a of model m, placed after layer p of m':
    predicted damage  d(x_{p+1} of m', x_a of m): what layer a expects versus what its predecessor
                      hands on in its own parent, read from the parents' matrix (for a duplicated
                      block [a, b) of one model: d(x_b, x_a))
    measured damage   on the assembled merge, the distance between the stream arriving at depth d
                      and the one layer a received in its parent, token by token on the same text
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from merger.errors import UserError

Progress = Callable[[float, str], None]
# (plan, *, device) -> a build of it with `model`, `tokenizer`, `device` and `plan`
# (merger.runtime.builds.build): the lens runs models its caller builds, and never places them itself
BuildFunction = Callable[..., Any]
ASSETS = Path(__file__).resolve().parents[2] / "assets"
CALIBRATION_TEXT = ASSETS / "calibration.txt"
HELDOUT_TEXT = ASSETS / "heldout.txt"
MAX_LENGTH = 256  # tokens per chunk: the models' attention is quadratic in it, the statistics are not
REDUCE_ROWS = 256  # tokens per float64 reduction step: bounds that temporary at points x 256 x hidden
DRIFT_TOKENS = 256  # calibration tokens each candidate's drift is measured on (benchmarks/seams.py)
MERGE = "(merge)"  # the assembled model's name beside its parents in a joint lens


@dataclass(frozen=True)
class TokenChunks:
    """A text cut into model-sized chunks. Each chunk is the tokenizer's prefix (its BOS, where it
    adds one) followed by up to `max_length - prefix_len` text tokens, in order."""

    chunks: tuple[torch.Tensor, ...]  # 1-D int64 each
    prefix_len: int
    source: str

    @property
    def num_tokens(self) -> int:
        """Text tokens: what every lens statistic averages over."""
        return sum(len(c) - self.prefix_len for c in self.chunks)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """[B, T] id tensors of consecutive equal-length chunks, at most `batch_size` of them (no padding)."""
        group: list[torch.Tensor] = []
        for chunk in self.chunks:
            if group and (len(group) == batch_size or len(chunk) != len(group[0])):
                yield torch.stack(group)
                group = []
            group.append(chunk)
        if group:
            yield torch.stack(group)

    def num_batches(self, batch_size: int) -> int:
        return sum(1 for _ in self.batches(batch_size))


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before any text: a BOS for Gemma and Llama 3, nothing for SmolLM2."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def tokenize(
    tokenizer: Any, text: str, *, max_length: int = MAX_LENGTH, max_tokens: int | None = None, source: str = "text"
) -> TokenChunks:
    """Cut `text` into chunks of at most `max_length` tokens, each starting with the tokenizer's prefix."""
    prefix = special_prefix(tokenizer)
    body = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        body = body[:max_tokens]
    if not body:
        raise UserError(f"{source} has no text to measure")
    step = max_length - len(prefix)
    if step < 1:
        raise ValueError(f"max_length {max_length} leaves no room after the tokenizer's {len(prefix)} prefix tokens")
    chunks = tuple(torch.tensor(prefix + body[i : i + step], dtype=torch.long) for i in range(0, len(body), step))
    return TokenChunks(chunks=chunks, prefix_len=len(prefix), source=source)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise UserError(f"cannot read text file '{path}': {why}") from None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers, one module per depth (`model.model.layers`)."""
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError(f"{type(model).__name__} has no model.layers: not a decoder-only causal LM") from None


def point_labels(num_layers: int) -> tuple[str, ...]:
    """Names of the L+1 capture points, in index order."""
    pre = tuple(f"blocks.{i}.hook_resid_pre" for i in range(num_layers))
    return (*pre, f"blocks.{num_layers - 1}.hook_resid_post")


class ResidualRecorder:
    """Hooks at decoder-layer boundaries writing the current batch's residual stream into one buffer.

    After a forward pass, `take()` returns that buffer, [tokens, L+1, hidden] float32: the batch's
    rows flattened, the first `skip` positions of every row left out, `[:, i]` the stream at point i.
    With `points`, only those (in that order): `[:, k]` is point points[k]. Each batch gets a fresh
    buffer, so a caller may keep the ones it takes. Use as a context manager: the hooks exist only
    inside the `with`.
    """

    def __init__(self, model: torch.nn.Module, *, skip: int = 0, points: Sequence[int] | None = None) -> None:
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)
        self.skip = skip
        self.points = tuple(range(self.num_layers + 1)) if points is None else tuple(points)
        self._column = {point: k for k, point in enumerate(self.points)}
        self._buffer: torch.Tensor | None = None
        self._written: set[int] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> ResidualRecorder:
        for i, layer in enumerate(self.layers):
            if i in self._column:
                self._handles.append(layer.register_forward_pre_hook(partial(self._entering, i), with_kwargs=True))
        if self.num_layers in self._column:
            self._handles.append(self.layers[-1].register_forward_hook(self._leaving))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._buffer, self._written = None, set()

    def _entering(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._write(index, args[0] if args else kwargs["hidden_states"])

    def _leaving(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._write(self.num_layers, output[0] if isinstance(output, tuple) else output)

    def _write(self, index: int, hidden: torch.Tensor) -> None:
        batch, length, width = hidden.shape
        rows = batch * (length - self.skip)
        if self._buffer is None:
            self._buffer = torch.empty(rows, len(self.points), width, dtype=torch.float32, device=hidden.device)
        # a copy (never a reference), so no later in-place op can change what we read;
        # [B*(T-skip), H] column of the buffer seen as [B, T-skip, H]
        column = self._buffer[:, self._column[index]]
        column.unflatten(0, (batch, length - self.skip)).copy_(hidden[:, self.skip :])
        self._written.add(index)

    def take(self) -> torch.Tensor:
        if self._buffer is None or len(self._written) != len(self.points):
            raise RuntimeError("the forward pass did not run every decoder layer")
        buffer, self._buffer, self._written = self._buffer, None, set()
        return buffer


class PairStats:
    """Running sums over tokens of cos and arccos(cos)/π for every pair of capture points, the
    points coming in groups (one per model) of shape [N, P_g, H] that hold the same N tokens."""

    def __init__(self, group_sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.group_sizes = tuple(group_sizes)
        total = sum(self.group_sizes)
        self.cos = torch.zeros(total, total, dtype=torch.float64, device=device)
        self.angle = torch.zeros(total, total, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, groups: Sequence[torch.Tensor]) -> None:
        rows = groups[0].shape[0]
        starts = [sum(self.group_sizes[:g]) for g in range(len(groups))]
        for r0 in range(0, rows, REDUCE_ROWS):
            xs = [g[r0 : r0 + REDUCE_ROWS].to(self.cos.device, torch.float64) for g in groups]  # [n, P_g, H]
            # cos from the Gram matrix over the norms on its diagonal: no pass to normalize [n, P, H]
            grams = {(i, j): torch.bmm(xs[i], xs[j].transpose(1, 2)) for i in range(len(xs)) for j in range(i, len(xs))}
            norms = [grams[i, i].diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-30) for i in range(len(xs))]  # [n, P_g]
            for (i, j), gram in grams.items():
                cos = (gram / (norms[i][:, :, None] * norms[j][:, None, :])).clamp_(-1.0, 1.0)  # [n, P_i, P_j]
                block = (slice(starts[i], starts[i] + xs[i].shape[1]), slice(starts[j], starts[j] + xs[j].shape[1]))
                cos_sum, angle_sum = cos.sum(0), torch.arccos(cos).sum(0)
                self.cos[block] += cos_sum
                self.angle[block] += angle_sum
                if i != j:
                    self.cos[block[::-1]] += cos_sum.T
                    self.angle[block[::-1]] += angle_sum.T
        self.tokens += rows

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(angular distance, mean cos), each [P, P] on the CPU; the diagonal exactly 0 and 1."""
        n = max(self.tokens, 1)
        angle = (self.angle / (n * math.pi)).cpu().fill_diagonal_(0.0)
        cos = (self.cos / n).cpu().fill_diagonal_(1.0)
        return angle, cos


@dataclass(frozen=True)
class Lens:
    """One model's residual stream compared between every pair of its L+1 capture points."""

    model: str
    labels: tuple[str, ...]  # point_labels(L)
    angular_distance: torch.Tensor  # [L+1, L+1] float64, symmetric, zero diagonal
    mean_cos: torch.Tensor  # [L+1, L+1] float64
    tokens: int
    source: str

    @property
    def num_layers(self) -> int:
        return len(self.labels) - 1

    @property
    def block_influence(self) -> torch.Tensor:
        """[L]: 1 − mean cos between the stream entering and leaving each layer."""
        return 1.0 - torch.diagonal(self.mean_cos, offset=1)

    def distance(self, model_a: str, point_a: int, model_b: str, point_b: int) -> float:
        if model_a != self.model or model_b != self.model:
            raise KeyError(f"this lens covers {self.model} only")
        return float(self.angular_distance[point_a, point_b])

    def as_dict(self) -> dict[str, Any]:
        """The CLI's JSON (DESIGN.md, `analyze`)."""
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "labels": list(self.labels),
            "angular_distance": self.angular_distance.tolist(),
            "block_influence": self.block_influence.tolist(),
            "mean_cos": self.mean_cos.tolist(),
            "tokens": self.tokens,
            "text": self.source,
        }


@dataclass(frozen=True)
class JointLens:
    """Several models run on the same tokens, all their capture points in one matrix: the diagonal
    blocks are each model's own lens, the others compare one model's stream with another's."""

    models: tuple[str, ...]
    num_layers: tuple[int, ...]
    angular_distance: torch.Tensor  # [P, P], P = sum of (L_m + 1), models in order
    mean_cos: torch.Tensor  # [P, P]
    tokens: int
    source: str

    def offset(self, model: str) -> int:
        i = self.models.index(model)
        return sum(n + 1 for n in self.num_layers[:i])

    def distance(self, model_a: str, point_a: int, model_b: str, point_b: int) -> float:
        return float(self.angular_distance[self.offset(model_a) + point_a, self.offset(model_b) + point_b])

    def lens(self, model: str) -> Lens:
        start, n = self.offset(model), self.num_layers[self.models.index(model)]
        block = slice(start, start + n + 1)
        return Lens(
            model=model,
            labels=point_labels(n),
            angular_distance=self.angular_distance[block, block].clone(),
            mean_cos=self.mean_cos[block, block].clone(),
            tokens=self.tokens,
            source=self.source,
        )


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def lockstep(
    models: Mapping[str, torch.nn.Module], chunks: TokenChunks, *, batch_size: int, progress: Progress | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Every batch through every model in turn; yields each model's [tokens, L+1, H] points."""
    total = chunks.num_batches(batch_size)
    with torch.inference_mode(), ExitStack() as stack:
        recorders = {
            name: stack.enter_context(ResidualRecorder(model, skip=chunks.prefix_len)) for name, model in models.items()
        }
        for done, ids in enumerate(chunks.batches(batch_size), start=1):
            points = {}
            for name, model in models.items():
                model.model(input_ids=ids.to(model_device(model)), use_cache=False)  # no head: only the stream matters
                points[name] = recorders[name].take()
            yield points
            if progress:
                progress(done / total, f"residual stream, batch {done}/{total}")


def capture_joint(
    models: Mapping[str, torch.nn.Module],
    chunks: TokenChunks,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> JointLens:
    """Run `chunks` through each model (same hidden size) and compare every pair of capture points."""
    first = next(iter(models.values()))
    counts = tuple(len(decoder_layers(m)) for m in models.values())
    stats = PairStats([n + 1 for n in counts], device=model_device(first))
    for points in lockstep(models, chunks, batch_size=batch_size, progress=progress):
        stats.add([points[name] for name in models])
    angle, cos = stats.means()
    return JointLens(tuple(models), counts, angle, cos, stats.tokens, chunks.source)


def capture(
    model: torch.nn.Module,
    chunks: TokenChunks,
    *,
    name: str = "model",
    batch_size: int = 4,
    progress: Progress | None = None,
) -> Lens:
    """One model's lens over `chunks`."""
    return capture_joint({name: model}, chunks, batch_size=batch_size, progress=progress).lens(name)
