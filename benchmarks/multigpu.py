"""A merge bigger than one GPU: Llama-3-70B's self-merge [0,70)+[10,80) (140 layers, about 122B
effective parameters) built with shared tensors over several GPUs and decoded at batch 1.

No disk: the parent's random bf16 tensors are made directly on the GPUs that merger.plan.placement
names for them (a tensor placed on two GPUs is made on each). The merge is then assembled by
assignment and spread with accelerate's `dispatch_model` (merger.build.assemble.assemble_loaded), exactly
as a build from files would be. Reported as JSON (rewritten after every stage, so a cut-off run keeps
what it measured): the placement, the build time once the parent is on the GPUs, memory per GPU
against the parent's share plus the KV cache, time to first token (512-token prompt) and tokens/s
at batch 1 against the bound: effective weight bytes one token reads / one GPU's measured copy
bandwidth, since a layer-split pipeline runs one GPU at a time. Decode paths, in order: merger's
FastGenerator eager (static cache on every layer's own device, no host sync per token), the same
with fused q/k/v and gate/up projections, FastGenerator compiled, `generate()` with a static cache.

    python benchmarks/multigpu.py [--budget-s 540] [--out DIR]   # every visible GPU (2, 4, 8, ...)
    python benchmarks/multigpu.py --plan-only [--devices 2]      # the 70B placement on simulated H200s
    python benchmarks/multigpu.py --tiny [--devices 3]           # the same stages on the CPU: a small
        # shape placed over simulated devices; the first runs on the CPU, the others from accelerate's
        # disk offload, and greedy tokens are compared with a one-device build
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generation import (
    LLAMA3_8B_SHAPE,
    SMOKE_SHAPE,
    Report,
    copy_bandwidth,
    fast_decode,
    sync,
    ttft_ms,
    weight_bytes_per_token,
)

from merger.build.assemble import LoadedTensors, assemble_loaded, parameter_bytes
from merger.dtypes import code_of
from merger.generate.fuse import fuse_projections
from merger.generate.generator import FastGenerator
from merger.plan import Plan, make_plan
from merger.plan.counts import count
from merger.plan.placement import Placement, place, storage_device
from merger.recipe import passthrough
from merger.sizes import human_bytes
from merger.sources.model_info import ModelInfo
from merger.sources.safetensors_files import TensorMeta

LLAMA3_70B_SHAPE = {
    **LLAMA3_8B_SHAPE,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
TINY_SHAPE = {**SMOKE_SHAPE, "num_hidden_layers": 80}
MERGE = ((0, 70), (10, 80))
H200_FREE_BYTES = 139 * 2**30  # what --plan-only assumes each simulated GPU has free
PARENT = "random:llama-3-70b"


@dataclasses.dataclass(frozen=True)
class Lengths:
    context: int = 4096  # the KV cache the placement plans and FastGenerator allocates
    prompt: int = 32  # decode-speed prompt
    ttft_prompt: int = 512
    decode: int = 128
    greedy: int = 32


TINY_LENGTHS = Lengths(context=128, prompt=8, ttft_prompt=32, decode=8, greedy=16)  # 140 CPU layers, some from disk


def meta_model_info(ref: str, shape: dict[str, Any], dtype: str = "bfloat16") -> ModelInfo:
    """A Llama model's metadata (config, tensor names and shapes) with no weights anywhere: the
    names and shapes come from the model class built on the meta device."""
    config = LlamaConfig(**shape, dtype=dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    tensors = {
        name: TensorMeta(tuple(t.shape), code_of(dtype))
        for name, t in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    return ModelInfo(ref=ref, config=config.to_dict(), tensors=tensors)


def merge_plan(info: ModelInfo) -> Plan:
    return make_plan(passthrough(*[(info.ref, a, b) for a, b in MERGE]), lambda ref: info)


def make_parent_tensors(plan: Plan, placement: Placement, dtype: torch.dtype) -> LoadedTensors:
    """Random parent tensors made on each device the placement names for them (norms: ones)."""
    made: dict[tuple[str, str, str], torch.Tensor] = {}
    for i, ((ref, name), devices) in enumerate(sorted(placement.tensor_devices.items())):
        meta = plan.models[ref].tensors[name]
        first = storage_device(devices[0])
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=dtype, device=first)
        else:
            gen = torch.Generator(device=first).manual_seed(i)
            tensor = torch.empty(meta.shape, dtype=dtype, device=first).normal_(0.0, 0.02, generator=gen)
        for device in devices:
            made[(ref, name, device)] = tensor.to(storage_device(device))
    return LoadedTensors(made)


def placement_summary(placement: Placement) -> dict[str, Any]:
    return {
        "strategy": placement.strategy,
        "devices": list(placement.devices),
        "hops_per_token": placement.hops,
        "copies": placement.copies,
        "context_tokens": placement.context_tokens,
        "per_device": {
            s.device: {
                "depth_ranges": s.depth_ranges,
                "layers": len(s.depths),
                "weights": human_bytes(s.weight_bytes),
                "copies": human_bytes(s.copy_bytes),
                "kv_cache": human_bytes(s.kv_bytes),
                "needed": human_bytes(s.needed_bytes),
                "free": human_bytes(s.free_bytes),
            }
            for s in placement.shares
        },
    }


def simulated_devices(plan: Plan, n: int, context: int) -> list[tuple[str, int]]:
    """n devices, each too small for 1/(n-1) of the merge, so the placement needs all n."""
    whole = place(plan, dtype=plan.dtype, devices=[("whole", 1 << 60)], context_tokens=context).shares[0]
    per_device = whole.working_bytes + int((whole.weight_bytes + whole.kv_bytes) * 1.2 / n)
    return [(f"sim:{i}", per_device) for i in range(n)]


def on_cpu(placement: Placement) -> Placement:
    """The placement run on this machine: its first device on the CPU, the others from accelerate's
    disk offload (the only second device the CPU has)."""
    real = {d: "cpu" if i == 0 else "disk" for i, d in enumerate(placement.devices)}
    return dataclasses.replace(
        placement,
        shares=tuple(dataclasses.replace(s, device=real[s.device]) for s in placement.shares),
        module_devices={m: real[d] for m, d in placement.module_devices.items()},
        tensor_devices={k: tuple(dict.fromkeys(real[d] for d in ds)) for k, ds in placement.tensor_devices.items()},
        path=tuple(real[d] for d in placement.path),
    )


def plan_only(n: int) -> None:
    plan = merge_plan(meta_model_info(PARENT, LLAMA3_70B_SHAPE))
    placement = place(plan, dtype="bfloat16", devices=[(f"cuda:{i}", H200_FREE_BYTES) for i in range(n)])
    counts = count(plan)
    print(f"{counts.total_params:,} effective parameters, {human_bytes(counts.memory_bytes)} of shared weights")
    summary = placement_summary(placement)
    for device, share in summary.pop("per_device").items():
        print(device, json.dumps(share))
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--tiny", action="store_true", help="small shape on the CPU over simulated devices")
    parser.add_argument("--plan-only", action="store_true", help="print the 70B placement on simulated H200s")
    parser.add_argument("--devices", type=int, default=2, help="simulated devices (--tiny, --plan-only)")
    args = parser.parse_args()
    if args.plan_only:
        plan_only(args.devices)
        return
    import transformers

    assert args.tiny or torch.cuda.device_count() >= 2, "needs two or more CUDA GPUs (or --tiny)"
    report = Report(args.out, args.budget_s)
    report.path = args.out / "multigpu.json"
    data = report.data
    data["torch"], data["transformers"] = torch.__version__, transformers.__version__
    shape = TINY_SHAPE if args.tiny else LLAMA3_70B_SHAPE
    data["shape"] = "tiny, CPU (--tiny)" if args.tiny else "Llama-3-70B (random bf16 weights), batch 1"
    data["recipe"] = "[0,70)+[10,80) of the parent: 140 layers, 60 repeated, tensors shared"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    lengths = TINY_LENGTHS if args.tiny else Lengths()
    info = meta_model_info(PARENT, shape, "float32" if args.tiny else "bfloat16")
    plan = merge_plan(info)
    counts = count(plan)
    data["effective_params"], data["parent_bytes"] = counts.total_params, counts.memory_bytes
    if args.tiny:
        data["devices"] = f"{args.devices} simulated: the first on the CPU, the others from accelerate's disk offload"
        devices = simulated_devices(plan, args.devices, lengths.context)
        placement = place(plan, dtype=plan.dtype, devices=devices, context_tokens=lengths.context)
        data["placement"] = placement_summary(placement)
        placement = on_cpu(placement)
    else:
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        data["devices"] = [torch.cuda.get_device_name(d) for d in gpus]
        devices = [(d, torch.cuda.mem_get_info(torch.device(d))[0]) for d in gpus]
        placement = report.stage(
            "place", lambda: place(plan, dtype=plan.dtype, devices=devices, context_tokens=lengths.context)
        )
        data["placement"] = placement_summary(placement)
    main_device = "cpu" if args.tiny else "cuda"
    bandwidth = report.stage("bandwidth", lambda: copy_bandwidth(main_device, 1 << (20 if args.tiny else 30)))
    data["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)  # one GPU: a pipeline runs one at a time

    start = time.perf_counter()
    parents = make_parent_tensors(plan, placement, dtype)
    sync(main_device)
    data["parent_made_on_devices_s"] = round(time.perf_counter() - start, 2)
    offload = tempfile.mkdtemp(prefix="multigpu-offload-") if args.tiny else None
    start = time.perf_counter()
    model = assemble_loaded(
        plan, parents, device=placement.input_device, dtype=dtype, placement=placement, offload_dir=offload
    )
    sync(main_device)
    data["build_s (goal < 30)"] = round(time.perf_counter() - start, 2)
    del parents  # the model holds every tensor it needs
    layers = model.model.layers
    data["repeated_layers_shared"] = all(
        layers[d].mlp.up_proj.weight.data_ptr() == layers[d + 60].mlp.up_proj.weight.data_ptr()
        for d in range(10, 70)
        if placement.module_devices[f"model.layers.{d}"] != "disk"  # offloaded weights live on disk
    )
    if not args.tiny:
        data["param_bytes"] = parameter_bytes(model)
        memory_report(data, placement, "after_build", with_kv=False)
    per_token = weight_bytes_per_token(model)
    bound = bandwidth / per_token
    data["weight_bytes_per_token"], data["bound_tok_s"] = per_token, round(bound, 2)
    model.generation_config.pad_token_id = shape["eos_token_id"]

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, lengths.prompt), generator=gen).to(placement.input_device)
    long_ids = torch.randint(0, shape["vocab_size"], (1, lengths.ttft_prompt), generator=gen).to(placement.input_device)

    def decode(label: str, compile: bool) -> None:
        fast = FastGenerator(model, context_tokens=placement.context_tokens, compile=compile)
        list(fast.generate(ids, max_new_tokens=lengths.decode))  # warm-up (compiles the step when asked)
        speed = fast_decode(fast, ids, lengths.decode)
        result = {**speed, "fraction_of_bound (goal >= 0.5)": round(speed["decode_tok_s"] / bound, 3)}
        result[f"ttft_ms_{lengths.ttft_prompt}"] = ttft_ms(fast, long_ids)
        greedy = list(fast.generate(ids, max_new_tokens=lengths.greedy))
        with torch.inference_mode():
            plain = model.generate(ids, max_new_tokens=lengths.greedy, min_new_tokens=lengths.greedy, do_sample=False)
        result["greedy_equal_to_generate"] = greedy == plain[0, ids.shape[1] :].tolist()
        result["kv_cache_on_each_layers_device"] = all(
            layer.keys.device == torch.device(storage_device(placement.module_devices[f"model.layers.{d}"]))
            for d, layer in enumerate(fast.cache.layers)
        )
        data[label] = result
        if not args.tiny:
            memory_report(data, placement, f"during_{label}", with_kv=True)
        print(f"{label}: {result}", flush=True)

    report.stage("fast_eager", lambda: decode("fast_eager", False), needs_s=60)
    if args.tiny:  # before fusing, which may change the last bits of a product
        report.stage("equal_to_one_device", lambda: compare_with_one_device(data, plan, model, ids, lengths))
    if not args.tiny:  # fusing needs every weight on its device (not offloaded); compiling takes minutes
        report.stage("fuse", lambda: data.update(fused_modules=fuse_projections(model)))
        report.stage("fast_eager_fused", lambda: decode("fast_eager_fused", False), needs_s=60)
        report.stage("fast_compiled", lambda: decode("fast_compiled", True), needs_s=300)
        report.stage("generate_static", lambda: generate_static(data, model, ids, bound, lengths.decode), needs_s=200)
    report.save()
    print(json.dumps(data, indent=2))


def memory_report(data: dict[str, Any], placement: Placement, label: str, *, with_kv: bool) -> None:
    """Allocated bytes per GPU against the parent's share (its bytes / GPUs used), plus, once a
    static cache exists, the KV cache the placement planned there."""
    share = data["parent_bytes"] / len(placement.shares)
    report = {}
    for s in placement.shares:
        expected = share + (s.kv_bytes if with_kv else 0)
        allocated = torch.cuda.memory_allocated(s.device)
        report[s.device] = {
            "allocated_gib": round(allocated / 2**30, 2),
            f"parent_share{'_plus_kv' if with_kv else ''}_gib": round(expected / 2**30, 2),
            "ratio (goal <= 1.05)": round(allocated / expected, 3),
        }
    data[f"memory_{label}"] = report


def compare_with_one_device(data: dict[str, Any], plan: Plan, model: Any, ids: torch.Tensor, lengths: Lengths) -> None:
    """--tiny: the dispatched merge against the same merge (same seeds) built on one device."""
    parents = make_parent_tensors(plan, place(plan, dtype=plan.dtype, devices=[("cpu", 1 << 60)]), torch.float32)
    one = assemble_loaded(plan, parents, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        same_logits = torch.equal(one(ids).logits, model(ids).logits)
    tokens = [
        list(FastGenerator(m, context_tokens=lengths.context).generate(ids, max_new_tokens=lengths.greedy))
        for m in (one, model)
    ]
    data["equal_to_one_device"] = {"logits": same_logits, "greedy_tokens": tokens[0] == tokens[1]}


def generate_static(data: dict[str, Any], model: Any, ids: torch.Tensor, bound: float, tokens: int) -> None:
    settings = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(ids, cache_implementation="static", **settings)  # compiles for this length
        sync("cuda")
        start = time.perf_counter()
        model.generate(ids, cache_implementation="static", **settings)
        sync("cuda")
    tok_s = tokens / (time.perf_counter() - start)
    data["generate_static"] = {"tok_s": round(tok_s, 2), "fraction_of_bound": round(tok_s / bound, 3)}


if __name__ == "__main__":
    main()
