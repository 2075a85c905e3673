"""Recipe + parents' metadata -> Plan: the merged config and, for every output tensor, where it
comes from: one parent tensor (passed through) or a `Blend`: several blended, or one scaled by
passthrough's `scale` (method, resolved parameters, sources). Preview, assemble and export all
read the plan; none re-derives tensor names or parameters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merger.architecture import per_layer_settings, restate_layer_settings, text_model_config
from merger.errors import RecipeError
from merger.methods.specs import METHODS, PASSTHROUGH
from merger.plan.vocabulary import shipped_tokenizer
from merger.recipe import Recipe, Slice, passthrough
from merger.recipe.parameters import resolve_parameter
from merger.sources.lora import LoraDelta
from merger.sources.model_info import ModelInfo, Resolver
from merger.sources.safetensors_files import TensorMeta

# Config keys that describe the parent checkpoint rather than the merged model.
DROPPED_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version")


@dataclass(frozen=True)
class TensorSource:
    model: str  # model reference
    name: str  # tensor name inside that model
    meta: TensorMeta
    delta: LoraDelta | None = None  # the reference's LoRA adapter changes this tensor (merger.lora)


@dataclass(frozen=True)
class Blend:
    """One output tensor computed from parent tensors: several blended, or one scaled (method
    passthrough, its `scale` in per_source). Hashable: equal blends (a repeated blended slice) are
    computed and held once."""

    method: str
    sources: tuple[TensorSource, ...]  # in the recipe's source order (mergekit's input order)
    base_index: int | None  # which source is the base model (None: the method ignores it, or has none)
    shared: tuple[tuple[str, Any], ...]  # resolved parameters that apply to the whole tensor
    per_source: tuple[tuple[tuple[str, Any], ...], ...]  # resolved per-source parameters (none for the base)

    @property
    def meta(self) -> TensorMeta:
        return self.sources[0].meta


Origin = TensorSource | Blend


@dataclass
class Plan:
    recipe: Recipe
    models: dict[str, ModelInfo]
    config: dict[str, Any]
    tensors: dict[str, Origin]  # output name -> parent tensor or blend, in checkpoint order
    layer_sources: list[tuple[str, int]]  # (model, parent layer) per merged depth
    dtype: str  # output dtype: float32 | bfloat16 | float16
    tied: bool
    tokenizer_ref: str  # the model whose tokenizer the merge ships (merger.plan.vocabulary)

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    @property
    def blends(self) -> list[Blend]:
        """Distinct computed tensors (blended or scaled), in output order."""
        return list(dict.fromkeys(o for o in self.tensors.values() if isinstance(o, Blend)))

    @property
    def primary(self) -> ModelInfo:
        return self.models[self.recipe.primary_model]

    @property
    def tokenizer_model(self) -> ModelInfo:
        return self.models[self.tokenizer_ref]

    def seams(self) -> list[int]:
        """Merged depths whose layer did not follow the previous depth's layer in its parent."""
        return [d for d in seam_depths(self.layer_sources, self.recipe.primary_model) if d > 0]


# The seam rule, the one every stage reads (the plan, the lens, the page's stack widget): a depth's
# layer is at a seam unless it receives what it received in its own parent.
def expected_points(layer_sources: Sequence[tuple[str, int]], primary: str) -> list[tuple[str, int]]:
    """For every merged depth, the parent capture point that the previous depth's layer hands on
    in its own parent: (m', p+1) after layer p of m', and the primary's embeddings at depth 0."""
    return [(primary, 0)] + [(m, p + 1) for m, p in layer_sources[:-1]]


def seam_depths(layer_sources: Sequence[tuple[str, int]], primary: str) -> list[int]:
    """Depths whose layer does not receive what it received in its parent: the seams between
    slices and repeats (Plan.seams), and depth 0 when the stack does not start at the primary's
    first layer."""
    expected = expected_points(layer_sources, primary)
    return [d for d, source in enumerate(layer_sources) if source != expected[d]]


