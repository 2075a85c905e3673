"""Which block to duplicate: every candidate ranked by predicted damage or measured drift, the best
confirmed by perplexity on held-out text; and a block's recurrence (run k times in a row). Each
model comes from the caller's build function; candidates are assembled from the parent's tensors in
memory and run only the layers they do not share with it."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from merger.dtypes import name_of
from merger.errors import UserError
from merger.lens.capture import (
    ASSETS,
    CALIBRATION_TEXT,
    DRIFT_TOKENS,
    HELDOUT_TEXT,
    MAX_LENGTH,
    BuildFunction,
    Lens,
    Progress,
    ResidualRecorder,
    TokenChunks,
    capture,
    decoder_layers,
    model_device,
    read_text,
    tokenize,
)
from merger.lens.seams import assemble_from, predict_seams, token_angles
from merger.plan import as_it_is, make_plan, merged_config
from merger.recipe import Recipe, Slice, Source, passthrough
from merger.sources.model_info import Resolver


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
            ids = ids.to(model_device(model))
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


class TokenLayerWork:
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

    layers = decoder_layers(model)
    whole = SimpleNamespace(config=model.config.to_dict(), num_layers=len(layers))  # as a catalog ModelInfo
    sources = [("", layer) for layer in range(start, len(layers))]
    config = AutoConfig.for_model(**merged_config(whole, {"": whole}, sources, name_of(model.dtype)))
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
    work: TokenLayerWork | None = None,
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
    work: TokenLayerWork | None = None,
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


def load_model(
    ref: str, *, resolver: Resolver, build: BuildFunction, device: str | None = None, dtype: str | None = None
) -> Any:
    """A model as it is, built by `build` (model, tokenizer, device), in `dtype` (None: the build's
    default for the device)."""
    recipe = as_it_is(ref, resolver).model_copy(update={"dtype": dtype})
    return build(make_plan(recipe, resolver), device=device)


def _dtype_of(model: torch.nn.Module) -> str:
    return name_of(next(model.parameters()).dtype)


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
    build: BuildFunction,
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
    parent = load_model(model_ref, resolver=resolver, build=build, device=device, dtype=dtype)
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
    work = TokenLayerWork(total, progress)
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
    build: BuildFunction,
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
    parent = load_model(model_ref, resolver=resolver, build=build, device=device, dtype=dtype)
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
    work = TokenLayerWork(held.num_tokens * sum(depths), progress)
    points = []
    for k, depth in enumerate(depths, start=1):
        work.add(0, f"perplexity of block {start}-{end} x{k}")
        plan = make_plan(recurrence_recipe(model_ref, L, start, end, k), parent.plan.models.__getitem__)
        predicted = sum(predict_seams(plan.layer_sources, lens, model_ref))
        model = assemble_from(plan, {model_ref: parent.model}, parent.device)
        points.append(RecurrencePoint(k, depth, predicted, perplexity(model, held)))
        work.add(held.num_tokens * depth, f"block {start}-{end} x{k} measured")
    return points
