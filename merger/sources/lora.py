"""LoRA adapters in model references: mergekit's `model+lora` (each half a Hub id, a local folder or
a bundled model, each with its own `@revision`). The adapter is merged into the base tensors it
touches when they are read, as mergekit 0.1.5 does it (PEFT's `merge_and_unload` on the base model
loaded in its own dtype):

- a linear layer's weight W becomes W + (B @ A) * scaling, the sum taken in float32 and rounded
  once to W's dtype (PEFT upcasts adapter weights to float32 and adds in place);
- an embedding's weight becomes W + ((B @ A)^T * scaling) rounded to W's dtype first;
- scaling is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, each per module from
  `alpha_pattern` / `rank_pattern` when they name it.

Only PEFT safetensors adapters are read (never adapter_model.bin: pickles run code), and the
adapter's config is untrusted JSON: every field used is checked, and what this module does not
merge exactly as PEFT does (DoRA, LoRA biases, whole modules saved beside the adapter, regular
expressions in target_modules) is refused with a sentence, never half applied. Metadata only (the
preview reads adapters too); merger.build.parent_reader merges."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.sources.safetensors_files import TensorMeta
from merger.sources.untrusted_json import json_object

SEPARATOR = "+"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
KEY_PREFIX = "base_model.model."  # PEFT's prefix on every saved key
# saved key suffix -> which tensor. PEFT saves the whole layer beside an adapter on embeddings
# (save_embedding_layers, `.base_layer.weight`); loading the adapter loads it into the model, so the
# delta is added to it rather than to the base's tensor
KEY_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
    ".base_layer.weight": "layer",
}
LAYER_INDEX_RE = re.compile(r"\.layers\.(\d+)\.")
# config fields whose non-empty value changes what merging does in ways merged here never are
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA",
    "lora_bias": "a LoRA bias",
    "modules_to_save": "whole modules saved beside the adapter (modules_to_save)",
    "trainable_token_indices": "trained token rows (trainable_token_indices)",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on bare parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing",
}
PATTERN_KEY_RE = re.compile(r"^[\w.]+$")  # the pattern keys read here: module names, no regular expressions


def split_ref(ref: str) -> tuple[str, str | None]:
    """(model, adapter) of a reference; adapter None without `+`. More than one `+` is refused, as
    mergekit refuses it."""
    parts = ref.split(SEPARATOR)
    if len(parts) > 2:
        raise ModelRefError(f"'{ref}' has more than one '+'; a reference is MODEL or MODEL+LORA")
    model, adapter = (p.strip() for p in [*parts, ""][:2])
    if not model or (len(parts) == 2 and not adapter):
        raise ModelRefError(f"'{ref}' names no model on one side of its '+'; write MODEL+LORA")
    return model, adapter or None


@dataclass(frozen=True)
class LoraDelta:
    """What the adapter adds to one base tensor: A and B by their names in the adapter's file."""

    a: str
    b: str
    scaling: float
    embedding: bool  # lora_embedding_A/B: the product is transposed and rounded before the add
    saved_layer: str | None = None  # the adapter's own copy of the base tensor, which replaces it


@dataclass
class Adapter:
    """A LoRA adapter's metadata: its file's tensors and, per base tensor it changes, the delta."""

    ref: str
    tensors: dict[str, TensorMeta]
    deltas: dict[str, LoraDelta]  # base tensor name -> delta
    local_dir: Path | None = None  # weights on disk (None: Hub, not downloaded)
    repo_id: str | None = None
    commit: str | None = None


