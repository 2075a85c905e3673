"""The recipe: what the user edits, and its text form (mergekit YAML).

A recipe is either an ordered list of slices or a whole-model blend (mergekit's `models:` form).
A slice takes the layer range [start, end) of one source model (passed through), or equally long
ranges of several sources blended by the recipe's `merge_method`; a slice may be `repeat`ed.
mergekit has no `repeat`: on the way out it is expanded into the same slice written several
times, so the YAML we write always runs in mergekit.

Parameters (a blend's `weight`, `density`, `t`, ...; passthrough's `scale`) may sit on a source (or
a `models:` entry), a slice or the recipe; `resolve_parameter` applies mergekit's precedence
(source > slice > recipe) and its value forms: a scalar, a gradient list interpolated over a slice's layers, or
`{filter, value}` entries matched against the tensor name.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merger import bounded_yaml
from merger.errors import RecipeError, UserError
from merger.limits import (
    LAYERS,
    MODELS,
    PARAMETER_DEPTH,
    PARAMETER_VALUES,
    RECIPE_CHARS,
    SHARE_LINK_BYTES,
    SHARE_LINK_CHARS,
    SLICES,
    LimitError,
    check_text,
    count_text,
)
from merger.method_specs import BLEND_METHODS, METHODS, PASSTHROUGH, REQUIRED, MethodSpec, Param

DTYPES = ("float32", "bfloat16", "float16")
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
    repeat: int = Field(default=1, ge=1, le=64)

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
        if value is not None and value not in DTYPES:
            raise ValueError(f"dtype '{value}' is not one of {', '.join(DTYPES)}")
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
            raise RecipeError(f"models: {_first_message(exc)}") from None

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


# --- parameters -------------------------------------------------------------------------------


def check_setting_size(setting: Any, where: str) -> None:
    """Bound a setting before anything walks it: its values are evaluated for every tensor."""
    values, stack = 0, [(setting, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack += [(v, depth) for v in item.values()]
        elif isinstance(item, list | tuple):
            if depth + 1 > PARAMETER_DEPTH.value:
                raise PARAMETER_DEPTH.exceeded(where)
            stack += [(v, depth + 1) for v in item]
        else:
            values += 1
            if values > PARAMETER_VALUES.value:
                raise PARAMETER_VALUES.exceeded(where)


def check_settings(method: str, settings: Mapping[str, Any], where: str) -> None:
    """Names known to `method`, values of the right type and form; density in (0, 1]."""
    spec = METHODS[method]
    for name, setting in settings.items():
        param = spec.param(name)
        if param is None:
            known = ", ".join(p.name for p in spec.params)
            raise ValueError(f"{where}: `{name}` is not a parameter of {method} (it takes {known})")
        for value in _values_in(setting, f"{where}: `{name}`"):
            _check_value(param, value, where)


def _values_in(setting: Any, where: str) -> list[Any]:
    """Every scalar a setting can evaluate to; a malformed setting is a ValueError."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(e, dict) for e in setting):
            values = []
            for cond in setting:
                if set(cond) - {"filter", "value"} or "value" not in cond:
                    raise ValueError(f"{where}: each conditional entry is {{filter: NAME, value: V}}")
                if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                    raise ValueError(f"{where}: a filter is a piece of a tensor name, like self_attn")
                values += _values_in(cond["value"], where)
            return values
        if any(isinstance(e, (dict, list)) for e in setting) or not setting:
            raise ValueError(f"{where}: a gradient is a non-empty list of numbers")
        return setting
    return [setting]


def _check_value(param: Param, value: Any, where: str) -> None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if param.kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: `{param.name}` is true or false, not {value!r}")
    if param.kind is int and not (numeric and float(value).is_integer()):
        raise ValueError(f"{where}: `{param.name}` is a whole number, not {value!r}")
    if param.kind is float and not numeric:
        raise ValueError(f"{where}: `{param.name}` is a number, not {value!r}")
    if param.within is not None and value not in param.within:
        raise ValueError(f"{where}: `{param.name}` is {value}, outside {param.within}: {param.within.why}")


