"""A text tower inside a multimodal checkpoint (Gemma 3 4B and up, Mistral 3): spliced under the
checkpoint's own names with the vision tower and projector carried along untouched, built and
chatted as the text model alone, exported whole (loads as the multimodal model) or as the text
model only, as the user chooses; equal to mergekit 0.1.5 running the exported recipe (in its
`modules:` form, which it needs for a multimodal model's slices); the exact count of the real
models from their Hub metadata alone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from merger.__main__ import main
from merger.build.assemble import assemble, parameter_bytes
from merger.build.export import export_plan
from merger.plan import make_plan, text_model_plan
from merger.plan.counts import count
from merger.recipe import passthrough

from hubserver import add_sharded_lazy_model
from mergekit_runner import run_mergekit, tensors_of
from refs import ANY_PATH
from tiny import make_tiny_multimodal

FAMILIES = ("gemma3", "mistral3")
SPLICE = ((0, 4), (2, 6))
ORDER = [i for a, b in SPLICE for i in range(a, b)]
PROMPT = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]  # longer than Gemma's sliding window of 4
TEXT = "language_model."


@pytest.fixture(scope="module")
def multimodal_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    return {family: make_tiny_multimodal(root / family, family) for family in FAMILIES}


def splice_plan(path: Path, ranges=SPLICE):
    return make_plan(passthrough(*[(str(path), a, b) for a, b in ranges]), ANY_PATH)


def deep_copied_splice(path: Path):
    """The whole multimodal parent as transformers loads it, its text tower's layers deep-copied
    into recipe order with their per-layer attention kinds: built without the plan."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tower = model.model.language_model
    layers = [copy.deepcopy(tower.layers[i]) for i in ORDER]
    for depth, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = depth
    tower.layers = torch.nn.ModuleList(layers)
    text = model.config.text_config
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in ORDER]
    text.num_hidden_layers = len(ORDER)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_tower_splice_builds_and_chats_as_the_multimodal_parent_deep_copied(family, multimodal_models):
    plan = splice_plan(multimodal_models[family])
    built, reference = assemble(plan), deep_copied_splice(multimodal_models[family])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reference(input_ids=ids).logits)
        greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(built.generate(ids, **greedy), reference.generate(input_ids=ids, **greedy))
    # the build holds the text tower alone (repeated layers shared), as the preview counts it
    assert parameter_bytes(built) == count(plan).memory_bytes < count(plan).bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_export_keeps_the_vision_tower_untouched_or_leaves_it_out(family, multimodal_models, tmp_path):
    parent = multimodal_models[family]
    plan = splice_plan(parent)
    whole = export_plan(plan, tmp_path / "whole").path
    stored, exported = load_file(parent / "model.safetensors"), tensors_of(whole)
    outside_text = {n for n in stored if not n.startswith(TEXT)}
    assert outside_text and {n for n in exported if not n.startswith(TEXT)} == outside_text
    for name in outside_text:
        assert torch.equal(exported[name], stored[name]), name
    config = json.loads((whole / "config.json").read_text())
    assert (
        config["text_config"]["num_hidden_layers"] == 8
        and config["architectures"] == plan.primary.config["architectures"]
    )
    text_only = tmp_path / "text"
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(plan.recipe.to_yaml())
    assert main(["build", str(recipe), str(text_only), "--text-only"]) == 0
    assert not any(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in tensors_of(text_only))
    built = assemble(plan)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = built(ids).logits
        assert torch.equal(AutoModelForImageTextToText.from_pretrained(whole).eval()(input_ids=ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(text_only).eval()(ids).logits, expected)


def test_gemma3_sliding_layers_are_restated_in_the_text_config(multimodal_models):
    config = splice_plan(multimodal_models["gemma3"]).config
    sliding, full = "sliding_attention", "full_attention"
    assert config["text_config"]["layer_types"] == [sliding] * 7 + [full]  # parent: 5 sliding, then 1 full
    assert text_model_plan(splice_plan(multimodal_models["gemma3"])).config["architectures"] == ["Gemma3ForCausalLM"]


@pytest.fixture(scope="module")
def exports_and_mergekit(multimodal_models, tmp_path_factory):
    """Our export of the splice of each family, and mergekit's run of the mergekit_config.yml it
    holds (mergekit's `modules:` form, which it needs for a multimodal model's slices)."""
    root = tmp_path_factory.mktemp("mk")
    ours = {
        family: export_plan(splice_plan(path), root / f"ours-{family}").path
        for family, path in multimodal_models.items()
    }
    configs = {family: yaml.safe_load((folder / "mergekit_config.yml").read_text()) for family, folder in ours.items()}
    return ours, run_mergekit(configs, root)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_tower_splice_exports_equal_to_mergekit_running_the_exported_recipe(family, exports_and_mergekit):
    ours_folder, (folder, error) = exports_and_mergekit[0][family], exports_and_mergekit[1][family]
    assert error is None, error
    ours, theirs = tensors_of(ours_folder), tensors_of(folder)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    if family == "gemma3":  # mergekit leaves the parent's 6 layer_types beside 8 layers; ours follow the recipe
        theirs_types = json.loads((folder / "config.json").read_text())["text_config"]["layer_types"]
        ours_types = json.loads((ours_folder / "config.json").read_text())["text_config"]["layer_types"]
        assert len(theirs_types) == 6 and len(ours_types) == 8


# --- real sizes from the Hub's metadata alone ----------------------------------------------------


def shapes(prefix: str, entries: dict[str, list[int]]) -> dict[str, tuple[list[int], str]]:
    return {prefix + name: (shape, "BF16") for name, shape in entries.items()}


def gemma3_4b() -> tuple[dict, dict]:
    """google/gemma-3-4b-it: a 34-layer Gemma 3 text tower, a 27-layer SigLIP vision tower."""
    hidden, inter, vocab, head, vision, vision_inter = 2560, 10240, 262208, 256, 1152, 4304
    text_config = dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=head, sliding_window=1024,
                       vocab_size=vocab)  # fmt: skip
    config = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", text_config=text_config,
                  vision_config=dict(model_type="siglip_vision_model", hidden_size=vision, num_hidden_layers=27),
                  mm_tokens_per_image=256, torch_dtype="bfloat16")  # fmt: skip
    tensors = shapes("language_model.model.", {"embed_tokens.weight": [vocab, hidden]})
    for i in range(34):
        tensors |= shapes(f"language_model.model.layers.{i}.", {
            "self_attn.q_proj.weight": [8 * head, hidden], "self_attn.k_proj.weight": [4 * head, hidden],
            "self_attn.v_proj.weight": [4 * head, hidden], "self_attn.o_proj.weight": [hidden, 8 * head],
            "self_attn.q_norm.weight": [head], "self_attn.k_norm.weight": [head],
            "mlp.gate_proj.weight": [inter, hidden], "mlp.up_proj.weight": [inter, hidden],
            "mlp.down_proj.weight": [hidden, inter], "input_layernorm.weight": [hidden],
            "post_attention_layernorm.weight": [hidden], "pre_feedforward_layernorm.weight": [hidden],
            "post_feedforward_layernorm.weight": [hidden],
        })  # fmt: skip
    tensors |= shapes("language_model.model.", {"norm.weight": [hidden]})
    tensors |= shapes("vision_tower.vision_model.", {
        "embeddings.patch_embedding.weight": [vision, 3, 14, 14], "embeddings.patch_embedding.bias": [vision],
        "embeddings.position_embedding.weight": [4096, vision], "post_layernorm.weight": [vision],
        "post_layernorm.bias": [vision],
    })  # fmt: skip
    for i in range(27):
        layer = {f"self_attn.{p}_proj.{k}": [vision, vision] if k == "weight" else [vision]
                 for p in ("q", "k", "v", "out") for k in ("weight", "bias")}  # fmt: skip
        layer |= {f"layer_norm{n}.{k}": [vision] for n in (1, 2) for k in ("weight", "bias")}
        layer |= {"mlp.fc1.weight": [vision_inter, vision], "mlp.fc1.bias": [vision_inter],
                  "mlp.fc2.weight": [vision, vision_inter], "mlp.fc2.bias": [vision]}  # fmt: skip
        tensors |= shapes(f"vision_tower.vision_model.encoder.layers.{i}.", layer)
    tensors |= shapes("multi_modal_projector.", {"mm_input_projection_weight": [vision, hidden],
                                                 "mm_soft_emb_norm.weight": [vision]})  # fmt: skip
    return config, tensors


