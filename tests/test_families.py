"""Model families beyond Llama and Gemma 3: Qwen2 and Qwen3 (sliding layers from
`max_window_layers`, or `layer_types`), Mixtral and Qwen3-MoE (experts inside layers), Phi-3
(fused qkv_proj and gate_up_proj). For each: a tiny random model whose splice builds and chats as
the parent's own layers deep-copied into recipe order, exports equal to mergekit 0.1.5 where
mergekit runs it (and loads back in transformers as the build), and the exact count of the real
model from its Hub metadata alone (hollow real-size checkpoints)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from merger.build.assemble import assemble, parameter_bytes
from merger.build.export import export_plan
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import passthrough

from hubserver import add_sharded_lazy_model
from mergekit_runner import run_mergekit, tensors_of
from refs import ANY_PATH
from tiny import make_tiny

FAMILIES = ("qwen2", "qwen2_legacy_config", "qwen3", "mixtral", "qwen3_moe", "phi3")
UNTIED = ("mixtral", "phi3")  # as the real models are
SPLICE = ((0, 4), (2, 6))  # layers 2-3 twice; layers 3+ slide in the Qwen models, so the seam crosses the line
ORDER = [i for a, b in SPLICE for i in range(a, b)]
PROMPT = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]  # longer than the sliding window of 4
# where the experts sit in the checkpoint (gate, up, down), for comparing with mergekit's stacked form
STORED_EXPERTS = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def tiny_family(root: Path, family: str) -> Path:
    arch = family.removesuffix("_legacy_config")
    path = make_tiny(root / family, arch, layers=6, tie_word_embeddings=arch not in UNTIED)
    if family.endswith("_legacy_config"):  # as configs written before transformers 5 are: no layer_types
        config = json.loads((path / "config.json").read_text())
        del config["layer_types"]
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: tiny_family(root, family) for family in FAMILIES}


def splice_plan(path: Path):
    return make_plan(passthrough(*[(str(path), a, b) for a, b in SPLICE]), ANY_PATH)


def deep_copied_splice(path: Path, order: list[int]):
    """The parent as transformers loads it, its decoder layers deep-copied into recipe order (each
    copy its own KV-cache slot), and its per-layer attention kinds taken along: built without
    the plan's config."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layers = [copy.deepcopy(model.model.layers[i]) for i in order]
    for depth, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = depth
    model.model.layers = torch.nn.ModuleList(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in order]
    model.config.num_hidden_layers = len(order)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_a_splice_builds_and_chats_as_the_parents_layers_deep_copied(family, family_models):
    plan = splice_plan(family_models[family])
    built, reference = assemble(plan), deep_copied_splice(family_models[family], ORDER)
    if getattr(reference.config, "layer_types", None):
        assert built.config.layer_types == reference.config.layer_types
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reference(ids).logits)
        greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(built.generate(ids, **greedy), reference.generate(ids, **greedy))
    assert parameter_bytes(built) == count(plan).memory_bytes  # repeated layers (experts too) stay shared


def test_qwen_sliding_layers_are_restated_in_recipe_order(family_models):
    config = splice_plan(family_models["qwen2_legacy_config"]).config
    full, sliding = "full_attention", "sliding_attention"
    assert config["layer_types"] == [full, full, full, sliding, full, sliding, sliding, sliding]
    assert config["max_window_layers"] == 3  # where sliding starts: layer 3 of the parent, at depth 3


QWEN = ("qwen2", "qwen2_legacy_config", "qwen3")
SAME_DEPTH = ((0, 4), (2, 4))  # a splice that keeps the parent's 6 layers


@pytest.fixture(scope="module")
def mergekit_outputs(family_models, tmp_path_factory):
    configs = {}
    for family in FAMILIES:
        path = str(family_models[family])
        configs[family] = passthrough(*[(path, a, b) for a, b in SPLICE]).to_mergekit()
        configs[f"{family}_same_depth"] = passthrough(*[(path, a, b) for a, b in SAME_DEPTH]).to_mergekit()
    return run_mergekit(configs, tmp_path_factory.mktemp("mk"))


