"""Tiny random models for fast tests: real architectures (llama, gemma3_text, qwen2, qwen3, mixtral,
qwen3_moe, phi3), a few MB each, with a small byte-level BPE tokenizer trained on the spot (ChatML
template for the instruct kind)."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# LLaMA-Pro block expansion's `scale` on a passed-through layer: its output projections at 0, so
# an added copy of a layer starts as the identity
IDENTITY_START = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Frankenmerges stack layers of transformer models.",
    "Hello! How are you today? I am fine, thank you.",
] * 20


def tiny_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>" if chat else "</s>"
    )
    if chat:
        fast.chat_template = CHATML
    return fast


def tiny_decoder(layers: int) -> dict:
    """The shape of every tiny model's text decoder."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )


def tiny_model(arch: str = "llama", layers: int = 6, seed: int = 0, **config):
    """A random model of `arch` with `layers` decoder layers (float32, tied embeddings), in memory;
    `config` adds to or overrides the shared settings (vocabulary size, special token ids)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = {**tiny_decoder(layers), "vocab_size": 320, "tie_word_embeddings": True, **config}
    if arch == "llama":
        settings = LlamaConfig(**common)
    elif arch == "gemma3":
        # a 6-layer pattern like the real model's (5 sliding, 1 full) and a small window,
        # so seams off the pattern change masks and RoPE
        settings = Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=16)
    elif arch in ("qwen2", "qwen3"):
        # sliding attention from layer 3 on (as max_window_layers puts it) with a small window, so
        # a seam that moves layers across that line changes their masks
        kind = Qwen2Config if arch == "qwen2" else Qwen3Config
        settings = kind(**common, use_sliding_window=True, sliding_window=4, max_window_layers=layers // 2)
    elif arch == "mixtral":
        settings = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        settings = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    elif arch == "phi3":  # q/k/v in one qkv_proj, gate and up in one gate_up_proj
        settings = Phi3Config(**common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(settings)
    with torch.no_grad():  # random init gives near-zero norms; spread them so layers matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_tiny(path: Path, arch: str = "llama", layers: int = 6, seed: int = 0, chat: bool = True, **config) -> Path:
    """Save a random model of `arch` with `layers` decoder layers (float32, tied embeddings unless
    `config` says otherwise) to `path`."""
    tokenizer = tiny_tokenizer(chat)
    model = tiny_model(
        arch,
        layers,
        seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **config,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_finetune(base: Path, path: Path, *, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tune" of `base`: every tensor shifted by a low-rank update plus sparse larger
    changes and small noise (what fine-tuning leaves), so task vectors have structure, signs
    that disagree between two fine-tunes, and magnitudes that TIES's pruning must sort."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.suffix != ".safetensors":
            shutil.copyfile(item, path / item.name)
    for shard in base.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            noise = torch.randn(tensor.shape, generator=gen) * scale * 0.1
            if tensor.dim() == 2:
                rank = 2
                u = torch.randn(tensor.shape[0], rank, generator=gen)
                v = torch.randn(rank, tensor.shape[1], generator=gen)
                noise += scale * (u @ v) / rank
            sparse = (torch.rand(tensor.shape, generator=gen) < 0.05) * torch.randn(tensor.shape, generator=gen)
            tensors[name] = (tensor + noise + scale * 3 * sparse).to(tensor.dtype).contiguous()
        save_file(tensors, path / shard.name, metadata={"format": "pt"})
    return path


def make_vocab_variant(base: Path, path: Path, *, added_tokens: tuple[str, ...] = (), extra_rows: int = 0) -> Path:
    """A copy of `base` whose tokenizer gains `added_tokens`, each with a new embedding row (as a
    fine-tune that adds chat tokens does), and whose embeddings have `extra_rows` more rows than
    its tokenizer has tokens (padding, as Qwen2's do); vocab_size counts the rows."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(base, path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(list(added_tokens))
    tokenizer.save_pretrained(path)
    tensors = load_file(base / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    rows = len(tokenizer) + extra_rows
    new = torch.randn(rows - embed.shape[0], embed.shape[1], generator=torch.Generator().manual_seed(7)) * 0.05
    tensors["model.embed_tokens.weight"] = torch.cat([embed, new])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return path


def make_lora(base: Path, path: Path, *, seed: int, dtype: str | None = None, **lora_config) -> Path:
    """A PEFT LoRA adapter for `base`, saved as PEFT saves one (adapter_config.json,
    adapter_model.safetensors). Both matrices random (PEFT starts B at zero, as if untrained), so
    the adapter changes every tensor it targets; `dtype` loads the base (and so the adapter) in it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype) if dtype else None)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_config))
    with torch.no_grad():  # PEFT's random A and B make deltas far larger than the weights: a fine-tune's are small
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(path)
    return path


def with_dtype(base: Path, path: Path, dtype: str) -> Path:
    """A copy of `base` with its weights (and config) in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def make_tiny_multimodal(path: Path, family: str, layers: int = 6, seed: int = 0) -> Path:
    """A random multimodal model (`gemma3`: Gemma 3 4B's kind, a SigLIP tower; `mistral3`: Mistral
    3's, a Pixtral tower) whose text tower is `layers` decoder layers like tiny_model's, under the
    Hub's names (language_model.model.layers.N.*, and Gemma 3's vision_tower.vision_model.*, which
    transformers 5 reads but writes as vision_tower.*)."""
    import torch
    from transformers import AutoModelForImageTextToText, Gemma3Config, Mistral3Config

    tokenizer = tiny_tokenizer(chat=True)
    text = dict(
        **tiny_decoder(layers),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28)
    if family == "gemma3":
        settings = Gemma3Config(
            text_config=dict(**text, sliding_window=4, query_pre_attn_scalar=16),
            vision_config=dict(**vision, patch_size=14, vision_use_head=False),  # as Gemma 3's SigLIP
            mm_tokens_per_image=4,
        )
    elif family == "mistral3":  # an untied head, as Mistral Small 3.1 has
        settings = Mistral3Config(
            text_config=dict(**text, model_type="mistral"),
            vision_config=dict(**vision, patch_size=14, head_dim=16),
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(settings)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if family == "gemma3":
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        hub_name = {n: n.replace("vision_tower.", "vision_tower.vision_model.", 1) for n in tensors}
        save_file({hub_name[n]: t for n, t in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return path
