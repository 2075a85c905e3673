"""The checkpoint layout and what we know of each model family, as data.

Every consumer (the plan, placement, assembly, export, slim, the decode path, chat) reads the
tensor naming and the per-family facts here, so a new architecture is an edit of this module
(and a tiny-model test), not a search through the stages.
"""

from __future__ import annotations

import re

# Tensor naming of a decoder-only causal LM checkpoint (Llama's, which Mistral, Qwen 2/3 and
# Gemma 3's text model share): embeddings, then model.layers.N.*, then the final norm and the head.
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")  # groups: depth, name inside the layer
EMBEDDINGS = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
HEAD_MODULE = "lm_head"  # with tied embeddings it reuses the embedding tensor
PRE_LAYER_PREFIXES = ("model.embed_tokens.",)  # what comes before the layers (the rest comes after)
VOCAB_TENSORS = (EMBEDDINGS, HEAD)  # vocabulary along axis 0


def layer_module(depth: int) -> str:
    """The module of decoder layer `depth` ("model.layers.3")."""
    return f"model.layers.{depth}"


def layer_tensor(depth: int, suffix: str) -> str:
    """A tensor of decoder layer `depth`, by its name inside the layer."""
    return f"{layer_module(depth)}.{suffix}"


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