def stacked_like_mergekit(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our export's per-expert tensors (the checkpoint's own layout) stacked as mergekit 0.1.5
    writes them (transformers 5's: gate rows then up rows per expert)."""
    if family not in STORED_EXPERTS:
        return tensors
    block, gate, up, down = STORED_EXPERTS[family]
    out = {n: t for n, t in tensors.items() if ".experts." not in n}
    out = {n.replace(f".{block}.gate.", ".mlp.gate."): t for n, t in out.items()}
    for depth in range(len(ORDER)):
        p = f"model.layers.{depth}.{block}.experts"
        experts = range(sum(1 for n in tensors if n.startswith(f"{p}.") and n.endswith(f".{down}.weight")))
        gate_up = [torch.cat([tensors[f"{p}.{e}.{gate}.weight"], tensors[f"{p}.{e}.{up}.weight"]]) for e in experts]
        out[f"model.layers.{depth}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"model.layers.{depth}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.{down}.weight"] for e in experts]
        )
    return out


def assert_equal_to_mergekit(exported: Path, mergekit: tuple[Path, str | None], family: str) -> None:
    folder, error = mergekit
    assert error is None, error
    ours, theirs = stacked_like_mergekit(tensors_of(exported), family), tensors_of(folder)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_a_splice_exports_equal_to_mergekit_where_mergekit_runs_it(family, family_models, mergekit_outputs, tmp_path):
    plan = splice_plan(family_models[family])
    exported = export_plan(plan, tmp_path / "ours").path
    if family in QWEN:
        # mergekit leaves the parent's 6 layer_types (transformers derives them from a config
        # without), and transformers refuses the config it then writes: the tensors are compared
        # on a splice that keeps the depth
        assert "must be equal to the number of `layer_types` (6)" in mergekit_outputs[family][1]
        same_depth = make_plan(passthrough(*[(str(family_models[family]), a, b) for a, b in SAME_DEPTH]), ANY_PATH)
        ours = export_plan(same_depth, tmp_path / "same-depth").path
        assert_equal_to_mergekit(ours, mergekit_outputs[f"{family}_same_depth"], family)
    else:
        assert_equal_to_mergekit(exported, mergekit_outputs[family], family)
    # the export (the checkpoint's own layout) loads in transformers as the model that was built
    loaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, assemble(plan)(ids).logits)


# --- real sizes from the Hub's metadata alone ----------------------------------------------------


