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

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from merger.catalog import Resolver
from merger.errors import UserError
from merger.plan import Plan, make_plan
from merger.recipe import Recipe, Slice, Source, passthrough

Progress = Callable[[float, str], None]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CALIBRATION_TEXT = ASSETS / "calibration.txt"
HELDOUT_TEXT = ASSETS / "heldout.txt"
MAX_LENGTH = 256  # tokens per chunk: the models' attention is quadratic in it, the statistics are not
REDUCE_ROWS = 256  # tokens per float64 reduction step: bounds that temporary at points x 256 x hidden
DRIFT_TOKENS = 256  # calibration tokens each candidate's drift is measured on (benchmarks/seams.py)
MERGE = "(merge)"  # the assembled model's name beside its parents in a joint lens
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------------------------
# Tokens


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


# ---------------------------------------------------------------------------------------------
# Capture


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


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _lockstep(
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
                model.model(input_ids=ids.to(_device(model)), use_cache=False)  # no head: only the stream matters
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
    stats = PairStats([n + 1 for n in counts], device=_device(first))
    for points in _lockstep(models, chunks, batch_size=batch_size, progress=progress):
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


# ---------------------------------------------------------------------------------------------
# Seams


def expected_points(layer_sources: Sequence[tuple[str, int]], primary: str) -> list[tuple[str, int]]:
    """For every merged depth, the parent capture point that the previous depth's layer hands on
    in its own parent: (m', p+1) after layer p of m', and the primary's embeddings at depth 0."""
    return [(primary, 0)] + [(m, p + 1) for m, p in layer_sources[:-1]]


def predict_seams(layer_sources: Sequence[tuple[str, int]], lens: Lens | JointLens, primary: str) -> list[float]:
    """Predicted damage per merged depth from the parents' lens; exactly 0 where there is no seam."""
    return [
        0.0 if (m, a) == expected else lens.distance(expected[0], expected[1], m, a)
        for (m, a), expected in zip(layer_sources, expected_points(layer_sources, primary), strict=True)
    ]


def seam_depths(layer_sources: Sequence[tuple[str, int]], primary: str) -> list[int]:
    """Depths whose layer does not receive what it received in its parent: Plan.seams(), plus
    depth 0 when the stack does not start at the primary's first layer."""
    expected = expected_points(layer_sources, primary)
    return [d for d, source in enumerate(layer_sources) if source != expected[d]]


def token_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, H], [N, H] -> [N] float64: the angle between each token's two vectors over π, computed
    as 2·atan2(|u−v|, |u+v|) on unit vectors, which is exactly 0 for identical vectors (arccos of
    a rounded dot product is not)."""
    u, v = F.normalize(x.double(), dim=-1), F.normalize(y.double(), dim=-1)
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


@dataclass(frozen=True)
class SeamScores:
    """Seam damage at every depth of a merged stack (see the module's docstring)."""

    layer_sources: tuple[tuple[str, int], ...]
    seams: tuple[int, ...]  # depths whose layer does not follow its parent predecessor
    predicted: tuple[float, ...]  # per depth; 0 where there is no seam
    measured: tuple[float, ...]  # per depth, from the assembled merge; 0 along an unmodified prefix
    measured_output: float  # the stream leaving the merge versus leaving the primary parent
    lens: JointLens  # the parents and the merge (named MERGE) on the same tokens

    @property
    def predicted_total(self) -> float:
        return sum(self.predicted)

    @property
    def measured_at_seams(self) -> list[float]:
        return [self.measured[d] for d in self.seams]

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer_sources": [list(s) for s in self.layer_sources],
            "seams": list(self.seams),
            "predicted": list(self.predicted),
            "measured": list(self.measured),
            "measured_output": self.measured_output,
            "tokens": self.lens.tokens,
        }