def make_plan(recipe: Recipe, resolver: Resolver) -> Plan:
    """The plan of `recipe`, its model references read by `resolver` (which carries the caller's
    policy for local folders: there is no default)."""
    models = {ref: resolver(ref) for ref in recipe.models}
    primary = models[recipe.primary_model]
    slices = recipe.as_slices({ref: info.num_layers for ref, info in models.items()})
    _check_stackable(slices, models, primary)
    layer_sources = [(s.source.model, layer) for s in slices for _ in range(s.repeat) for layer in s.source.layers]
    origins = _Origins(recipe, models)

    # As mergekit does: what comes before the layers (embeddings) from the first slice's
    # source(s), what comes after them (final norm, an untied head) from the last slice's, so each
    # end of the stack keeps the tensors it was trained with (blended at t=0 when that slice
    # blends). The config comes from `primary`.
    first, last = slices[0], slices[-1]
    tied, layout = primary.tied, primary.layout
    tensors: dict[str, Origin] = {}
    for name in models[first.source.model].non_layer_tensors():
        if not layout.after_layers(name):
            tensors[name] = origins.origin(first, [name] * len(first.sources), name, t=0.0)
    depth = 0
    for s in slices:
        for _ in range(s.repeat):
            for offset in range(s.span):
                t = offset / (s.span - 1) if s.span > 1 else 1.0  # mergekit's gradient position
                out = layout.layer_prefix(depth)
                for suffix in models[s.source.model].layer_tensors(s.source.start + offset):
                    inputs = [f"{layout.layer_prefix(src.start + offset)}{suffix}" for src in s.sources]
                    tensors[out + suffix] = origins.origin(s, inputs, out + suffix, t=t)
                depth += 1
    for name in models[last.source.model].non_layer_tensors():
        if layout.after_layers(name) and not (tied and name == layout.head):
            tensors[name] = origins.origin(last, [name] * len(last.sources), name, t=0.0)

    vocab_rows = [
        (src.model, src.meta.shape[0])
        for name in layout.vocabulary_tensors
        if name in tensors
        for src in (tensors[name].sources if isinstance(tensors[name], Blend) else (tensors[name],))
    ]
    dtype = recipe.dtype or primary.declared_dtype
    return Plan(
        recipe=recipe,
        models=models,
        config=merged_config(primary, models, layer_sources, dtype),
        tensors=tensors,
        layer_sources=layer_sources,
        dtype=dtype,
        tied=tied,
        tokenizer_ref=shipped_tokenizer(recipe, models, vocab_rows),
    )


def text_model_plan(plan: Plan) -> Plan:
    """The plan of the text model alone: for a multimodal checkpoint (merger.architecture.Layout), its
    text tower's tensors under a causal LM's names and its text config; the vision tower and
    projector left out. This is what is built to chat with, and the text-only export. A causal
    LM's plan is returned as it is."""
    layout = plan.primary.layout
    if layout.text_config is None:
        return plan
    tensors = {}
    for name, origin in plan.tensors.items():
        text_name = layout.text_name(name)
        if text_name is not None:
            tensors[text_name] = origin
    return dataclasses.replace(plan, tensors=tensors, config=text_model_config(plan.config))


