"""Placement over several devices, from the plan's sizes and simulated free memory; and a merge
dispatched over two devices (the CPU and accelerate's disk offload) against the same merge on one."""

import pytest
import torch

from benchmarks.multigpu import LLAMA3_70B_SHAPE, merge_plan, meta_model_info
from merger.build.assemble import assemble
from merger.errors import PlacementError
from merger.generate.generator import FastGenerator
from merger.plan import make_plan
from merger.plan.placement import DEPTH_RANGES, SHARED, WORKING_MIN_BYTES, place
from merger.recipe import passthrough
from ui.placement import placement_markdown, refusal_markdown

from refs import ANY_PATH

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21]])


def one_device_need(plan, **kwargs):
    return place(plan, dtype=plan.dtype, devices=[("big", 1 << 50)], **kwargs).shares[0]


def devices_holding(plan, fraction, n=2, **kwargs):
    """n devices, each with working memory plus `fraction` of the merge's weights and KV cache."""
    whole = one_device_need(plan, **kwargs)
    free = WORKING_MIN_BYTES + int(fraction * (whole.weight_bytes + whole.kv_bytes))
    return [(f"cuda:{i}", free) for i in range(n)]


def source_layer(plan, module):
    return plan.layer_sources[int(module.rsplit(".", 1)[1])]