def load_parents(plan: Plan, *, device: str, dtype: str) -> dict[str, torch.nn.Module]:
    """Each parent as it is (all its layers in order), built like the merge."""
    from merger.assemble import assemble

    known = plan.models.__getitem__  # the plan's models, already resolved under its caller's policy
    return {
        ref: assemble(make_plan(passthrough((ref, 0, info.num_layers)), known), device=device, dtype=dtype)
        for ref, info in plan.models.items()
        if any(m == ref for m, _ in plan.layer_sources) or ref == plan.recipe.primary_model
    }


def assemble_from(plan: Plan, parents: Mapping[str, torch.nn.Module], device: str) -> torch.nn.Module:
    """`plan`'s merge (no blends) from its parents' tensors in memory (each parent built as it is,
    all its layers in order, as load_parents builds them): no file read, its tensors theirs."""
    from merger.assemble import LoadedTensors, assemble_loaded, tensors_of

    tensors: dict[tuple[str, str, str], torch.Tensor] = {}
    for ref, parent in parents.items():
        own = make_plan(passthrough((ref, 0, len(decoder_layers(parent)))), plan.models.__getitem__)
        tensors.update(tensors_of(parent, own, device).by_source)
    dtype = next(iter(parents.values())).dtype
    return assemble_loaded(plan, LoadedTensors(tensors), device=device, dtype=dtype)


def score_seams(
    plan: Plan,
    chunks: TokenChunks,
    *,
    merged: torch.nn.Module | None = None,
    parents: Mapping[str, torch.nn.Module] | None = None,
    device: str | None = None,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> SeamScores:
    """Predicted and measured damage at every depth of `plan`'s merge, in one pass over `chunks`
    that runs the parents and the merge in lockstep. Models not given are assembled here (the
    merge from the parents' tensors in memory, unless it blends)."""
    from merger.assemble import assemble
    from merger.runtime import build_dtype

    if merged is None:
        device = device or "cpu"
        dtype = build_dtype(plan, device)
    else:  # parents are built like the merge given, or the comparison is not like for like
        first = next(merged.parameters())
        device, dtype = first.device.type, DTYPE_NAMES[first.dtype]
    parents = dict(parents) if parents is not None else load_parents(plan, device=device, dtype=dtype)
    if merged is None:
        merged = assemble(plan, device=device, dtype=dtype) if plan.blends else assemble_from(plan, parents, device)
    sources = plan.layer_sources
    primary = plan.recipe.primary_model
    models = {**parents, MERGE: merged}
    counts = tuple(len(decoder_layers(m)) for m in models.values())
    stats = PairStats([n + 1 for n in counts], device=_device(merged))
    measured = torch.zeros(len(sources) + 1, dtype=torch.float64, device=_device(merged))
    for points in _lockstep(models, chunks, batch_size=batch_size, progress=progress):
        stats.add([points[name] for name in models])
        here = points[MERGE]
        for d, (m, a) in enumerate(sources):
            measured[d] += token_angles(here[:, d], points[m][:, a]).sum()
        measured[-1] += token_angles(here[:, -1], points[primary][:, -1]).sum()
    angle, cos = stats.means()
    lens = JointLens(tuple(models), counts, angle, cos, stats.tokens, chunks.source)
    measured = measured.cpu() / max(stats.tokens, 1)
    return SeamScores(
        layer_sources=tuple(sources),
        seams=tuple(seam_depths(sources, primary)),
        predicted=tuple(predict_seams(sources, lens, primary)),
        measured=tuple(measured[:-1].tolist()),
        measured_output=float(measured[-1]),
        lens=lens,
    )


# ---------------------------------------------------------------------------------------------
# Perplexity, suggestions, recurrence


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, prefix_len: int) -> tuple[float, int]:
    """(summed loss, count) of predicting every text token that has a preceding token in its row:
    logits [B, T, V] and ids [B, T]; with a BOS prefix the first text token is predicted from it."""
    first = max(prefix_len, 1)  # position of the first predicted token
    if ids.shape[1] <= first:
        return 0.0, 0
    predicted = logits[:, first - 1 : -1].flatten(0, 1).float()  # [B*(T-first), V]
    return float(F.cross_entropy(predicted, ids[:, first:].flatten(), reduction="sum")), predicted.shape[0]


