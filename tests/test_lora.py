"""LoRA references (mergekit's `model+lora`): a PEFT safetensors adapter merged into the tensors it
changes, in any slice or blend, equal to mergekit 0.1.5 tensor for tensor; counted in the preview;
read from local folders (under the web policy, both halves) and from the Hub; refused with one
sentence wherever it would not merge as PEFT merges it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.build.assemble import assemble, parameter_bytes
from merger.build.export import export_plan
from merger.build.slim import slim_model
from merger.errors import ModelRefError, UnsafeCheckpointError
from merger.plan import make_plan
from merger.plan.counts import count
from merger.recipe import Recipe, passthrough
from merger.recipe.mergekit_yaml import recipe_from_dict
from merger.sources.catalog import LocalPolicy, resolve

from hubserver import add_sharded_lazy_model, llama3_8b_config, llama3_8b_tensors
from mergekit_runner import run_mergekit, tensors_of
from refs import ANY_PATH

LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight")


def recipes(base: str, adapter: str, ft: str, base16: str, adapter16: str) -> dict[str, Recipe]:
    """The reference in a spliced slice, in float32 and rounded to bf16, with every kind of
    scaling on a bf16 parent, and as a model of a whole-model blend."""
    lora = f"{base}+{adapter}"
    splice = passthrough((lora, 0, 4), (base, 2, 6))
    return {
        "splice": splice,
        "splice_bf16": passthrough((lora, 0, 4), (base, 2, 6), dtype="bfloat16"),
        "rslora_patterns_embeddings_bf16": passthrough(
            (f"{base16}+{adapter16}", 0, 6), (f"{base16}+{adapter16}", 3, 6)
        ),
        "task_arithmetic_blend": recipe_from_dict(
            {
                "models": [
                    {"model": lora, "parameters": {"weight": 0.7}},
                    {"model": ft, "parameters": {"weight": 0.5}},
                ],
                "merge_method": "task_arithmetic",
                "base_model": base,
            }
        ),
    }


@pytest.fixture(scope="module")
def lora_recipes(tiny_llama, tiny_llama_lora, tiny_llama_ft1, tiny_llama_bf16, tiny_llama_bf16_lora):
    return recipes(*map(str, (tiny_llama, tiny_llama_lora, tiny_llama_ft1, tiny_llama_bf16, tiny_llama_bf16_lora)))


@pytest.fixture(scope="module")
def mergekit_outputs(lora_recipes, tmp_path_factory):
    return run_mergekit({name: r.to_mergekit() for name, r in lora_recipes.items()}, tmp_path_factory.mktemp("mk"))


@pytest.mark.parametrize("name", ["splice", "splice_bf16", "rslora_patterns_embeddings_bf16", "task_arithmetic_blend"])
def test_lora_reference_exports_equal_to_mergekit(name, lora_recipes, mergekit_outputs, tmp_path):
    folder, error = mergekit_outputs[name]
    assert error is None, error
    ours = tensors_of(export_plan(make_plan(lora_recipes[name], ANY_PATH), tmp_path / "ours").path)
    theirs = tensors_of(folder)
    assert sorted(ours) == sorted(theirs)
    for tensor_name, tensor in theirs.items():
        assert ours[tensor_name].dtype == tensor.dtype, tensor_name
        assert torch.equal(ours[tensor_name], tensor), tensor_name


def test_the_adapter_changes_exactly_the_tensors_it_targets(tiny_llama, tiny_llama_lora, tmp_path):
    plan = make_plan(passthrough((f"{tiny_llama}+{tiny_llama_lora}", 0, 6)), ANY_PATH)
    ours = tensors_of(export_plan(plan, tmp_path / "out").path)
    base = load_file(tiny_llama / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], ours[name])}
    assert changed == {f"model.layers.{i}.{suffix}" for i in range(6) for suffix in LAYER_TENSORS}


def test_a_built_lora_merge_chats_as_its_export_loaded_by_transformers(tiny_llama, tiny_llama_lora, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = make_plan(passthrough((f"{tiny_llama}+{tiny_llama_lora}", 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH)
    built = assemble(plan)
    assert parameter_bytes(built) == count(plan).memory_bytes  # unchanged tensors shared with the plain model's
    exported = AutoModelForCausalLM.from_pretrained(export_plan(plan, tmp_path / "out").path).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, exported(ids).logits)
        greedy = dict(max_new_tokens=12, do_sample=False)
        assert torch.equal(built.generate(ids, **greedy), exported.generate(ids, **greedy))


def test_a_full_range_lora_build_equals_peft_merge_and_unload(tiny_llama, tiny_llama_lora):
    """The reference is PEFT itself, on a separately loaded base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama_lora)
    reference = reference.merge_and_unload().eval()
    built = assemble(make_plan(passthrough((f"{tiny_llama}+{tiny_llama_lora}", 0, 6)), ANY_PATH))
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reference(ids).logits)