def mistral_small_31() -> tuple[dict, dict]:
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: a 40-layer Mistral text tower with an untied
    head, a 24-layer Pixtral vision tower."""
    hidden, inter, vocab, vision, vision_inter = 5120, 32768, 131072, 1024, 4096
    text_config = dict(model_type="mistral", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=40,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=vocab)  # fmt: skip
    config = dict(architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3", text_config=text_config,
                  vision_config=dict(model_type="pixtral", hidden_size=vision, num_hidden_layers=24),
                  tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
    tensors = shapes("language_model.model.", {"embed_tokens.weight": [vocab, hidden]})
    for i in range(40):
        tensors |= shapes(f"language_model.model.layers.{i}.", {
            "self_attn.q_proj.weight": [4096, hidden], "self_attn.k_proj.weight": [1024, hidden],
            "self_attn.v_proj.weight": [1024, hidden], "self_attn.o_proj.weight": [hidden, 4096],
            "mlp.gate_proj.weight": [inter, hidden], "mlp.up_proj.weight": [inter, hidden],
            "mlp.down_proj.weight": [hidden, inter], "input_layernorm.weight": [hidden],
            "post_attention_layernorm.weight": [hidden],
        })  # fmt: skip
    tensors |= shapes("language_model.", {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]})
    tensors |= shapes("vision_tower.", {"patch_conv.weight": [vision, 3, 14, 14], "ln_pre.weight": [vision]})
    for i in range(24):
        tensors |= shapes(f"vision_tower.transformer.layers.{i}.", {
            **{f"attention.{p}_proj.weight": [vision, vision] for p in "qkvo"},
            "attention_norm.weight": [vision], "ffn_norm.weight": [vision],
            "feed_forward.gate_proj.weight": [vision_inter, vision],
            "feed_forward.up_proj.weight": [vision_inter, vision],
            "feed_forward.down_proj.weight": [vision, vision_inter],
        })  # fmt: skip
    tensors |= shapes("multi_modal_projector.", {
        "norm.weight": [vision], "patch_merger.merging_layer.weight": [vision, 4 * vision],
        "linear_1.weight": [hidden, vision], "linear_2.weight": [hidden, hidden],
    })  # fmt: skip
    return config, tensors


# (repo, model, its published parameter count, one text layer's, the vision tower and projector's)
REAL_SIZES = [
    ("google/gemma-3-4b-it", gemma3_4b, 4_300_079_472, 94_382_592, 419_816_304),
    ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", mistral_small_31, 24_011_361_280, 555_755_520, 438_958_080),
]


@pytest.mark.parametrize(("repo", "model", "total", "per_layer", "outside_text"), REAL_SIZES)
def test_real_size_multimodal_counts_from_hub_metadata_alone(repo, model, total, per_layer, outside_text, hub):
    config, tensors = model()
    add_sharded_lazy_model(hub, repo, config, tensors)
    layers = config["text_config"]["num_hidden_layers"]
    whole = count(make_plan(passthrough((repo, 0, layers)), ANY_PATH))
    assert whole.total_params == total
    merge = count(make_plan(passthrough((repo, 0, layers - 8), (repo, 8, layers)), ANY_PATH))
    assert merge.num_layers == 2 * layers - 16
    assert merge.total_params == total + (layers - 16) * per_layer
    assert merge.memory_bytes == 2 * (total - outside_text)  # the build holds the text tower alone
    assert sum(hub.weight_bytes_served.values()) == 0


def test_the_page_exports_the_text_model_alone_when_asked(multimodal_models, monkeypatch):
    import zipfile

    import app
    import ui.models
    from merger.sources.catalog import LocalPolicy

    parent = multimodal_models["gemma3"]
    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=(parent.parent.resolve(),)))
    ui.models.public_info.cache_clear()
    recipe = passthrough((parent.name, 0, 4), (parent.name, 2, 6)).to_yaml()
    try:
        for text_only, architecture in ((False, "Gemma3ForConditionalGeneration"), (True, "Gemma3ForCausalLM")):
            _, archive = app.export_merge(recipe, "", "", False, "", text_only, progress=lambda *a, **k: None)
            with zipfile.ZipFile(archive) as z:
                config = json.loads(z.read("config.json"))
            assert config["architectures"] == [architecture]
    finally:
        ui.models.public_info.cache_clear()


def test_a_text_tower_merge_rebuilt_from_its_parent_in_memory_equals_its_build(multimodal_models):
    """The Lens's seam scores and sweeps build merges from the parents' tensors in memory."""
    from test_families import assert_rebuilt_from_memory_as_built

    assert_rebuilt_from_memory_as_built(splice_plan(multimodal_models["gemma3"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pages_fast_decoding_replies_as_generate_on_a_text_tower(family, multimodal_models):
    from test_fastgen import assert_greedy_follows_generate

    assert_greedy_follows_generate(assemble(splice_plan(multimodal_models[family])), PROMPT, new_tokens=24, fuse=False)