def perplexity(
    model: torch.nn.Module, chunks: TokenChunks, *, batch_size: int = 1, progress: Progress | None = None
) -> float:
    """exp(mean next-token loss) over every text token that has a preceding token in its chunk."""
    total, count = 0.0, 0
    n_batches = chunks.num_batches(batch_size)
    with torch.inference_mode():
        for done, ids in enumerate(chunks.batches(batch_size), start=1):
            if ids.shape[1] <= max(chunks.prefix_len, 1):
                continue
            ids = ids.to(_device(model))
            loss, n = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids, chunks.prefix_len)
            total, count = total + loss, count + n
            if progress:
                progress(done / n_batches, f"perplexity, batch {done}/{n_batches}")
    if count == 0:
        raise UserError(f"{chunks.source} is too short to measure perplexity")
    return math.exp(total / count)


def duplication_recipe(model: str, num_layers: int, start: int, end: int) -> Recipe:
    """Duplicating block [start, end): [0, end) + [start, L), the block running twice back to back."""
    return passthrough((model, 0, end), (model, start, num_layers))


def recurrence_recipe(model: str, num_layers: int, start: int, end: int, repeats: int) -> Recipe:
    """Block [start, end) run `repeats` times in a row: [0, end) + [start, end) x (repeats-1) + [end, L)."""
    slices = [Slice(source=Source(model=model, start=0, end=end))]
    if repeats > 1:
        slices.append(Slice(source=Source(model=model, start=start, end=end), repeat=repeats - 1))
    if end < num_layers:
        slices.append(Slice(source=Source(model=model, start=end, end=num_layers)))
    return Recipe(slices=tuple(slices))


@dataclass(frozen=True)
class Suggestion:
    """A block [start, end) to duplicate: its predicted damage, its measured output drift when
    ranked by drift, and, once confirmed, the merge's perplexity."""

    start: int
    end: int
    predicted: float
    perplexity: float | None = None
    drift: float | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        return f"[{self.start}, {self.end})"


def rank_duplications(lens: Lens, *, min_size: int = 2, max_size: int = 8) -> list[Suggestion]:
    """Every block of min_size..max_size layers, least predicted damage d(x_end, x_start) first."""
    L = lens.num_layers
    ranked = [
        Suggestion(start, start + size, float(lens.angular_distance[start + size, start]))
        for size in range(min_size, min(max_size, L) + 1)
        for start in range(0, L - size + 1)
    ]
    return sorted(ranked, key=lambda s: (s.predicted, s.start, s.end))


@dataclass(frozen=True)
class Drift:
    """How far a duplication's merge strays from its parent, measured on the same tokens."""

    seam: float  # the stream arriving at the seam vs what layer `start` received in the parent
    mean: float  # that distance averaged over every depth from the seam to the top of the stack
    output: float  # the stream leaving the merge vs leaving the parent, before the final norm


class Work:
    """Progress over a job counted in token-layers (one token through one decoder layer: every pass
    costs about its tokens times its layers), each message saying what is measured and the time
    left at the pace so far."""

    def __init__(self, total: float, report: Progress | None) -> None:
        self.total = max(total, 1.0)
        self.done = 0.0
        self.report = report
        self.start = time.monotonic()

    def add(self, units: float, message: str) -> None:
        """`units` more are done; `message` says what comes next."""
        self.done += units
        if self.report is None:
            return
        left = (time.monotonic() - self.start) * (self.total - self.done) / self.done if self.done else None
        eta = "" if left is None else f" · about {left:.0f} s left" if left >= 1 else " · under a second left"
        self.report(min(self.done / self.total, 1.0), message + eta)

    def part(self, units: float) -> Progress:
        """Progress for a step worth `units`, which reports fractions of itself."""
        base = self.done

        def report(fraction: float, message: str) -> None:
            self.add(base + fraction * units - self.done, message)

        return report


