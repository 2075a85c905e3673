"""Recipe + parents' metadata -> Plan: the merged config and, for every output tensor, where it
comes from. Preview, assemble and export all read the plan; none re-derives tensor names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from merger.catalog import ModelInfo, resolve
from merger.errors import RecipeError
from merger.recipe import DTYPES, Recipe
from merger.safetensors_files import TORCH_NAMES, TensorMeta

# Config keys that describe the parent checkpoint rather than the merged model.
DROPPED_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version")
ST_TO_DTYPE = {code: name for name, code in TORCH_NAMES.items()}
PRE_LAYER_PREFIXES = ("model.embed_tokens.",)


@dataclass(frozen=True)
class TensorSource:
    model: str  # model reference
    name: str  # tensor name inside that model
    meta: TensorMeta


@dataclass
class Plan:
    recipe: Recipe
    models: dict[str, ModelInfo]
    config: dict[str, Any]
    tensors: dict[str, TensorSource]  # output name -> source, in checkpoint order
    layer_sources: list[tuple[str, int]]  # (model, parent layer) per merged depth
    dtype: str  # output dtype: float32 | bfloat16 | float16
    tied: bool

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    @property
    def primary(self) -> ModelInfo:
        return self.models[self.recipe.primary_model]

    @property
    def tokenizer_model(self) -> ModelInfo:
        return self.models[self.recipe.tokenizer_source or self.recipe.primary_model]

    def seams(self) -> list[int]:
        """Merged depths whose layer did not follow the previous depth's layer in its parent."""
        return [
            d
            for d in range(1, self.num_layers)
            if self.layer_sources[d] != (self.layer_sources[d - 1][0], self.layer_sources[d - 1][1] + 1)
        ]


Resolver = Callable[[str], ModelInfo]


def make_plan(recipe: Recipe, resolver: Resolver = resolve) -> Plan:
    models = {ref: resolver(ref) for ref in recipe.models}
    primary = models[recipe.primary_model]
    _check_stackable(recipe, models, primary)
    layer_sources = recipe.layer_sources

    # As mergekit does: what comes before the layers (embeddings) from the first slice's model,
    # what comes after them (final norm, an untied head) from the last slice's model, so each
    # end of the stack keeps the tensors it was trained with. The config comes from `primary`.
    first = models[recipe.slices[0].source.model]
    last = models[recipe.slices[-1].source.model]
    tied = primary.tied
    before = {n: m for n, m in first.non_layer_tensors().items() if n.startswith(PRE_LAYER_PREFIXES)}
    after = {
        n: m
        for n, m in last.non_layer_tensors().items()
        if not n.startswith(PRE_LAYER_PREFIXES) and not (tied and n.startswith("lm_head."))
    }
    tensors: dict[str, TensorSource] = {n: TensorSource(first.ref, n, m) for n, m in before.items()}
    for depth, (ref, layer) in enumerate(layer_sources):
        for suffix, meta in models[ref].layer_tensors(layer).items():
            tensors[f"model.layers.{depth}.{suffix}"] = TensorSource(ref, f"model.layers.{layer}.{suffix}", meta)
    tensors.update({n: TensorSource(last.ref, n, m) for n, m in after.items()})

    dtype = recipe.dtype or _parent_dtype(primary)
    return Plan(
        recipe=recipe,
        models=models,
        config=merged_config(primary, models, layer_sources, dtype),
        tensors=tensors,
        layer_sources=layer_sources,
        dtype=dtype,
        tied=tied,
    )


def _parent_dtype(model: ModelInfo) -> str:
    declared = model.config.get("dtype") or model.config.get("torch_dtype")
    if declared in DTYPES:
        return declared
    codes = {m.dtype for m in model.tensors.values()}
    for code in ("BF16", "F16", "F32"):
        if code in codes:
            return ST_TO_DTYPE[code]
    return "float32"


def _check_stackable(recipe: Recipe, models: dict[str, ModelInfo], primary: ModelInfo) -> None:
    reference_layer = {n: m.shape for n, m in primary.layer_tensors(0).items()}
    for i, s in enumerate(recipe.slices, start=1):
        model = models[s.source.model]
        if s.source.end > model.num_layers:
            raise RecipeError(
                f"slice {i}: layer range [{s.source.start}, {s.source.end}) is outside {model.ref}, "
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
        for layer in s.source.layers:
            shapes = {n: m.shape for n, m in model.layer_tensors(layer).items()}
            if shapes != reference_layer:
                raise RecipeError(
                    f"slice {i}: layer {layer} of {model.ref} has different tensors from {primary.ref}'s "
                    "layers (another size of the same architecture?), so they cannot be stacked"
                )


def merged_config(
    primary: ModelInfo, models: dict[str, ModelInfo], layer_sources: list[tuple[str, int]], dtype: str
) -> dict[str, Any]:
    """The primary's config with the layer count set and every per-layer list rebuilt in recipe
    order (Gemma 3's `layer_types`: a default pattern would give wrong RoPE and masks)."""
    config = {k: v for k, v in primary.config.items() if k not in DROPPED_CONFIG_KEYS}
    parent_layers = primary.num_layers
    for key, value in primary.config.items():
        if isinstance(value, list) and len(value) == parent_layers and parent_layers > 1:
            config[key] = [models[ref].config[key][layer] for ref, layer in layer_sources]
    config["num_hidden_layers"] = len(layer_sources)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return config