def test_preview_counts_the_tensors_the_adapter_changes(tiny_llama, tiny_llama_lora):
    lora = f"{tiny_llama}+{tiny_llama_lora}"
    plain = count(make_plan(passthrough((str(tiny_llama), 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH))
    counts = count(make_plan(passthrough((lora, 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH))
    per_layer = 64 * 64 + 32 * 64 + 64 * 128  # q_proj, v_proj, down_proj of the tiny llama
    assert counts.total_params == plain.total_params
    assert counts.lora_bytes == 4 * per_layer * 4  # layers 0-3 from the adapted model, float32
    # layers 2-3 come from both the adapted and the plain model: only the tensors the adapter
    # changes are held twice; the rest are the plain model's own
    assert counts.memory_bytes == plain.memory_bytes + 2 * per_layer * 4
    parent = plain.parent_params[str(tiny_llama)]
    assert counts.parent_params == {lora: parent, str(tiny_llama): parent}


def lora_adapter_for_llama3_8b() -> dict[str, tuple[list[int], str]]:
    """A rank-16 adapter on every attention projection of Meta-Llama-3-8B, as PEFT names it."""
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
    tensors = {}
    for i in range(32):
        for module, (rows, cols) in shapes.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ([16, cols], "BF16")
            tensors[f"{prefix}.lora_B.weight"] = ([rows, 16], "BF16")
    return tensors


def test_a_hub_adapter_on_a_real_size_model_is_counted_without_any_weight_bytes(hub):
    add_sharded_lazy_model(hub, "meta-llama/Meta-Llama-3-8B", llama3_8b_config(), llama3_8b_tensors())
    config = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    hub.add_file("someone/llama3-lora", "adapter_config.json", json.dumps(config).encode())
    hub.add_lazy_safetensors("someone/llama3-lora", "adapter_model.safetensors", lora_adapter_for_llama3_8b())
    counts = count(make_plan(passthrough(("meta-llama/Meta-Llama-3-8B+someone/llama3-lora", 0, 32)), ANY_PATH))
    assert counts.total_params == 8_030_261_248
    assert counts.lora_bytes == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096) * 2
    assert sum(hub.weight_bytes_served.values()) == 0


def test_a_hub_adapter_builds_equal_to_the_same_adapter_read_locally(hub, tiny_llama, tiny_llama_lora):
    for repo, folder in (("org/tiny", tiny_llama), ("org/tiny-lora", tiny_llama_lora)):
        for f in folder.iterdir():
            hub.add_file(repo, f.name, f.read_bytes())
    hub_plan = make_plan(passthrough(("org/tiny+org/tiny-lora", 0, 4), ("org/tiny", 2, 6)), ANY_PATH)
    local_plan = make_plan(passthrough((f"{tiny_llama}+{tiny_llama_lora}", 0, 4), (str(tiny_llama), 2, 6)), ANY_PATH)
    assert hub_plan.models["org/tiny+org/tiny-lora"].adapter.local_dir is None  # metadata only so far
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(assemble(hub_plan)(ids).logits, assemble(local_plan)(ids).logits)


def test_the_web_policy_applies_to_both_halves(tiny_llama, tiny_llama_lora, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    shutil.copytree(tiny_llama, root / "model")
    policy = LocalPolicy(allow_any_path=False, roots=(root.resolve(),))
    with pytest.raises(ModelRefError, match="absolute paths are not allowed"):
        resolve(f"model+{tiny_llama_lora}", policy)
    with pytest.raises(ModelRefError, match="absolute paths are not allowed"):
        resolve(f"{tiny_llama}+model", policy)
    (root / "escape").symlink_to(tiny_llama_lora)
    with pytest.raises(ModelRefError, match="leads outside the allowed folders"):
        resolve("model+escape", policy)
    shutil.copytree(tiny_llama_lora, root / "adapter")
    assert resolve("model+adapter", policy).adapter.deltas


def adapter_copy(adapter: Path, path: Path, **config_changes) -> Path:
    shutil.copytree(adapter, path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return path


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"use_dora": True}, "uses DoRA, which this app does not merge"),
        ({"bias": "all"}, "trains biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ".*proj"}, "target_modules is a regular expression"),
        ({"target_modules": ["q_proj", "v_proj"]}, "down_proj, which its adapter_config.json does not target"),
        ({"layers_to_transform": [0, 1]}, r"layers\.2\.\S+, which its adapter_config.json does not target"),
        ({"r": 8}, "not the rank 8 its adapter_config.json gives"),
        ({"r": "4"}, "r in its adapter_config.json is not a whole number above 0"),
        ({"rank_pattern": {"(q|v)_proj": 2}}, "rank_pattern has a regular expression"),
        ({"peft_type": "IA3"}, "is not a LoRA adapter"),
    ],
)
def test_adapters_that_would_not_merge_as_peft_merges_them_are_refused(
    changes, refusal, tiny_llama, tiny_llama_lora, tmp_path
):
    adapter = adapter_copy(tiny_llama_lora, tmp_path / "adapter", **changes)
    with pytest.raises(ModelRefError, match=refusal):
        ANY_PATH(f"{tiny_llama}+{adapter}")


def handmade_adapter(path: Path, module: str, *, rows: int, cols: int) -> Path:
    """A one-module rank-4 adapter written by hand (for shapes PEFT would not make for the base)."""
    from safetensors.torch import save_file

    path.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": [module.split(".")[-1]]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    prefix = f"base_model.model.{module}"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(4, cols), f"{prefix}.lora_B.weight": torch.zeros(rows, 4)}
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_pickled_adapters_and_malformed_references_are_refused(tiny_llama, tiny_llama_lora, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(tiny_llama_lora / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeCheckpointError, match="only has pickled weights"):
        ANY_PATH(f"{tiny_llama}+{pickled}")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copyfile(tiny_llama_lora / "adapter_model.safetensors", broken / "adapter_model.safetensors")
    (broken / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(ModelRefError, match=r"adapter_config.json of .* is not valid JSON"):
        ANY_PATH(f"{tiny_llama}+{broken}")
    narrow = handmade_adapter(tmp_path / "narrow", "model.layers.0.self_attn.q_proj", rows=64, cols=32)
    with pytest.raises(ModelRefError, match=r"by a \[64, 32\] product, .* the adapter was trained on another model"):
        ANY_PATH(f"{tiny_llama}+{narrow}")
    fused = handmade_adapter(tmp_path / "fused", "model.layers.0.self_attn.qkv_proj", rows=64, cols=64)
    with pytest.raises(
        ModelRefError, match=r"changes model.layers.0.self_attn.qkv_proj.weight, which .* does not have"
    ):
        ANY_PATH(f"{tiny_llama}+{fused}")
    with pytest.raises(ModelRefError, match="more than one"):
        ANY_PATH(f"{tiny_llama}+{tiny_llama_lora}+{tiny_llama_lora}")
    with pytest.raises(ModelRefError, match="is a model, not a LoRA adapter"):
        ANY_PATH(f"{tiny_llama}+bundled:smollm2-135m-instruct")


def test_slim_refuses_a_lora_reference(tiny_llama, tiny_llama_lora, tmp_path):
    with pytest.raises(ModelRefError, match="names a LoRA adapter"):
        slim_model(f"{tiny_llama}+{tiny_llama_lora}", tmp_path / "out", resolver=ANY_PATH)


def test_the_page_previews_a_lora_reference_from_allowed_folders_and_refuses_one_from_elsewhere(
    tiny_llama, tiny_llama_lora, monkeypatch
):
    import gradio as gr

    import app
    import ui.models

    roots = (tiny_llama.parent.resolve(), tiny_llama_lora.parent.resolve())
    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=roots))
    ui.models.public_info.cache_clear()
    try:
        lora = f"{tiny_llama.name}+{tiny_llama_lora.name}"
        counts = app.preview(passthrough((lora, 0, 4), (tiny_llama.name, 2, 6)).to_yaml())
        assert counts["lora_bytes"] == 4 * (64 * 64 + 32 * 64 + 64 * 128) * 4
        assert "tensors with a LoRA merged in" in app.preview_markdown(counts)
        with pytest.raises(gr.Error, match="absolute paths are not allowed"):
            app.preview(passthrough((f"{tiny_llama.name}+{tiny_llama_lora}", 0, 4)).to_yaml())
    finally:
        ui.models.public_info.cache_clear()