def tail_view(model: torch.nn.Module, start: int) -> torch.nn.Module:
    """`model` from decoder layer `start` on, its final norm and head included, made of its very
    modules (nothing built, no tensor copied; `model` itself unchanged) under the config of those
    layers alone (merger.plan.merged_config's per-layer lists: Gemma 3's layer types): run on the
    stream entering layer `start` (inputs_embeds), it is the top of any merge that ends with
    layers [start, L), as assembling that tail would make it."""
    from transformers import AutoConfig

    from merger.catalog import ModelInfo
    from merger.plan import merged_config

    layers = decoder_layers(model)
    whole = ModelInfo(ref="", config=model.config.to_dict(), tensors={})  # its layers' config facts only
    sources = [("", layer) for layer in range(start, len(layers))]
    config = AutoConfig.for_model(**merged_config(whole, {"": whole}, sources, DTYPE_NAMES[model.dtype]))
    config._attn_implementation = model.config._attn_implementation  # the masks the layers expect
    inner = copy.copy(model.model)  # shares every submodule and parameter
    inner._modules = {**inner._modules, "layers": torch.nn.ModuleList(list(layers)[start:])}
    inner.config = config
    outer = copy.copy(model)
    outer._modules = {**outer._modules, "model": inner}
    outer.config = config
    return outer


def duplication_drift(
    parent: torch.nn.Module,
    chunks: TokenChunks,
    blocks: Sequence[tuple[int, int]],
    *,
    batch_size: int = 2,
    work: Work | None = None,
) -> dict[tuple[int, int], Drift]:
    """Measured damage of duplicating each block [a, b) of `parent`.

    The merge [0, b) + [a, L) runs the parent's own first b layers, so its stream entering depth b
    is the parent's x_b bit for bit; only the tail [a, L) (`tail_view`: the parent's own layers) is
    run on the parent's x_b, without the head, for every b of one a in one batch. The parent's
    stream is kept for every token of `chunks` (tokens x (L+1) x hidden floats): pass a short
    text. `work` counts the token-layers run (drift_work's)."""
    first = next(parent.parameters())
    device, dtype, L = first.device, first.dtype, len(decoder_layers(parent))
    batches = list(chunks.batches(batch_size))
    tokens = sum(ids.numel() for ids in batches)
    with torch.inference_mode(), ResidualRecorder(parent) as rec:  # BOS rows kept: the tails start from them
        cached = []
        for ids in batches:
            parent.model(input_ids=ids.to(device), use_cache=False)
            cached.append(rec.take())  # [B*T, L+1, H]
    if work:
        work.add(tokens * L, "drift of each duplication")
    results: dict[tuple[int, int], Drift] = {}
    for a in sorted({a for a, _ in blocks}):
        ends = sorted({b for s, b in blocks if s == a})
        tail = tail_view(parent, a)
        dist = torch.zeros(len(ends), L - a + 1, dtype=torch.float64, device=device)  # tail point j vs parent a + j
        with torch.inference_mode(), ResidualRecorder(tail) as tail_rec:
            for ids, points in zip(batches, cached, strict=True):
                B, T = ids.shape
                # every end's stream in one batch; the recorder keeps float32: back to the model's dtype (exact)
                entering = points[:, ends].transpose(0, 1).reshape(len(ends) * B, T, -1).to(dtype)
                tail.model(inputs_embeds=entering, use_cache=False)
                here = tail_rec.take().unflatten(0, (len(ends), B * T))  # [ends, B*T, L-a+1, H]
                text = (torch.arange(T, device=device) >= chunks.prefix_len).repeat(B)  # [B*T]: not BOS
                parent_points = points[text, a:]  # [N, L-a+1, H]
                for k in range(len(ends)):
                    dist[k] += token_angles(here[k, text], parent_points).sum(0)
        dist = (dist / chunks.num_tokens).cpu()
        for k, b in enumerate(ends):
            results[(a, b)] = Drift(seam=float(dist[k, 0]), mean=float(dist[k, :-1].mean()), output=float(dist[k, -1]))
        del tail
        if work:
            work.add(len(ends) * tokens * (L - a), f"drift of duplicating blocks [{a}, {ends[0]})..[{a}, {ends[-1]})")
    return results