class _Origins:
    """Turns one output tensor of a slice into its origin: the parent tensor of a one-source
    slice (unless passthrough's `scale` changes it), else a Blend with every parameter resolved
    for that tensor (source > slice > recipe)."""

    def __init__(self, recipe: Recipe, models: dict[str, ModelInfo]) -> None:
        self.recipe = recipe
        self.models = models
        self.spec = METHODS[recipe.merge_method]

    def origin(self, s: Slice, input_names: list[str], out_name: str, *, t: float) -> Origin:
        pairs = zip(s.sources, input_names, strict=True)
        sources = tuple(
            TensorSource(src.model, name, self._meta(src.model, name), self.models[src.model].delta_for(name))
            for src, name in pairs
        )
        if self.spec.name == PASSTHROUGH:
            return self._scaled(s, sources[0], t)
        if not s.blended:
            return sources[0]
        _check_same_shape(out_name, sources, self.models[s.source.model].layout.vocabulary_tensors)
        base = self.recipe.base_model if self.spec.uses_base else None
        base_index = next((i for i, src in enumerate(s.sources) if src.model == base), None)
        shared = {
            p.name: self._resolve(p, [s.parameters, self.recipe.parameters], out_name, t, None)
            for p in self.spec.params
            if p.scope == "shared"
        }
        per_source = []
        for i, (src, name) in enumerate(zip(s.sources, input_names, strict=True)):
            scopes = [src.parameters, s.parameters, self.recipe.parameters]
            per_source.append(
                {
                    p.name: self._resolve(p, scopes, name, t, src.model)
                    for p in self.spec.params
                    if p.scope == "input" or (p.scope == "non_base" and i != base_index)
                }
            )
        self._check_normalizable(shared, per_source, out_name, s)
        self._check_keep_probabilities(per_source, out_name, s)
        return Blend(
            method=self.spec.name,
            sources=sources,
            base_index=base_index,
            shared=tuple(shared.items()),
            per_source=tuple(tuple(p.items()) for p in per_source),
        )

    def _scaled(self, s: Slice, source: TensorSource, t: float) -> Origin:
        """The parent tensor, or (mergekit's passthrough) that tensor times the `scale` resolved
        for it; a scale of 1 changes no value, so the tensor stays shared."""
        (param,) = self.spec.params
        scopes = [s.source.parameters, s.parameters, self.recipe.parameters]
        scale = self._resolve(param, scopes, source.name, t, s.source.model)
        if scale is None or scale == 1.0:
            return source
        scaled = ((("scale", scale),),)
        return Blend(method=PASSTHROUGH, sources=(source,), base_index=None, shared=(), per_source=scaled)

    def _meta(self, model: str, name: str) -> TensorMeta:
        meta = self.models[model].tensors.get(name)
        if meta is None:
            raise RecipeError(f"{model} has no tensor {name}, so it cannot be blended with the other sources")
        return meta

    def _resolve(self, param: Any, scopes: list, tensor_name: str, t: float, model: str | None) -> Any:
        try:
            return resolve_parameter(param, scopes, tensor_name=tensor_name, t=t)
        except LookupError:
            whose = f" for {model}" if model else ""
            raise RecipeError(
                f"{self.spec.name} needs `{param.name}`{whose} ({tensor_name}); set it on the source, "
                "its slice or the recipe's `parameters:`"
            ) from None
        except ValueError as exc:
            raise RecipeError(
                f"{self.spec.name}'s `{param.name}` for {tensor_name}: {exc} (mergekit refuses it too); "
                "choose values whose steps over the slice's layers are whole"
            ) from None

    def _check_normalizable(self, shared: dict, per_source: list[dict], out_name: str, s: Slice) -> None:
        weights = [p["weight"] for p in per_source if "weight" in p]
        if shared.get("normalize") and weights and abs(sum(weights)) < 1e-8:
            names = ", ".join(src.model for src in s.sources)
            raise RecipeError(
                f"the weights of {names} sum to zero for {out_name}, and normalize divides by that sum; "
                "change a weight or set normalize: false"
            )

    def _check_keep_probabilities(self, per_source: list[dict], out_name: str, s: Slice) -> None:
        """DELLA keeps entries with probabilities from density - epsilon to density + epsilon, which
        must lie inside (0, 1) (mergekit fails mid-merge otherwise)."""
        for src, p in zip(s.sources, per_source, strict=True):
            if (
                "epsilon" in p
                and p["density"] < 1
                and not 0 < p["density"] - p["epsilon"] < p["density"] + p["epsilon"] < 1
            ):
                raise RecipeError(
                    f"{self.spec.name} keeps entries of {src.model}'s {out_name} with probabilities from density - "
                    f"epsilon to density + epsilon, here {p['density']:g} ± {p['epsilon']:g}, which must stay "
                    "inside (0, 1); lower epsilon or move density toward 0.5"
                )


def _check_same_shape(out_name: str, sources: tuple[TensorSource, ...], vocabulary: tuple[str, ...]) -> None:
    first = sources[0]
    for other in sources[1:]:
        if other.meta.shape == first.meta.shape:
            continue
        if out_name in vocabulary and other.meta.shape[1:] == first.meta.shape[1:]:
            raise RecipeError(
                f"cannot blend {out_name}: {first.model} has a vocabulary of {first.meta.shape[0]:,} tokens and "
                f"{other.model} of {other.meta.shape[0]:,}; blended models need one vocabulary. mergekit aligns "
                "vocabularies with `tokenizer_source`, which this app does not do yet: blend models that share "
                "a tokenizer, or keep the embeddings and head from one model (pass the first and last slices through)"
            )
        raise RecipeError(
            f"cannot blend {out_name}: {first.model}'s {first.name} has shape {list(first.meta.shape)} but "
            f"{other.model}'s {other.name} has {list(other.meta.shape)}"
        )