def evaluate_setting(setting: Any, *, tensor_name: str, t: float, kind: type) -> Any:
    """One setting's value for one tensor (mergekit's rules): a scalar as written; a list of
    numbers is a gradient, linearly interpolated at `t` in [0, 1] (booleans: the one at or before
    `t`; whole numbers must land on one, else ValueError); `{filter, value}` entries give the
    first whose filter occurs in `tensor_name` (no filter or '*' matches any), None if none."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return kind(setting)
    if not setting:
        return None
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            name_filter = cond.get("filter")
            if name_filter in (None, "*") or name_filter in tensor_name:
                return evaluate_setting(cond["value"], tensor_name=tensor_name, t=t, kind=kind)
        return None
    values = [kind(v) for v in setting]
    if kind is bool:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    value = (1 - frac) * values[i0] + frac * values[i1]
    if kind is int:  # as mergekit: whole numbers interpolate, and must land on a whole number
        if not float(value).is_integer():
            raise ValueError(f"its gradient gives {value:g} here, not a whole number")
        return int(value)
    return value


def resolve_parameter(param: Param, scopes: Sequence[Mapping[str, Any]], *, tensor_name: str, t: float) -> Any:
    """The value of `param` for one tensor: the first scope, in precedence order (source, slice,
    recipe), whose setting yields a value; else the default. A required parameter with no value
    raises LookupError."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name=tensor_name, t=t, kind=param.kind)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise LookupError(param.name)
    return param.default


# --- parsing ----------------------------------------------------------------------------------


def _refuse_unknown(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise RecipeError(f"{where} has unknown key(s): {', '.join(sorted(map(str, unknown)))}")


def _parameters_of(raw: dict, where: str) -> Settings:
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(k, str) for k in parameters):
        raise RecipeError(f"{where}: `parameters` must be a mapping of names to values")
    return parameters


def _parse_source(src: Any, where: str) -> Source:
    if not isinstance(src, dict):
        raise RecipeError(f"{where}: each source must be a mapping with `model:` and `layer_range:`")
    _refuse_unknown(src, {"model", "layer_range", "parameters"}, f"{where} source")
    layer_range = src.get("layer_range")
    if (
        not isinstance(layer_range, list)
        or len(layer_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
    ):
        raise RecipeError(f"{where}: `layer_range` must be two whole numbers [start, end]")
    if not isinstance(src.get("model"), str):
        raise RecipeError(f"{where} names no model")
    return Source(model=src["model"], start=layer_range[0], end=layer_range[1], parameters=_parameters_of(src, where))


def _parse_slice(raw: Any, index: int) -> Slice:
    where = f"slice {index + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with `sources:`")
    _refuse_unknown(raw, {"sources", "repeat", "parameters"}, where)
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where} has no `sources:` list")
    try:
        return Slice(
            sources=tuple(_parse_source(src, where) for src in sources),
            parameters=_parameters_of(raw, where),
            repeat=raw.get("repeat", 1),
        )
    except ValidationError as exc:
        raise RecipeError(f"{where}: {_first_message(exc)}") from None


def _parse_model_entry(raw: Any, index: int) -> ModelEntry:
    where = f"models entry {index + 1}"
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"].strip():
        raise RecipeError(f"{where} must be a mapping with `model:`")
    _refuse_unknown(raw, {"model", "parameters"}, where)
    return ModelEntry(model=raw["model"].strip(), parameters=_parameters_of(raw, where))