def drift_work(num_layers: int, tokens: int, blocks: Sequence[tuple[int, int]]) -> int:
    """Token-layers duplication_drift runs: the parent once, each block's tail [a, L)."""
    return tokens * (num_layers + sum(num_layers - a for a, _ in blocks))


def duplication_perplexities(
    parent: torch.nn.Module,
    chunks: TokenChunks,
    blocks: Sequence[tuple[int, int]],
    *,
    batch_size: int = 1,
    work: Work | None = None,
) -> tuple[float, dict[tuple[int, int], float]]:
    """The perplexity of `parent` on `chunks` and of each duplication
    [0, b) + [a, L) of `blocks`: the merge's first b layers are the parent's own, so its tail [a, L)
    (`tail_view`: the parent's own layers and head) runs on the parent's stream entering layer b,
    kept from the parent's pass (tokens x distinct b x hidden floats)."""
    first = next(parent.parameters())
    device, dtype, L = first.device, first.dtype, len(decoder_layers(parent))
    depths = sorted({b for _, b in blocks})
    batches = [ids.to(device) for ids in chunks.batches(batch_size) if ids.shape[1] > max(chunks.prefix_len, 1)]
    tokens = sum(ids.numel() for ids in batches)
    if not batches:
        raise UserError(f"{chunks.source} is too short to measure perplexity")

    def perplexity_of(logits: Callable[[int, torch.Tensor], torch.Tensor]) -> float:
        losses = [next_token_loss(logits(i, ids), ids, chunks.prefix_len) for i, ids in enumerate(batches)]
        return math.exp(sum(loss for loss, _ in losses) / sum(n for _, n in losses))

    entering: list[torch.Tensor] = []  # per batch, the parent's stream at each of `depths`: [B*T, depths, H]
    recorder = ResidualRecorder(parent, points=depths) if depths else None
    with torch.inference_mode(), recorder or contextlib.nullcontext():

        def parent_logits(i: int, ids: torch.Tensor) -> torch.Tensor:
            logits = parent(input_ids=ids, use_cache=False).logits
            if recorder is not None:
                entering.append(recorder.take())
            return logits

        parent_perplexity = perplexity_of(parent_logits)
    if work:
        work.add(tokens * L, "perplexity of each confirmed duplication")
    found = {}
    for a, b in blocks:
        tail = tail_view(parent, a)

        def tail_logits(i: int, ids: torch.Tensor, tail: torch.nn.Module = tail, b: int = b) -> torch.Tensor:
            stream = entering[i][:, depths.index(b)].unflatten(0, tuple(ids.shape)).to(dtype)  # float32 kept: exact
            return tail(inputs_embeds=stream, use_cache=False).logits

        with torch.inference_mode():
            found[(a, b)] = perplexity_of(tail_logits)
        if work:
            work.add(tokens * (L - a), f"perplexity of duplicating [{a}, {b})")
    return parent_perplexity, found


@dataclass(frozen=True)
class Suggestions:
    model: str
    num_layers: int
    ranked: tuple[Suggestion, ...]  # every candidate, best first by `rank_by`
    confirmed: tuple[Suggestion, ...]  # the first top_k of `ranked`, with the merge's perplexity
    parent_perplexity: float
    heldout_tokens: int
    lens: Lens
    rank_by: str = "drift"
    dtype: str = "float32"  # what every model ran in
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        """The CLI's JSON (`suggest`)."""

        def block(s: Suggestion) -> dict[str, Any]:
            return {"block": [s.start, s.end], "size": s.size, **asdict(s)}

        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "rank_by": self.rank_by,
            "dtype": self.dtype,
            "device": self.device,
            "calibration_tokens": self.lens.tokens,
            "heldout_tokens": self.heldout_tokens,
            "parent_perplexity": self.parent_perplexity,
            "confirmed": [block(s) for s in self.confirmed],
            "ranked": [block(s) for s in self.ranked],
        }