def _check_stackable(slices: tuple[Slice, ...], models: dict[str, ModelInfo], primary: ModelInfo) -> None:
    reference_layer = {n: m.shape for n, m in primary.layer_tensors(0).items()}
    for i, s in enumerate(slices, start=1):
        for source in s.sources:
            model = models[source.model]
            if source.end > model.num_layers:
                raise RecipeError(
                    f"slice {i}: layer range [{source.start}, {source.end}) is outside {model.ref}, "
                    f"which has {model.num_layers} layers (0 to {model.num_layers - 1})"
                )
            if model.architecture != primary.architecture:
                raise RecipeError(
                    f"slice {i}: cannot stack {model.ref} ({model.architecture}) on {primary.ref} "
                    f"({primary.architecture}); every slice must share one architecture"
                )
            if model.hidden_size != primary.hidden_size:
                raise RecipeError(
                    f"slice {i}: cannot stack {model.ref} (hidden size {model.hidden_size}) on {primary.ref} "
                    f"(hidden size {primary.hidden_size}); every slice must share one hidden size"
                )
            for layer in source.layers:
                shapes = {n: m.shape for n, m in model.layer_tensors(layer).items()}
                if shapes != reference_layer:
                    raise RecipeError(
                        f"slice {i}: layer {layer} of {model.ref} has different tensors from {primary.ref}'s "
                        f"layers ({_first_difference(shapes, reference_layer, model.layout.layer_prefix(layer))}; "
                        "another size of the same architecture?), so they cannot be stacked or blended"
                    )


def stacking_key(info: ModelInfo) -> str:
    """A short key that is equal for two models whose layers can be stacked and blended together:
    what `_check_stackable` compares (architecture, hidden size, a layer's tensors and shapes)."""
    layer = sorted((name, list(meta.shape)) for name, meta in info.layer_tensors(0).items())
    facts = json.dumps([info.architecture, info.hidden_size, layer], separators=(",", ":"))
    return hashlib.sha256(facts.encode()).hexdigest()[:16]


def _first_difference(shapes: dict[str, tuple], reference: dict[str, tuple], prefix: str) -> str:
    suffix = next(k for k in sorted(shapes.keys() | reference.keys()) if shapes.get(k) != reference.get(k))
    mine, theirs = shapes.get(suffix), reference.get(suffix)
    name = prefix + suffix
    if mine is None or theirs is None:
        return f"{name} is only in one of them"
    return f"{name} has shape {list(mine)} where theirs have {list(theirs)}"


def merged_config(
    primary: ModelInfo, models: dict[str, ModelInfo], layer_sources: list[tuple[str, int]], dtype: str
) -> dict[str, Any]:
    """The primary's config with the layer count set and every per-layer setting rebuilt in recipe
    order (Gemma 3's and Qwen's `layer_types`: a default pattern would give wrong RoPE and masks;
    merger.architecture says what each family states per layer)."""
    config = {k: v for k, v in primary.config.items() if k not in DROPPED_CONFIG_KEYS}
    layout = primary.layout
    text = dict(layout.text_settings(config))  # a multimodal model's text_config, else the config itself
    per_layer = {
        ref: per_layer_settings(models[ref].text_config, models[ref].num_layers)
        for ref in {ref for ref, _ in layer_sources}
    }
    for key in per_layer_settings(primary.text_config, primary.num_layers):
        for ref, theirs in per_layer.items():
            if key not in theirs:
                raise RecipeError(
                    f"{ref}'s config has no per-layer `{key}` list of its {models[ref].num_layers} layers, "
                    f"which {primary.ref}'s config has; they cannot be stacked"
                )
        text[key] = [per_layer[ref][key][layer] for ref, layer in layer_sources]
    text = restate_layer_settings(text)
    text["num_hidden_layers"] = len(layer_sources)
    if layout.text_config:
        config[layout.text_config] = text
    else:
        config = text
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return config


def as_it_is(model_ref: str, resolver: Resolver) -> Recipe:
    """The recipe of a model as it is: all its layers, in order."""
    return passthrough((model_ref, 0, resolver(model_ref).num_layers))


def in_dtype(plan: Plan, dtype: str) -> Plan:
    """`plan` with its recipe's dtype set to `dtype`, from the models it already read."""
    return make_plan(plan.recipe.model_copy(update={"dtype": dtype}), plan.models.__getitem__)


def build_dtype(plan: Plan, device: str) -> str:
    """bfloat16 on CUDA (half the memory, full speed); the recipe's dtype on the CPU."""
    return "bfloat16" if device == "cuda" and plan.recipe.dtype is None else plan.dtype