def test_merge_that_fits_one_device_goes_to_the_freest_one_whole(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    placement = place(plan, dtype="float32", devices=[("cuda:0", 1 << 30), ("cuda:1", 2 << 30)])
    assert not placement.is_split and placement.devices == ("cuda:1",)
    assert placement.layers_per_device == {"cuda:1": 8} and placement.hops == 0 and placement.copies == 0
    assert set(placement.tensor_devices.values()) == {("cuda:1",)}


def test_split_keeps_every_repeated_layer_with_its_source_tensors(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)  # parent layers 2 and 3 run twice
    placement = place(plan, dtype="float32", devices=devices_holding(plan, 0.6))
    assert placement.strategy == SHARED and placement.devices == ("cuda:0", "cuda:1")
    assert placement.copies == 0 and placement.copy_bytes == 0
    assert all(len(devices) == 1 for devices in placement.tensor_devices.values())
    layer_device: dict = {}
    for module, device in placement.module_devices.items():
        if module.startswith("model.layers."):
            assert layer_device.setdefault(source_layer(plan, module), device) == device
    assert placement.module_devices["model.embed_tokens"] == "cuda:0"
    assert placement.module_devices["lm_head"] == "cuda:0"  # tied: stays with the embedding tensor
    assert placement.module_devices["model.norm"] == "cuda:1"
    # memory per device adds up to the one-device figures (working memory is per device)
    whole = one_device_need(plan)
    assert sum(s.weight_bytes for s in placement.shares) == whole.weight_bytes
    assert sum(s.kv_bytes for s in placement.shares) == whole.kv_bytes
    assert sum(placement.layers_per_device.values()) == 8
    assert all(s.fits for s in placement.shares)


def test_70b_self_merge_over_two_gpus_holds_half_the_parent_on_each():
    plan = merge_plan(meta_model_info("random:llama-3-70b", LLAMA3_70B_SHAPE))
    gpus = [(f"cuda:{i}", 139 * 2**30) for i in range(8)]
    placement = place(plan, dtype="bfloat16", devices=gpus)
    assert placement.devices == ("cuda:0", "cuda:1")  # the fewest that hold it
    first, second = placement.shares
    assert first.depth_ranges == [(0, 40), (70, 100)] and second.depth_ranges == [(40, 70), (100, 140)]
    parent = sum(m.nbytes for m in plan.primary.tensors.values())
    assert first.weight_bytes + second.weight_bytes == parent
    assert abs(first.weight_bytes - parent / 2) < 0.01 * parent
    assert placement.copies == 0 and placement.hops == 3  # GPU0 -> GPU1 -> GPU0 -> GPU1


def test_layer_repeated_past_one_device_is_split_and_its_copies_counted(tiny_llama):
    ref = str(tiny_llama)
    # parent layer 2 runs 10 times: with a long context its KV cache outgrows one device
    plan = make_plan(passthrough((ref, 0, 2), *[(ref, 2, 3)] * 10, (ref, 3, 6)), ANY_PATH)
    tokens = 4096
    placement = place(
        plan, dtype="float32", devices=devices_holding(plan, 0.58, context_tokens=tokens), context_tokens=tokens
    )
    assert placement.strategy == DEPTH_RANGES and placement.fits
    first, second = placement.shares
    assert first.depths == tuple(range(len(first.depths))) and second.depths[-1] == 14  # contiguous ranges
    layer2 = {key: devices for key, devices in placement.tensor_devices.items() if key[1].startswith("model.layers.2.")}
    assert layer2 and all(devices == ("cuda:0", "cuda:1") for devices in layer2.values())
    assert placement.copies == len(layer2) == 9
    layer2_bytes = sum(plan.models[ref].tensors[name].nbytes for _, name in layer2)
    assert second.copy_bytes == placement.copy_bytes == layer2_bytes and first.copy_bytes == 0
    unique = one_device_need(plan, context_tokens=tokens).weight_bytes
    assert sum(s.weight_bytes for s in placement.shares) == unique + layer2_bytes
    assert "extra tensor copies" in placement_markdown(placement)


def test_merge_that_fits_no_devices_is_refused_with_the_numbers(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    with pytest.raises(PlacementError, match=r"needs about .* but the 2 devices have cuda:0 .* free; split over 2"):
        place(plan, dtype="float32", devices=devices_holding(plan, 0.2))
    with pytest.raises(PlacementError, match=r"needs about .* on cpu .* but only 1\.00 MiB is free"):
        place(plan, dtype="float32", devices=[("cpu", 2**20)])


def test_placement_markdown_names_layers_and_memory_per_device(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    split = placement_markdown(place(plan, dtype="float32", devices=devices_holding(plan, 0.6)))
    assert "| `cuda:0` | [0, 3) [4, 5) (4) |" in split and "4 device hops per token" in split
    one = placement_markdown(place(plan, dtype="float32", devices=[("cpu", 1 << 34)]))
    assert one.startswith("**Placement**: one device, `cpu`, all 8 layers")
    assert "\\<b\\>model\\</b\\> too big" in refusal_markdown("<b>model</b> too big")  # shown as text


def test_merge_dispatched_over_two_devices_equals_the_one_device_build(tiny_llama, tmp_path):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    sizes = devices_holding(plan, 0.6)
    # the CPU has no second device: the second simulated one is accelerate's disk offload
    placement = place(plan, dtype="float32", devices=[("cpu", sizes[0][1]), ("disk", sizes[1][1])])
    assert placement.is_split and set(placement.module_devices.values()) == {"cpu", "disk"}
    spread = assemble(plan, placement=placement, offload_dir=str(tmp_path))
    one = assemble(plan)
    assert {m: d for m, d in spread.hf_device_map.items() if m in placement.module_devices} == placement.module_devices
    cpu_layers = [d for d, s in enumerate(plan.layer_sources) if placement.module_devices[f"model.layers.{d}"] == "cpu"]
    twice = [(a, b) for a in cpu_layers for b in cpu_layers if a < b and plan.layer_sources[a] == plan.layer_sources[b]]
    assert twice  # a repeated layer on the CPU side still shares its tensors
    layers = spread.model.layers
    assert all(layers[a].mlp.up_proj.weight.data_ptr() == layers[b].mlp.up_proj.weight.data_ptr() for a, b in twice)
    # activations move once per mapped module, not again in each of its submodules
    assert hasattr(layers[0], "_hf_hook") and not hasattr(layers[0].mlp.up_proj, "_hf_hook")
    with torch.no_grad():
        assert torch.equal(spread(PROMPT).logits, one(PROMPT).logits)
        kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(spread.generate(PROMPT, **kwargs), one.generate(PROMPT, **kwargs))
    fast = [list(FastGenerator(m, context_tokens=40).generate(PROMPT, max_new_tokens=20)) for m in (spread, one)]
    assert fast[0] == fast[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_merge_dispatched_over_two_gpus_keeps_each_layers_cache_on_its_gpu(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    placement = place(plan, dtype="float32", devices=devices_holding(plan, 0.6))
    spread, one = assemble(plan, placement=placement), assemble(plan, device="cuda:0")
    fast = FastGenerator(spread, context_tokens=40, compile=False)
    tokens = list(fast.generate(PROMPT, max_new_tokens=20))
    assert tokens == list(FastGenerator(one, context_tokens=40, compile=False).generate(PROMPT, max_new_tokens=20))
    for depth, layer in enumerate(fast.cache.layers):
        assert layer.keys.device == torch.device(placement.module_devices[f"model.layers.{depth}"])
