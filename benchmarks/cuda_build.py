"""Build a splice on CUDA by assignment and check it against a deep-copied build, side by side.

Makes a random model of SmolLM2-135M's shape (bf16 on disk, no download), builds the issue's
recipe [0,20) + [10,30) on the GPU with merger.build.assemble, and prints as JSON: build time, GPU
parameter memory of the splice against the parent's, whether logits and a 64-token greedy
generation equal a deep-copied build's, and plain `generate()` decode speed of both.

    python benchmarks/cuda_build.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.build.assemble import assemble, parameter_bytes
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def make_parent(folder: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(folder)


def copied_build(plan) -> torch.nn.Module:
    from safetensors.torch import load_file

    parent = {}
    for f in sorted(next(iter(plan.models.values())).local_dir.glob("*.safetensors")):
        parent.update(load_file(f, device="cuda"))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plan.config), dtype=torch.bfloat16).cuda()
    model.load_state_dict({o: parent[s.name].clone() for o, s in plan.tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def decode_tok_s(model, ids, new_tokens: int) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "parent"
        make_parent(folder)
        ref = str(folder)
        plan = make_plan(passthrough((ref, 0, 20), (ref, 10, 30)), ANY_PATH)
        assemble(plan, device="cuda", dtype="bfloat16")  # warm the file cache and CUDA context
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        built = assemble(plan, device="cuda", dtype="bfloat16")
        torch.cuda.synchronize()
        build_s = time.perf_counter() - start
        splice_mem = torch.cuda.memory_allocated() - base
        reference = copied_build(plan)
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (1, 32), device="cuda")
        with torch.no_grad():
            same_logits = torch.equal(built(ids).logits, reference(ids).logits)
            kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
            same_greedy = torch.equal(built.generate(ids, **kwargs), reference.generate(ids, **kwargs))
            parent_bytes = sum(m.nbytes for m in plan.primary.tensors.values())
            report = {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "recipe": "[0,20)+[10,30) of a SmolLM2-135M-shaped bf16 model",
                "layers": built.config.num_hidden_layers,
                "build_seconds": round(build_s, 3),
                "splice_param_bytes": parameter_bytes(built),
                "parent_param_bytes": parent_bytes,
                "splice_gpu_alloc_bytes": splice_mem,
                "copied_build_param_bytes": parameter_bytes(reference),
                "logits_equal_copied_build": same_logits,
                "greedy_64_equal_copied_build": same_greedy,
                "generate_tok_s_splice": round(decode_tok_s(built, ids, 128), 1),
                "generate_tok_s_copied": round(decode_tok_s(reference, ids, 128), 1),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
