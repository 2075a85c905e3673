"""The checkpoint layout and what we know of each model family, as data.

Every consumer (the plan, placement, assembly, export, slim, the decode path, chat) reads the
tensor naming and the per-family facts here, so a new architecture is an edit of this module
(and a tiny-model test), not a search through the stages: where a checkpoint keeps its text
decoder (`Layout`: a causal LM's, or a multimodal model's text tower), which config settings
speak of each layer (a merge restates them in recipe order), and how a checkpoint's tensors map
onto transformers 5's modules where the two differ (mixture-of-experts layers).

No torch at import: the plan (and the preview) read these facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Tensor naming of a decoder-only causal LM checkpoint (Llama's, which Mistral, Qwen 2/3 and
# Gemma 3's text model share): embeddings, then model.layers.N.*, then the final norm and the head.
TEXT = "model."  # the prefix of the embeddings, the layers and the final norm
LAYER_RE = re.compile(rf"^{re.escape(TEXT)}layers\.(\d+)\.(.+)$")  # groups: depth, name inside the layer
EMBEDDINGS = f"{TEXT}embed_tokens.weight"
HEAD = "lm_head.weight"
HEAD_MODULE = "lm_head"  # with tied embeddings it reuses the embedding tensor


def layer_module(depth: int) -> str:
    """The module of decoder layer `depth` ("model.layers.3")."""
    return CAUSAL_LM.layer_prefix(depth).removesuffix(".")


def is_head(name: str) -> bool:
    """Whether a tensor belongs to the output head."""
    return name.startswith(f"{HEAD_MODULE}.")


# Modules whose forward we know to be Llama's, by class name: their q/k/v and gate/up
# projections fuse into one matrix each (merger.generate.fuse).
FUSABLE_ATTENTION = ("LlamaAttention",)
FUSABLE_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")

# Model types whose decode masks are plain causal (plus a sliding window where the config sets
# one), so the decode attention computes them from the position (merger.generate.attention).
POSITIONAL_MASK_KNOWN = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# Turn-end markers of templates we know, so a model stops at the end of its turn even when its
# generation config names only the document end (Gemma's <end_of_turn>, ChatML's <|im_end|>).
TURN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


# Families whose `layer_types` transformers derives, when a config has none (configs written before
# transformers 5), from `max_window_layers`: layers from that index on use the sliding window.
SLIDING_FROM_MAX_WINDOW_LAYERS = ("qwen2", "qwen3")
QWEN_DEFAULT_MAX_WINDOW_LAYERS = 28  # transformers' default for those configs
# Families whose layers are sparse (experts) or dense by `decoder_sparse_step` and `mlp_only_layers`.
SPARSE_STEP_FAMILIES = ("qwen3_moe",)
DENSE_MLP = "mlp_only"  # per-layer flag the plan carries for those families (not a config key)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")  # Hub configs' name, then transformers 5's
DEFAULT_EXPERTS = 128  # Qwen3MoeConfig's default


def per_layer_settings(config: dict[str, Any], num_layers: int) -> dict[str, list]:
    """Every setting of `config` that holds one value per layer, as a list over the parent's layers:
    lists as long as the stack (Gemma 3's `layer_types`), and what a family says per layer in
    other forms (an index from which layers slide, a list of dense layers)."""
    lists = {k: v for k, v in config.items() if isinstance(v, list) and len(v) == num_layers and num_layers > 1}
    family = config.get("model_type")
    if family in SLIDING_FROM_MAX_WINDOW_LAYERS and "layer_types" not in lists:
        slides = bool(config.get("use_sliding_window")) and config.get("sliding_window") is not None
        first = config.get("max_window_layers", QWEN_DEFAULT_MAX_WINDOW_LAYERS)
        lists["layer_types"] = [
            "sliding_attention" if slides and i >= first else "full_attention" for i in range(num_layers)
        ]
    if family in SPARSE_STEP_FAMILIES:
        step = config.get("decoder_sparse_step", 1) or 1
        dense = set(config.get("mlp_only_layers") or ())
        experts = next((config[k] for k in EXPERT_COUNT_KEYS if config.get(k) is not None), DEFAULT_EXPERTS)
        lists[DENSE_MLP] = [i in dense or not (experts > 0 and (i + 1) % step == 0) for i in range(num_layers)]
    return lists


def restate_layer_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The merged config with the settings derived from its per-layer lists written again: Qwen's
    `max_window_layers` (where its sliding layers start: exact for readers that only know it when
    they are the stack's last ones; `layer_types` says each layer's kind) and the Qwen MoE's dense
    layers as `mlp_only_layers` with a sparse step of 1."""
    config = dict(config)
    family = config.get("model_type")
    if family in SLIDING_FROM_MAX_WINDOW_LAYERS and "layer_types" in config:
        types = config["layer_types"]
        config["max_window_layers"] = next((i for i, t in enumerate(types) if t == "sliding_attention"), len(types))
    if DENSE_MLP in config:
        dense = config.pop(DENSE_MLP)
        config["decoder_sparse_step"] = 1
        config["mlp_only_layers"] = [i for i, flag in enumerate(dense) if flag]
    return config


@dataclass(frozen=True)
class StackedExperts:
    """A mixture-of-experts layer that checkpoints store one tensor per expert
    (`{prefix}.{e}.{name}.weight`) and transformers 5 holds stacked (`{into}.gate_up_proj`:
    [experts, 2 x intermediate, hidden], gate rows then up rows; `{into}.down_proj`)."""

    prefix: str  # in-layer prefix of the stored experts
    gate: str
    up: str
    down: str
    into: str = "mlp.experts"
    renames: tuple[tuple[str, str], ...] = ()  # other in-layer prefixes that moved (stored -> module)

    def stored(self, expert: int, name: str) -> str:
        return f"{self.prefix}.{expert}.{name}.weight"


STACKED_EXPERTS = {
    "mixtral": StackedExperts(
        "block_sparse_moe.experts", "w1", "w3", "w2", renames=(("block_sparse_moe.gate.", "mlp.gate."),)
    ),
    "qwen3_moe": StackedExperts("mlp.experts", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps its text decoder: a causal LM's at `model.`; a multimodal model's
    text tower under `language_model.model.` (Gemma 3 4B and up, Mistral 3: the Hub's names, which
    transformers 5 also writes), its config under `text_config`, beside a vision tower and a
    projector that a merge carries along untouched. The merge is built and chatted with as the
    text model alone; `text_name` maps a tensor to that model's name (None: not part of it)."""

    text: str  # prefix of embed_tokens, layers and the final norm
    head: str
    text_config: str | None = None  # key of the text decoder's config (None: the config itself)
    text_architecture: str | None = None  # the causal LM class of the text decoder alone
    # mergekit's names of the other modules, which its `modules:` form needs beside `text_decoder`
    mergekit_modules: tuple[str, ...] = ()

    @property
    def embeddings(self) -> str:
        return f"{self.text}embed_tokens.weight"

    @property
    def vocabulary_tensors(self) -> tuple[str, str]:
        """The tensors with the vocabulary along axis 0."""
        return self.embeddings, self.head

    def layer_prefix(self, layer: int) -> str:
        return f"{self.text}layers.{layer}."

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer, name inside it) of a decoder-layer tensor, else None."""
        rest = name.removeprefix(f"{self.text}layers.")
        index, _, inner = rest.partition(".")
        if rest == name or not index.isdigit() or not inner:
            return None
        return int(index), inner

    def after_layers(self, name: str) -> bool:
        """Whether a non-layer tensor comes after the layers (final norm, head: a stack takes it
        from its last slice) rather than before them (embeddings; a vision tower and its
        projector, which feed the embeddings: from the first slice)."""
        text_not_embeddings = name.startswith(self.text) and not name.startswith(f"{self.text}embed_tokens.")
        return name == self.head or text_not_embeddings

    def text_name(self, name: str) -> str | None:
        if name == self.head:
            return CAUSAL_LM.head
        if name.startswith(self.text):
            return CAUSAL_LM.text + name.removeprefix(self.text)
        return None

    def text_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        """The text decoder's config."""
        inner = config.get(self.text_config) if self.text_config else config
        return inner if isinstance(inner, dict) else {}


CAUSAL_LM = Layout(text=TEXT, head=HEAD)
MULTIMODAL = {  # model_type of the checkpoint -> where its text tower is
    family: Layout(
        "language_model.model.",
        "language_model.lm_head.weight",
        "text_config",
        text_architecture,
        mergekit_modules=("vision_tower", "multi_modal_projector"),
    )
    for family, text_architecture in (("gemma3", "Gemma3ForCausalLM"), ("mistral3", "MistralForCausalLM"))
}
MERGEKIT_TEXT_MODULE = "text_decoder"


def layout_of(config: dict[str, Any]) -> Layout:
    return MULTIMODAL.get(config.get("model_type"), CAUSAL_LM)


def text_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the text model alone (what is built to chat, and the text-only export): a
    multimodal config's `text_config`, with the dtype and the tied head said at the top."""
    layout = layout_of(config)
    if layout.text_config is None:
        return config
    text = dict(layout.text_settings(config))
    for key in ("dtype", "tie_word_embeddings"):
        if key in config:
            text[key] = config[key]
    text["architectures"] = [layout.text_architecture]
    return text