def parse_adapter(ref: str, config: dict[str, Any], tensors: dict[str, TensorMeta], **where: Any) -> Adapter:
    """An adapter from its (untrusted) config and its file's tensors, or a ModelRefError saying
    what in it is not a PEFT LoRA adapter that merges as mergekit merges it."""
    settings = _Settings(ref, config)
    pairs: dict[str, dict[str, str]] = {}
    embedding: set[str] = set()
    for key in tensors:
        module, part = _module_of(ref, key)
        pairs.setdefault(module, {})[part] = key
        if part in ("embedding_A", "embedding_B"):
            embedding.add(module)
    deltas = {}
    for module, keys in pairs.items():
        kind = ("embedding_A", "embedding_B") if module in embedding else ("A", "B")
        saved_layer = keys.pop("layer", None)
        if set(keys) != set(kind):
            raise ModelRefError(f"adapter '{ref}' does not hold both LoRA matrices of {module}")
        settings.check_targeted(module)
        a, b = tensors[keys[kind[0]]], tensors[keys[kind[1]]]
        rank = settings.rank(module)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ModelRefError(
                f"adapter '{ref}': the LoRA matrices of {module} have shapes {list(a.shape)} and {list(b.shape)}, "
                f"not the rank {rank} its adapter_config.json gives"
            )
        deltas[f"{module}.weight"] = LoraDelta(
            a=keys[kind[0]],
            b=keys[kind[1]],
            scaling=settings.scaling(module),
            embedding=module in embedding,
            saved_layer=saved_layer,
        )
    if not deltas:
        raise ModelRefError(f"adapter '{ref}' holds no LoRA matrices")
    return Adapter(ref=ref, tensors=tensors, deltas=deltas, **where)


def check_fits(adapter: Adapter, model_ref: str, base: dict[str, TensorMeta], *, tied: bool) -> None:
    """Every tensor the adapter changes exists in the base model with the shape its product has."""
    for name, delta in adapter.deltas.items():
        a, b = adapter.tensors[delta.a].shape, adapter.tensors[delta.b].shape
        product = (a[1], b[0]) if delta.embedding else (b[0], a[1])
        meta = base.get(name)
        if meta is None:
            raise ModelRefError(f"adapter '{adapter.ref}' changes {name}, which '{model_ref}' does not have")
        saved = adapter.tensors[delta.saved_layer].shape if delta.saved_layer else meta.shape
        if meta.shape != product or saved != meta.shape:
            raise ModelRefError(
                f"adapter '{adapter.ref}' changes {name} by a {list(product)} product, but '{model_ref}' has it "
                f"with shape {list(meta.shape)}: the adapter was trained on another model"
            )
        if tied and name == "lm_head.weight":
            raise ModelRefError(
                f"adapter '{adapter.ref}' changes lm_head, which '{model_ref}' ties to its embeddings; "
                "merging it would change the embeddings too"
            )


def refuse_missing_weights(ref: str, files: list[str]) -> None:
    """An adapter without adapter_model.safetensors: pickled weights are never opened."""
    pickled = sorted(name for name in files if name in PICKLED_WEIGHTS)
    if pickled:
        raise UnsafeCheckpointError(
            f"adapter '{ref}' only has pickled weights ({', '.join(pickled)}); they can run code when loaded, "
            "so we never open them. Save the adapter as safetensors first"
        )
    raise ModelRefError(f"'{ref}' has no {WEIGHTS_FILE}, so it is not a PEFT LoRA adapter")


def read_config(path: Path, ref: str) -> dict[str, Any]:
    """An adapter's adapter_config.json as a mapping (its fields checked by parse_adapter)."""
    if not path.is_file():
        raise ModelRefError(f"'{ref}' has no {CONFIG_FILE}, so it is not a PEFT LoRA adapter")
    return json_object(lambda: path.read_bytes(), f"the {CONFIG_FILE} of '{ref}'", ModelRefError)


def _module_of(ref: str, key: str) -> tuple[str, str]:
    """(module path in the base model, which matrix) of one adapter file key."""
    for suffix, part in KEY_SUFFIXES.items():
        if key.startswith(KEY_PREFIX) and key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], part
    shown = key if len(key) <= 120 else key[:120] + "..."
    raise ModelRefError(f"adapter '{ref}' holds {shown}, which is not a LoRA matrix of a PEFT adapter")


