"""How much a merge's seams hurt: the damage predicted from the parents' lens, and measured on the
assembled merge beside its parents on the same tokens (the formulas are in merger.lens.capture's
docstring); `analyze` is the CLI's lens of a recipe."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from merger.build.assemble import LoadedTensors, assemble, assemble_loaded, tensors_of
from merger.dtypes import name_of
from merger.lens.capture import (
    MAX_LENGTH,
    MERGE,
    BuildFunction,
    JointLens,
    Lens,
    PairStats,
    Progress,
    TokenChunks,
    capture,
    decoder_layers,
    lockstep,
    model_device,
    tokenize,
)
from merger.plan import Plan, build_dtype, expected_points, make_plan, seam_depths
from merger.recipe import Recipe, passthrough
from merger.sources.model_info import Resolver


def predict_seams(layer_sources: Sequence[tuple[str, int]], lens: Lens | JointLens, primary: str) -> list[float]:
    """Predicted damage per merged depth from the parents' lens; exactly 0 where there is no seam."""
    return [
        0.0 if (m, a) == expected else lens.distance(expected[0], expected[1], m, a)
        for (m, a), expected in zip(layer_sources, expected_points(layer_sources, primary), strict=True)
    ]


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
    known = plan.models.__getitem__  # the plan's models, already resolved under its caller's policy
    return {
        ref: assemble(make_plan(passthrough((ref, 0, info.num_layers)), known), device=device, dtype=dtype)
        for ref, info in plan.models.items()
        if any(m == ref for m, _ in plan.layer_sources) or ref == plan.recipe.primary_model
    }


def assemble_from(plan: Plan, parents: Mapping[str, torch.nn.Module], device: str) -> torch.nn.Module:
    """`plan`'s merge (no blends) from its parents' tensors in memory (each parent built as it is,
    all its layers in order, as load_parents builds them): no file read, its tensors theirs."""
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
    dtype: str | None = None,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> SeamScores:
    """Predicted and measured damage at every depth of `plan`'s merge, in one pass over `chunks`
    that runs the parents and the merge in lockstep. Models not given are assembled here (the
    merge from the parents' tensors in memory, unless it blends), in `dtype` (None: `build_dtype`'s)."""
    if merged is None:
        device = device or "cpu"
        dtype = dtype or build_dtype(plan, device)
    else:  # parents are built like the merge given, or the comparison is not like for like
        first = next(merged.parameters())
        device, dtype = first.device.type, name_of(first.dtype)
    parents = dict(parents) if parents is not None else load_parents(plan, device=device, dtype=dtype)
    if merged is None:
        merged = assemble(plan, device=device, dtype=dtype) if plan.blends else assemble_from(plan, parents, device)
    sources = plan.layer_sources
    primary = plan.recipe.primary_model
    models = {**parents, MERGE: merged}
    counts = tuple(len(decoder_layers(m)) for m in models.values())
    stats = PairStats([n + 1 for n in counts], device=model_device(merged))
    measured = torch.zeros(len(sources) + 1, dtype=torch.float64, device=model_device(merged))
    for points in lockstep(models, chunks, batch_size=batch_size, progress=progress):
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


def analyze(
    recipe: Recipe,
    *,
    resolver: Resolver,
    build: BuildFunction,
    text: str,
    source: str,
    name: str | None = None,
    max_tokens: int | None = None,
    max_length: int = MAX_LENGTH,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The lens of a recipe's merge (or of a model, as the recipe [0, L)), built by `build`, as the
    CLI's JSON; for a recipe with seams, also its seam scores against its parents on the same text."""
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