def _first_message(exc: ValidationError) -> str:
    """The first problem as a clause that names where it is (pydantic's own wording names no field)."""
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg  # ours: already worded for the user
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "the recipe"
    if msg.startswith("Input "):
        return f"`{field}` {msg.removeprefix('Input ')}"
    return f"`{field}`: {msg[:1].lower()}{msg[1:]}"


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a mergekit-style mapping into a Recipe; every problem is a RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping with a `slices:` list")
    unknown = set(data) - KNOWN_TOP_KEYS - set(PRESERVED_TOP_KEYS) - set(IGNORED_TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown key(s) in the recipe: {', '.join(sorted(map(str, unknown)))}")
    raw_slices, raw_models = data.get("slices"), data.get("models")
    if raw_slices is None and raw_models is None:
        raise RecipeError("the recipe has no slices: add at least one layer range")
    if raw_slices is not None and not isinstance(raw_slices, list):
        raise RecipeError("`slices` must be a list")
    if raw_models is not None and not isinstance(raw_models, list):
        raise RecipeError("`models` must be a list of `- model: NAME` entries")
    if data.get("tokenizer_source") is not None and not isinstance(data["tokenizer_source"], str):
        raise RecipeError("`tokenizer_source` names a model, or is base or union")
    SLICES.check(len(raw_slices or raw_models or ()), "the recipe")
    slices = tuple(_parse_slice(raw, i) for i, raw in enumerate(raw_slices or []))
    entries = tuple(_parse_model_entry(raw, i) for i, raw in enumerate(raw_models or []))
    try:
        return Recipe(
            slices=slices,
            model_entries=entries,
            merge_method=data.get("merge_method", PASSTHROUGH),
            parameters=_parameters_of(data, "the recipe"),
            dtype=data.get("dtype"),
            tokenizer_source=data.get("tokenizer_source"),
            base_model=data.get("base_model"),
            preserved={k: data[k] for k in (*PRESERVED_TOP_KEYS, *IGNORED_TOP_KEYS) if k in data},
        )
    except ValidationError as exc:
        raise RecipeError(_first_message(exc)) from None


def recipe_from_yaml(text: str) -> Recipe:
    """Parse mergekit YAML within the recipe limits. Syntax errors name the line and column."""
    RECIPE_CHARS.check(len(text), "the recipe")
    try:
        data = bounded_yaml.load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"malformed YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"malformed YAML: {exc}") from None
    if data is None:
        raise RecipeError("the recipe is empty: add at least one layer range")
    return recipe_from_dict(data)


def passthrough(*ranges: tuple[str, int, int], dtype: str | None = None) -> Recipe:
    """A recipe from (model, start, end) triples: the form tests and the CLI use most."""
    return Recipe(slices=tuple(Slice(source=Source(model=m, start=a, end=b)) for m, a, b in ranges), dtype=dtype)


SHARE_VERSION = "v1"


def to_share_token(recipe: Recipe, settings: dict[str, Any] | None = None) -> str:
    """Compact, URL-safe, versioned: 'v1.' + base64url(zlib(JSON of the mergekit form + settings))."""
    payload = {"recipe": recipe.compacted().model_dump(mode="json", exclude_defaults=True), "settings": settings or {}}
    raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
    return f"{SHARE_VERSION}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def from_share_token(token: str) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and settings a share link carries; a damaged link is a RecipeError."""
    damaged = "this share link is damaged or incomplete; showing the default stack"
    SHARE_LINK_CHARS.check(len(token), "this share link")
    version, _, body = token.partition(".")
    if version != SHARE_VERSION:
        raise RecipeError(f"this share link's format ('{version[:8]}') is not one this app reads")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, SHARE_LINK_BYTES.value)
        if inflater.unconsumed_tail:
            raise SHARE_LINK_BYTES.exceeded("this share link, unpacked,")
        payload = json.loads(text)
        recipe = Recipe.model_validate(payload["recipe"])
        settings = payload.get("settings") or {}
    except UserError:
        raise
    except ValidationError as exc:
        why = _first_message(exc)
        raise RecipeError(f"this share link's recipe cannot be used ({why}); showing the default stack") from None
    except (ValueError, KeyError, TypeError, RecursionError, zlib.error, binascii.Error):
        raise RecipeError(damaged) from None
    if not isinstance(settings, dict):
        raise RecipeError(damaged)
    return recipe, settings