class _Settings:
    """The fields of adapter_config.json that merging reads, checked."""

    def __init__(self, ref: str, config: dict[str, Any]) -> None:
        self.ref = ref
        if config.get("peft_type") != "LORA":
            raise ModelRefError(f"'{ref}' is not a LoRA adapter (its adapter_config.json has no peft_type LORA)")
        for key, feature in UNSUPPORTED_FEATURES.items():
            if config.get(key):
                raise ModelRefError(f"adapter '{ref}' uses {feature}, which this app does not merge")
        if config.get("bias", "none") != "none":
            shown = str(config["bias"])[:20]
            raise ModelRefError(f"adapter '{ref}' trains biases (bias: {shown}), which this app does not merge")
        self.r = self._positive(config.get("r"), "r", whole=True)
        self.alpha = self._positive(config.get("lora_alpha"), "lora_alpha", whole=False)
        self.rslora = config.get("use_rslora", False)
        if not isinstance(self.rslora, bool):
            raise ModelRefError(f"adapter '{ref}': use_rslora is not true or false")
        self.rank_pattern = self._pattern(config.get("rank_pattern"), "rank_pattern", whole=True)
        self.alpha_pattern = self._pattern(config.get("alpha_pattern"), "alpha_pattern", whole=False)
        self.targets = self._names(config.get("target_modules"), "target_modules", allow_all_linear=True)
        self.excluded = self._names(config.get("exclude_modules"), "exclude_modules", allow_all_linear=False) or []
        layers = config.get("layers_to_transform")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if layers is not None and not (isinstance(layers, list) and all(_whole(v) for v in layers)):
            raise ModelRefError(f"adapter '{ref}': layers_to_transform is not a list of layer numbers")
        if layers is not None and config.get("layers_pattern"):
            raise ModelRefError(f"adapter '{ref}' sets layers_pattern, which this app does not read")
        self.layers = layers

    def _positive(self, value: Any, key: str, *, whole: bool) -> float:
        if not (_whole(value) if whole else _number(value)) or value <= 0 or not math.isfinite(value):
            kind = "a whole number" if whole else "a number"
            raise ModelRefError(f"adapter '{self.ref}': {key} in its adapter_config.json is not {kind} above 0")
        return value

    def _pattern(self, value: Any, key: str, *, whole: bool) -> dict[str, float]:
        if not value:
            return {}
        if not isinstance(value, dict):
            raise ModelRefError(f"adapter '{self.ref}': {key} is not a mapping of module names to values")
        for name, number in value.items():
            if not PATTERN_KEY_RE.match(name):
                raise ModelRefError(
                    f"adapter '{self.ref}': {key} has a regular expression as a key; this app reads module names only"
                )
            self._positive(number, f"{key}[{name}]", whole=whole)
        return value

    def _names(self, value: Any, key: str, *, allow_all_linear: bool) -> list[str] | str | None:
        if value is None or (allow_all_linear and value == "all-linear"):
            return value
        if isinstance(value, str):
            raise ModelRefError(
                f"adapter '{self.ref}': {key} is a regular expression; this app reads adapters whose {key} "
                "is a list of module names"
            )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelRefError(f"adapter '{self.ref}': {key} is not a list of module names")
        return value

    def check_targeted(self, module: str) -> None:
        """PEFT loads only the matrices of modules its config targets (and ignores the rest): the
        file and the config must agree, so what is merged here is what PEFT merges."""
        targeted = (
            module.split(".")[-1] != "lm_head"
            if self.targets == "all-linear"
            else self.targets is not None and any(_names_module(t, module) for t in self.targets)
        )
        if targeted and any(_names_module(t, module) for t in self.excluded):
            targeted = False
        if targeted and self.layers is not None:
            found = LAYER_INDEX_RE.search(f".{module}.")
            targeted = found is not None and int(found.group(1)) in self.layers
        if not targeted:
            raise ModelRefError(
                f"adapter '{self.ref}' holds matrices for {module}, which its adapter_config.json does not target"
            )

    def rank(self, module: str) -> int:
        return next((v for k, v in self.rank_pattern.items() if _names_module(k, module)), self.r)

    def scaling(self, module: str) -> float:
        alpha = next((v for k, v in self.alpha_pattern.items() if _names_module(k, module)), self.alpha)
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _names_module(name: str, module: str) -> bool:
    """PEFT's suffix match of a configured module name against a module path."""
    return module == name or module.endswith("." + name)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
