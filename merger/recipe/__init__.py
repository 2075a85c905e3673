"""The recipe: what the user edits, and its text form (mergekit YAML).

A recipe is either an ordered list of slices or a whole-model blend (mergekit's `models:` form).
A slice takes the layer range [start, end) of one source model (passed through), or equally long
ranges of several sources blended by the recipe's `merge_method`; a slice may be `repeat`ed.
mergekit has no `repeat`: on the way out it is expanded into the same slice written several
times, so the YAML we write always runs in mergekit.

Parameters (a blend's `weight`, `density`, `t`, ...; passthrough's `scale`) may sit on a source (or
a `models:` entry), a slice or the recipe; `parameters.resolve_parameter` applies mergekit's
precedence (source > slice > recipe) and its value forms: a scalar, a gradient list interpolated over
a slice's layers, or `{filter, value}` entries matched against the tensor name.

This package's root holds the recipe itself; `mergekit_yaml` reads YAML into it, `share_links`
packs it into a link and back, `parameters` checks and resolves its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merger.dtypes import BUILD_DTYPES
from merger.errors import LimitError, RecipeError
from merger.limits import LAYERS, MODELS, SLICES, check_text, count_text
from merger.methods.specs import BLEND_METHODS, METHODS, PASSTHROUGH, MethodSpec
from merger.recipe.parameters import check_setting_size, check_settings

MERGE_METHODS = tuple(METHODS)

# mergekit keys we read but do not act on yet: kept verbatim and written back out.
PRESERVED_TOP_KEYS = ("chat_template", "tokenizer", "out_dtype")

# keys of older mergekit recipes that 0.1.5 reads and ignores: accepted, kept, and said so
IGNORED_TOP_KEYS = {"embed_slerp": "mergekit 0.1.5 ignores it, and so does this app"}
KNOWN_TOP_KEYS = {"slices", "models", "merge_method", "dtype", "tokenizer_source", "base_model", "parameters"}

# mergekit's vocabulary modes for `tokenizer_source` (else it names a model): the base model's
# vocabulary, or the union of every model's
VOCABULARY_MODES = ("base", "union")
LEGACY_MODEL_PREFIX = "model:"  # older mergekit's `tokenizer_source: model:org/name`; 0.1.5 takes the plain name
TOKENIZER_KEYS = ("source",)  # of mergekit's `tokenizer:` mapping, the ones this app builds
Settings = dict[str, Any]  # parameter name -> setting, as written in the YAML
MAX_REPEAT = 64  # the largest `repeat` of one slice (the widget's repeat box takes it too)


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    start: int
    end: int
    parameters: Settings = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_named(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("a slice names no model")
        check_text(value, "a model name")
        return value

    @model_validator(mode="after")
    def _range_ordered(self) -> Source:
        if self.end > LAYERS.value:  # before any count: a range of 10**30 layers is not walked
            span = f"[{count_text(self.start)}, {count_text(self.end)})"
            raise LimitError(LAYERS.refusal(f"layer range {span} of {self.model} reaches layer {count_text(self.end)}"))
        if self.start < 0:
            raise ValueError(f"layer range [{self.start}, {self.end}) of {self.model} starts below 0")
        if self.end == self.start:
            raise ValueError(f"layer range [{self.start}, {self.end}) of {self.model} is empty")
        if self.end < self.start:
            raise ValueError(
                f"layer range [{self.start}, {self.end}) of {self.model} is reversed: "
                "the end must be greater than the start"
            )
        return self

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


class Slice(BaseModel):
    """One source passed through, or several equally long sources blended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[Source, ...]
    parameters: Settings = Field(default_factory=dict)
    repeat: int = Field(default=1, ge=1, le=MAX_REPEAT)

    @model_validator(mode="before")
    @classmethod
    def _single_source_shorthand(cls, data: Any) -> Any:
        # `Slice(source=...)`: the one-source form (also what share links made before blends hold)
        if isinstance(data, dict) and "source" in data:
            data = {k: v for k, v in data.items() if k != "source"} | {"sources": (data["source"],)}
        return data

    @model_validator(mode="after")
    def _sources_line_up(self) -> Slice:
        if not self.sources:
            raise ValueError("a slice has no sources")
        lengths = {s.end - s.start for s in self.sources}
        if len(lengths) > 1:
            spans = ", ".join(f"{s.model} [{s.start}, {s.end}) has {s.end - s.start}" for s in self.sources)
            raise ValueError(f"blended sources must span equally many layers: {spans}")
        models = [s.model for s in self.sources]
        for model in models:
            if models.count(model) > 1:
                raise ValueError(f"{model} appears twice; a blend takes each model once (as mergekit does)")
        return self

    @property
    def source(self) -> Source:
        """The first source: the only one of a passthrough slice."""
        return self.sources[0]

    @property
    def blended(self) -> bool:
        return len(self.sources) > 1

    @property
    def span(self) -> int:
        return self.source.end - self.source.start

    @property
    def num_layers(self) -> int:
        return self.span * self.repeat