def load_model(ref: str, *, resolver: Resolver, device: str | None = None, dtype: str | None = None) -> Any:
    """A model as it is (merger.runtime.Built: model, tokenizer, device), in `dtype` (None: the
    build's default for the device)."""
    from merger.runtime import as_it_is, build

    recipe = as_it_is(ref, resolver).model_copy(update={"dtype": dtype})
    return build(make_plan(recipe, resolver), device=device)


def _dtype_of(model: torch.nn.Module) -> str:
    return DTYPE_NAMES[next(model.parameters()).dtype]


def chunks_for(
    tokenizer: Any, text: str | None, default: Path, *, max_tokens: int | None = None, max_length: int = MAX_LENGTH
) -> TokenChunks:
    """`text` tokenized, or the bundled file `default` when `text` is None (named as its source)."""
    source = str(default.relative_to(ASSETS.parent)) if text is None else "text"
    return tokenize(
        tokenizer,
        read_text(default) if text is None else text,
        max_length=max_length,
        max_tokens=max_tokens,
        source=source,
    )


def suggest_duplications(
    model_ref: str,
    *,
    resolver: Resolver,
    calibration: str | None = None,
    heldout: str | None = None,
    top_k: int = 5,
    min_size: int = 2,
    max_size: int = 8,
    rank_by: Literal["predicted", "drift"] = "drift",
    drift_tokens: int = DRIFT_TOKENS,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    lens: Lens | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> Suggestions:
    """Rank every block to duplicate, then measure the first `top_k` merges' perplexity on
    `heldout` beside the parent's. Texts default to assets/calibration.txt and assets/heldout.txt.
    The parent is read once: every candidate is assembled from its tensors in memory, and runs
    only the layers it does not share with the parent (duplication_drift, duplication_perplexities).

    rank_by="predicted": by predicted damage d(x_end, x_start) from the lens on `calibration`
    (no merge is run). rank_by="drift": by each merge's measured output drift on the first
    `drift_tokens` tokens of `calibration` (duplication_drift; it runs every candidate's tail,
    without the head), which tracked perplexity much more closely on Gemma 3 (benchmarks/seams.py).
    Every model runs in `dtype` (None: the build's default for the device). Progress says what is
    measured and the time left.
    """
    parent = load_model(model_ref, resolver=resolver, device=device, dtype=dtype)
    L = len(decoder_layers(parent.model))
    calib = (
        None
        if lens is not None
        else chunks_for(parent.tokenizer, calibration, CALIBRATION_TEXT, max_tokens=max_tokens, max_length=max_length)
    )
    held = chunks_for(parent.tokenizer, heldout, HELDOUT_TEXT, max_tokens=max_tokens, max_length=max_length)
    sample = chunks_for(parent.tokenizer, calibration, CALIBRATION_TEXT, max_tokens=drift_tokens, max_length=max_length)
    blocks = [(a, a + size) for size in range(min_size, min(max_size, L) + 1) for a in range(0, L - size + 1)]
    held_tokens = sum(ids.numel() for ids in held.batches(1))
    total = (  # the worst case of the confirmed blocks' tails: the first top_k starts
        held_tokens * (L + sum(L - a for a in range(min(top_k, L))))
        + (drift_work(L, sum(len(c) for c in sample.chunks), blocks) if rank_by == "drift" else 0)
        + (0 if calib is None else sum(len(c) for c in calib.chunks) * L)
    )
    work = Work(total, progress)
    if calib is not None:
        work.add(0, "lens: the residual stream of the calibration text")
        lens = capture(parent.model, calib, name=model_ref, progress=work.part(sum(len(c) for c in calib.chunks) * L))
    ranked = rank_duplications(lens, min_size=min_size, max_size=max_size)
    if rank_by == "drift":
        blocks = [(s.start, s.end) for s in ranked]
        drift = duplication_drift(parent.model, sample, blocks, work=work)
        ranked = sorted(
            (replace(s, drift=drift[(s.start, s.end)].output) for s in ranked),
            key=lambda s: (s.drift, s.predicted, s.start, s.end),
        )
    chosen = ranked[:top_k]
    blocks = [(s.start, s.end) for s in chosen]
    parent_ppl, found = duplication_perplexities(parent.model, held, blocks, work=work)
    confirmed = [replace(s, perplexity=found[(s.start, s.end)]) for s in chosen]
    if progress:
        progress(1.0, "done")
    return Suggestions(
        model_ref,
        L,
        tuple(ranked),
        tuple(confirmed),
        parent_ppl,
        held.num_tokens,
        lens,
        rank_by=rank_by,
        dtype=_dtype_of(parent.model),
        device=parent.device,
    )


@dataclass(frozen=True)
class RecurrencePoint:
    repeats: int  # times the block runs in a row
    num_layers: int
    predicted: float  # sum of predicted seam damage over the stack
    perplexity: float


def recurrence_sweep(
    model_ref: str,
    start: int,
    end: int,
    *,
    resolver: Resolver,
    max_repeats: int = 8,
    lens: Lens | None = None,
    calibration: str | None = None,
    heldout: str | None = None,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    device: str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> list[RecurrencePoint]:
    """Block [start, end) run k = 1..max_repeats times: the merge's perplexity on `heldout` and
    its predicted seam damage (from `lens`, or a lens on `calibration`) for every k, each merge
    assembled from the parent's tensors in memory, in `dtype` (None: the build's default for the
    device)."""
    parent = load_model(model_ref, resolver=resolver, device=device, dtype=dtype)
    if lens is None:
        lens = capture(
            parent.model,
            chunks_for(parent.tokenizer, calibration, CALIBRATION_TEXT, max_tokens=max_tokens, max_length=max_length),
        )
    held = chunks_for(parent.tokenizer, heldout, HELDOUT_TEXT, max_tokens=max_tokens, max_length=max_length)
    L = lens.num_layers
    if not 0 <= start < end <= L:
        raise UserError(f"block [{start}, {end}) is not inside {model_ref}'s {L} layers")
    depths = [L + (k - 1) * (end - start) for k in range(1, max_repeats + 1)]
    work = Work(held.num_tokens * sum(depths), progress)
    points = []
    for k, depth in enumerate(depths, start=1):
        work.add(0, f"perplexity of block {start}-{end} x{k}")
        plan = make_plan(recurrence_recipe(model_ref, L, start, end, k), parent.plan.models.__getitem__)
        predicted = sum(predict_seams(plan.layer_sources, lens, model_ref))
        model = assemble_from(plan, {model_ref: parent.model}, parent.device)
        points.append(RecurrencePoint(k, depth, predicted, perplexity(model, held)))
        work.add(held.num_tokens * depth, f"block {start}-{end} x{k} measured")
    return points


# ---------------------------------------------------------------------------------------------
# The CLI's `analyze`


def analyze(
    recipe: Recipe,
    *,
    resolver: Resolver,
    text: str,
    source: str,
    name: str | None = None,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The lens of a recipe's merge (or of a model, as the recipe [0, L)) as the CLI's JSON; for a
    recipe with seams, also its seam scores against its parents on the same text."""
    from merger.runtime import build

    plan = make_plan(recipe, resolver)
    built = build(plan, device=device)
    chunks = tokenize(built.tokenizer, text, max_length=max_length, max_tokens=max_tokens, source=source)
    label = name or recipe.primary_model
    result = capture(built.model, chunks, name=label, progress=progress).as_dict()
    result["max_length"] = max_length
    if seam_depths(plan.layer_sources, recipe.primary_model):
        scores = score_seams(plan, chunks, merged=built.model, device=built.device)
        result["seam_scores"] = scores.as_dict()
    return result