def decoder_tensors(config: dict, layer: dict[str, list[int]], *, dtype: str = "BF16") -> dict:
    """Hub-style tensor names and shapes: embeddings, `layer` for every decoder layer, final norm,
    and an untied head."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    tensors = {"model.embed_tokens.weight": ([vocab, hidden], dtype)}
    for i in range(config["num_hidden_layers"]):
        tensors.update({f"model.layers.{i}.{name}": (shape, dtype) for name, shape in layer.items()})
    tensors["model.norm.weight"] = ([hidden], dtype)
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = ([vocab, hidden], dtype)
    return tensors


def attention(hidden: int, heads: int, kv_heads: int, head_dim: int, *, bias=False, qk_norm=False) -> dict:
    shapes = {
        "self_attn.q_proj.weight": [heads * head_dim, hidden],
        "self_attn.k_proj.weight": [kv_heads * head_dim, hidden],
        "self_attn.v_proj.weight": [kv_heads * head_dim, hidden],
        "self_attn.o_proj.weight": [hidden, heads * head_dim],
        "input_layernorm.weight": [hidden],
        "post_attention_layernorm.weight": [hidden],
    }
    if bias:
        shapes |= {
            f"self_attn.{p}_proj.bias": [n * head_dim] for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))
        }
    if qk_norm:
        shapes |= {"self_attn.q_norm.weight": [head_dim], "self_attn.k_norm.weight": [head_dim]}
    return shapes


def mlp(hidden: int, inter: int, prefix: str = "mlp") -> dict:
    return {
        f"{prefix}.gate_proj.weight": [inter, hidden],
        f"{prefix}.up_proj.weight": [inter, hidden],
        f"{prefix}.down_proj.weight": [hidden, inter],
    }


def experts(hidden: int, inter: int, n: int, block: str, names: tuple[str, str, str]) -> dict:
    gate, up, down = names
    shapes = {f"{block}.gate.weight": [n, hidden]}
    for e in range(n):
        shapes |= {
            f"{block}.experts.{e}.{gate}.weight": [inter, hidden],
            f"{block}.experts.{e}.{up}.weight": [inter, hidden],
            f"{block}.experts.{e}.{down}.weight": [hidden, inter],
        }
    return shapes


def real_model(family: str) -> tuple[dict, dict]:
    """(config.json, tensors) of a published model of the family, from its config."""
    if family == "Qwen/Qwen2.5-7B-Instruct":
        config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      max_window_layers=28, use_sliding_window=False, sliding_window=131072, tie_word_embeddings=False,
                      torch_dtype="bfloat16")  # fmt: skip
        layer = attention(3584, 28, 4, 128, bias=True) | mlp(3584, 18944)
    elif family == "Qwen/Qwen3-8B":
        config = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=151936, max_window_layers=36, use_sliding_window=False, tie_word_embeddings=False,
                      torch_dtype="bfloat16")  # fmt: skip
        layer = attention(4096, 32, 8, 128, qk_norm=True) | mlp(4096, 12288)
    elif family == "mistralai/Mixtral-8x7B-v0.1":
        config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
                      torch_dtype="bfloat16")  # fmt: skip
        layer = attention(4096, 32, 8, 128) | experts(4096, 14336, 8, "block_sparse_moe", ("w1", "w3", "w2"))
    elif family == "Qwen/Qwen3-30B-A3B":
        config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                      intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                      vocab_size=151936, tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
        layer = attention(2048, 32, 4, 128, qk_norm=True) | experts(
            2048, 768, 128, "mlp", ("gate_proj", "up_proj", "down_proj")
        )
    else:  # microsoft/Phi-3-mini-4k-instruct
        config = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                      tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
        layer = {
            "self_attn.qkv_proj.weight": [3 * 3072, 3072],
            "self_attn.o_proj.weight": [3072, 3072],
            "mlp.gate_up_proj.weight": [2 * 8192, 3072],
            "mlp.down_proj.weight": [3072, 8192],
            "input_layernorm.weight": [3072],
            "post_attention_layernorm.weight": [3072],
        }
    return config, decoder_tensors(config, layer)


# (repo, its parameter count, one decoder layer's): the totals are the published checkpoints'
# safetensors counts
REAL_SIZES = [
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512, 233_057_792),
    ("Qwen/Qwen3-8B", 8_190_735_360, 192_946_432),
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, 1_451_270_144),
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624, 623_120_640),
    ("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, 113_252_352),
]


@pytest.mark.parametrize(("repo", "total", "per_layer"), REAL_SIZES)
def test_real_size_counts_from_hub_metadata_alone(repo, total, per_layer, hub):
    config, tensors = real_model(repo)
    add_sharded_lazy_model(hub, repo, config, tensors)
    layers = config["num_hidden_layers"]
    assert count(make_plan(passthrough((repo, 0, layers)), ANY_PATH)).total_params == total
    merge = count(make_plan(passthrough((repo, 0, layers - 8), (repo, 8, layers)), ANY_PATH))
    assert merge.num_layers == layers + (layers - 16)
    assert merge.total_params == total + (layers - 16) * per_layer
    assert merge.memory_bytes == 2 * total  # bf16, every repeated layer shared
    assert sum(hub.weight_bytes_served.values()) == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_moe_merge_rebuilt_from_its_parent_in_memory_equals_its_build(family, family_models):
    """The Lens's seam scores and sweeps build merges from the parents' tensors in memory: a
    parent's stacked experts give back each expert's tensors."""
    assert_rebuilt_from_memory_as_built(splice_plan(family_models[family]))


def assert_rebuilt_from_memory_as_built(plan) -> None:
    from merger.lens.seams import assemble_from, load_parents

    from_memory = assemble_from(plan, load_parents(plan, device="cpu", dtype="float32"), "cpu")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(from_memory(ids).logits, assemble(plan)(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pages_fast_decoding_replies_as_generate(family, family_models):
    """The page's decode path (a static cache, the next token chosen on the device)."""
    from test_fastgen import assert_greedy_follows_generate

    assert_greedy_follows_generate(assemble(splice_plan(family_models[family])), PROMPT, new_tokens=24, fuse=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_moe_build_holds_its_experts_once_as_read(family, family_models):
    """The experts are read into transformers 5's stacked layout (not read, then stacked again):
    the built model's stacked tensors are the very memory the parent's experts were read into."""
    from merger.build.assemble import assemble_loaded, load_parent_tensors

    plan = splice_plan(family_models[family])
    parents = load_parent_tensors(plan, device="cpu", dtype=torch.float32)
    built = assemble_loaded(plan, parents, device="cpu", dtype=torch.float32)
    block, gate, _, down = STORED_EXPERTS[family]
    ref = str(family_models[family])
    for depth, layer in enumerate(ORDER):
        experts = built.model.layers[depth].mlp.experts
        read_gate = parents.by_source[(ref, f"model.layers.{layer}.{block}.experts.0.{gate}.weight", "cpu")]
        read_down = parents.by_source[(ref, f"model.layers.{layer}.{block}.experts.0.{down}.weight", "cpu")]
        assert experts.gate_up_proj.data_ptr() == read_gate.data_ptr()
        assert experts.down_proj.data_ptr() == read_down.data_ptr()
    assert parameter_bytes(built) == count(plan).memory_bytes


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_moe_checkpoint_with_its_experts_already_stacked_builds_too(family, family_models, mergekit_outputs):
    """mergekit 0.1.5 writes MoE merges in transformers 5's stacked layout: such a merge is a
    parent like any other."""
    folder, error = mergekit_outputs[family]
    assert error is None, error
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        theirs = assemble(make_plan(passthrough((str(folder), 0, len(ORDER))), ANY_PATH))(ids).logits
        assert torch.equal(theirs, assemble(splice_plan(family_models[family]))(ids).logits)