class ModelEntry(BaseModel):
    """One model of a whole-model blend, with its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    parameters: Settings = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slices: tuple[Slice, ...] = ()
    model_entries: tuple[ModelEntry, ...] = ()  # mergekit's `models:` (whole-model blend)
    merge_method: str = PASSTHROUGH
    parameters: Settings = Field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    base_model: str | None = None
    preserved: dict[str, Any] = Field(default_factory=dict)

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"merge_method '{value}' is not supported; use one of {', '.join(MERGE_METHODS)}")
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _plain_tokenizer_source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().removeprefix(LEGACY_MODEL_PREFIX).strip()
        if not value:
            raise ValueError("`tokenizer_source` names no model: give a model, base or union")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in BUILD_DTYPES:
            raise ValueError(f"dtype '{value}' is not one of {', '.join(BUILD_DTYPES)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _countable(cls, data: Any) -> Any:
        # before any slice is validated: the work of validating and planning grows with the count
        if isinstance(data, dict):
            for key in ("slices", "model_entries"):
                if isinstance(data.get(key), list | tuple):
                    SLICES.check(len(data[key]), "the recipe")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        LAYERS.check(self.num_layers, "the merged stack")
        MODELS.check(len(self.models), "the recipe")
        for where, settings in self.parameter_scopes():
            for name, setting in settings.items():
                check_setting_size(setting, f"{where}: `{name}`")
        if self.slices and self.model_entries:
            raise ValueError("a recipe has either `slices:` or `models:`, not both")
        if not self.slices and not self.model_entries:
            raise ValueError("the recipe has no slices: add at least one layer range")
        self._check_tokenizer()
        if self.merge_method == PASSTHROUGH:
            if self.model_entries:
                raise ValueError("a whole-model blend (`models:`) needs a blend merge_method such as linear or slerp")
            for i, s in enumerate(self.slices, start=1):
                if s.blended:
                    raise ValueError(
                        f"slice {i} blends {len(s.sources)} sources but merge_method is passthrough; "
                        f"choose one of {', '.join(BLEND_METHODS)}"
                    )
        for where, settings in self.parameter_scopes():
            check_settings(self.merge_method, settings, where)
        if self.merge_method != PASSTHROUGH:
            self._check_base()
        return self

    def _check_tokenizer(self) -> None:
        """mergekit's `tokenizer:` mapping: only its `source`, which this app builds like `tokenizer_source`."""
        tokenizer = self.preserved.get("tokenizer")
        if tokenizer is None:
            return
        if self.tokenizer_source:
            raise ValueError("a recipe sets `tokenizer_source` or `tokenizer:`, not both (mergekit refuses both)")
        if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("source", "union"), str):
            raise ValueError("`tokenizer:` is a mapping like {source: union}")
        extra = sorted(set(map(str, tokenizer)) - set(TOKENIZER_KEYS))
        if extra:
            raise ValueError(
                f"`tokenizer: {', '.join(extra)}` sets chosen tokens' embeddings or pads the vocabulary, which "
                "this app does not build; keep only `tokenizer: {source: ...}` (or `tokenizer_source`)"
            )

    def parameter_scopes(self) -> list[tuple[str, Settings]]:
        """Every `parameters:` mapping in the recipe, with where it sits."""
        scopes = [("`parameters`", self.parameters)]
        scopes += [(f"model {e.model}", e.parameters) for e in self.model_entries]
        for i, s in enumerate(self.slices, start=1):
            scopes.append((f"slice {i}", s.parameters))
            scopes += [(f"slice {i} source {src.model}", src.parameters) for src in s.sources]
        return scopes

    def _check_base(self) -> None:
        spec = METHODS[self.merge_method]
        if spec.needs_base and self.base_model is None:
            raise ValueError(
                f"merge_method {self.merge_method} needs `base_model:` (the model the others are blended "
                "relative to); add it at the top level of the recipe"
            )
        base = self.base_model if spec.uses_base else None
        if self.model_entries:
            # mergekit adds the base model when `models:` leaves it out
            models = {e.model for e in self.model_entries} | ({self.base_model} if self.base_model else set())
            _check_source_count(spec, models, base, "the blend")
        for i, s in enumerate(self.slices, start=1):
            if not s.blended:
                continue
            models = {src.model for src in s.sources}
            if base is not None and base not in models:
                raise ValueError(
                    f"slice {i} blends {', '.join(src.model for src in s.sources)} but not the base model "
                    f"{self.base_model}; add the base model's layers as one of its sources"
                )
            _check_source_count(spec, models, base, f"slice {i}")

    @property
    def vocabulary_source(self) -> str | None:
        """Where mergekit takes the merge's vocabulary from: `tokenizer_source`, or the `tokenizer:`
        mapping's `source` (mergekit's default there: union); None when neither is set."""
        if self.tokenizer_source:
            return self.tokenizer_source
        if "tokenizer" in self.preserved:
            return self.preserved["tokenizer"].get("source") or "union"
        return None

    @property
    def models(self) -> list[str]:
        """Every model the recipe names, first use first."""
        names = [src.model for s in self.slices for src in s.sources] + [e.model for e in self.model_entries]
        for extra in (self.base_model, self.vocabulary_source):
            if extra and extra not in VOCABULARY_MODES:
                names.append(extra)
        return list(dict.fromkeys(names))

    @property
    def notes(self) -> list[str]:
        """What the preview should say about keys this recipe carries but nothing acts on."""
        return [f"`{key}` is kept as written: {why}" for key, why in IGNORED_TOP_KEYS.items() if key in self.preserved]

    @property
    def is_whole_model_blend(self) -> bool:
        return bool(self.model_entries)

    @property
    def layer_sources(self) -> list[tuple[str, int]]:
        """(model, layer) for every depth of the merged stack, in order; a blended depth is named by
        its first source. A whole-model blend's depths depend on the models' layer counts: see
        `as_slices`."""
        return [(s.source.model, layer) for s in self.slices for _ in range(s.repeat) for layer in s.source.layers]

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    @property
    def primary_model(self) -> str:
        """The model whose config the merge takes (and, for passthrough, embeddings and head)."""
        if self.base_model:
            return self.base_model
        return self.slices[0].source.model if self.slices else self.model_entries[0].model

    def as_slices(self, layer_counts: Mapping[str, int]) -> tuple[Slice, ...]:
        """The slices the recipe means. A whole-model blend is one slice of every model's full
        range, each model's parameters on its source, the base model appended when `models:`
        leaves it out (as mergekit does)."""
        if not self.model_entries:
            return self.slices
        entries = list(self.model_entries)
        if self.base_model and self.base_model not in {e.model for e in entries}:
            entries.append(ModelEntry(model=self.base_model))
        try:
            sources = tuple(
                Source(model=e.model, start=0, end=layer_counts[e.model], parameters=e.parameters) for e in entries
            )
            return (Slice(sources=sources),)
        except ValidationError as exc:
            raise RecipeError(f"models: {first_problem(exc)}") from None

    def with_models(self, rename: Callable[[str], str]) -> Recipe:
        """The same recipe with every model reference passed through `rename` (exports name bundled
        models by their Hub ids)."""
        slices = tuple(
            s.model_copy(
                update={"sources": tuple(src.model_copy(update={"model": rename(src.model)}) for src in s.sources)}
            )
            for s in self.slices
        )
        entries = tuple(e.model_copy(update={"model": rename(e.model)}) for e in self.model_entries)
        update: dict[str, Any] = {"slices": slices, "model_entries": entries}
        if self.base_model:
            update["base_model"] = rename(self.base_model)
        if self.tokenizer_source and self.tokenizer_source not in VOCABULARY_MODES:
            update["tokenizer_source"] = rename(self.tokenizer_source)
        source = self.preserved.get("tokenizer", {}).get("source")
        if source and source not in VOCABULARY_MODES:
            update["preserved"] = {
                **self.preserved,
                "tokenizer": {**self.preserved["tokenizer"], "source": rename(source)},
            }
        return self.model_copy(update=update)

    def to_mergekit(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model_entries:
            out["models"] = [_with_parameters({"model": e.model}, e.parameters) for e in self.model_entries]
        else:
            out["slices"] = [_slice_to_mergekit(s) for s in self.slices for _ in range(s.repeat)]
        out["merge_method"] = self.merge_method
        for key in ("base_model", "parameters", "dtype", "tokenizer_source"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out.update(self.preserved)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_mergekit(), sort_keys=False, default_flow_style=None)

    def compacted(self) -> Recipe:
        """Consecutive identical slices folded into one slice with a repeat count."""
        folded: list[Slice] = []
        for s in self.slices:
            last = folded[-1] if folded else None
            if last is not None and (last.sources, last.parameters) == (s.sources, s.parameters):
                folded[-1] = last.model_copy(update={"repeat": last.repeat + s.repeat})
            else:
                folded.append(s)
        return self.model_copy(update={"slices": tuple(folded)})


def _with_parameters(out: dict[str, Any], parameters: Settings) -> dict[str, Any]:
    if parameters:
        out["parameters"] = parameters
    return out


def _slice_to_mergekit(s: Slice) -> dict[str, Any]:
    sources = [
        _with_parameters({"model": src.model, "layer_range": [src.start, src.end]}, src.parameters) for src in s.sources
    ]
    return _with_parameters({"sources": sources}, s.parameters)


def _check_source_count(spec: MethodSpec, models: set[str], base: str | None, where: str) -> None:
    count, most = len(models), spec.max_sources
    if count < spec.min_sources or (most is not None and count > most):
        wanted = f"exactly {spec.min_sources}" if spec.min_sources == most else f"at least {spec.min_sources}"
        raise ValueError(f"{spec.name} blends {wanted} models (the base model included); {where} has {count}")
    others = count - (base in models)
    if spec.non_base_sources is not None and others != spec.non_base_sources:
        without_base = ""
        if base in models and count == spec.non_base_sources and spec.base == "optional":
            without_base = f" (without a base model, it would blend these {count} themselves)"
        raise ValueError(
            f"{spec.name} blends exactly {spec.non_base_sources} models besides the base model; {where} has "
            f"{others}{without_base}"
        )


def first_problem(exc: ValidationError) -> str:
    """The first problem as a clause that names where it is (pydantic's own wording names no field)."""
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg  # ours: already worded for the user
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "the recipe"
    if msg.startswith("Input "):
        return f"`{field}` {msg.removeprefix('Input ')}"
    return f"`{field}`: {msg[:1].lower()}{msg[1:]}"


def passthrough(*ranges: tuple[str, int, int], dtype: str | None = None) -> Recipe:
    """A recipe from (model, start, end) triples: the form tests and the CLI use most."""
    return Recipe(slices=tuple(Slice(source=Source(model=m, start=a, end=b)) for m, a, b in ranges), dtype=dtype)
