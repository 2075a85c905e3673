"""merger.generate.kernel's Triton flash-decoding kernel equals SDPA over the attended slots. Without a
GPU it runs in Triton's interpreter on CPU tensors (conftest.py turns it on)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_reference import attended_slots, sdpa_over

from merger.generate import attention as decode_attention

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("groups", "dim", "window", "position", "sliding_window", "chunk"),
    [
        (4, 128, 512, 0, None, 64),  # the first slot alone: every other chunk empty
        (4, 128, 512, 63, None, 64),  # the last slot of the first chunk
        (4, 128, 512, 64, None, 64),  # the first slot of the second
        (4, 128, 512, 511, None, 64),  # the whole window
        (4, 128, 512, 300, None, 256),  # fewer, longer chunks
        (1, 64, 300, 299, None, 48),  # no grouping; a chunk of 1.5 blocks; the window no multiple of it
        (3, 48, 700, 600, None, 64),  # a group and a head size that are no powers of two
        (2, 256, 512, 400, 20, 64),  # Gemma's head size and a sliding window inside one chunk
        (2, 256, 1024, 700, 512, 64),  # a sliding window across chunks
        (1, 64, 2048, 1500, None, 32),  # 47 chunks: the combining kernel's loop over several spans
        (2, 64, 2048, 1900, 1000, 32),  # a sliding window over spans, its first chunk inside one
    ],
)
def test_triton_decode_attention_equals_sdpa_over_the_attended_slots(
    groups, dim, window, position, sliding_window, chunk
):
    gen = torch.Generator().manual_seed(position)
    kv_heads = 2
    query = torch.randn(1, kv_heads * groups, 1, dim, generator=gen)
    key, value = torch.randn(2, 1, kv_heads, window, dim, generator=gen)
    attend = attended_slots(window, position, sliding_window)
    expected = sdpa_over(query, key, value, attend, 0.3)
    for cached in (key, value):  # a value read outside the range would turn the output to NaN
        cached[..., ~attend, :] = float("nan")
    got = decode_attention.triton_decode_attention(
        query.to(DEVICE),
        key.to(DEVICE),
        value.to(DEVICE),
        torch.tensor([[position]], device=DEVICE),
        scaling=0.3,
        sliding_window=sliding_window,
        chunk=chunk,
    )
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_triton_decode_attention_reads_a_strided_cache():
    # the static cache hands each layer its own [1, KV, W, D] tensor; a view with other strides too
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(1, 8, 1, 64, generator=gen)
    stacked = torch.randn(1, 64, 2, 2, 256, generator=gen)  # [1, D, K/V, KV, W]: nothing contiguous
    key, value = stacked[:, :, 0].permute(0, 2, 3, 1), stacked[:, :, 1].permute(0, 2, 3, 1)
    expected = sdpa_over(query, key, value, attended_slots(256, 100), 0.125)
    got = decode_attention.triton_decode_attention(
        query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), torch.tensor([[100]], device=DEVICE), scaling=0.125
    )
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_triton_decode_attention_on_a_bf16_cache_errs_no_more_than_rounding_its_weights_to_bf16():
    # Llama-3-8B's attention shape. On a GPU the values' dot takes the softmax weights rounded to
    # bf16 (as transformers' eager attention does), each off by at most 2**-8 of itself, so an
    # output is off by at most 2**-8 of the weighted mean of |values|, plus its own rounding to bf16
    # (Triton's interpreter computes in fp32 and meets only the latter)
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(1, 32, 1, 128, generator=gen).bfloat16()
    key, value = torch.randn(2, 1, 8, 1024, 128, generator=gen).bfloat16()
    attend, scale = attended_slots(1024, 700), 128**-0.5
    expected = sdpa_over(query.float(), key.float(), value.float(), attend, scale)
    mean_magnitude = sdpa_over(query.float(), key.float(), value.float().abs(), attend, scale)
    got = decode_attention.triton_decode_attention(
        query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), torch.tensor([[700]], device=DEVICE), scaling=scale
    )
    assert got.dtype == torch.bfloat16
    error = (got.cpu().float() - expected).abs()
    assert (error <= 2**-8 * (mean_magnitude + expected.abs()) + 1e-6).all()


TRACE_SCRIPT = r"""
import torch
from merger.generate import attention as decode_attention

graphs = []

def backend(graph_module, example_inputs):
    graphs.append(graph_module)
    return lambda *args: (torch.zeros(1, 8, 1, 64),)  # traced, not run: no GPU here

step = torch.compile(decode_attention.triton_decode_attention, backend=backend, fullgraph=True)
step(torch.randn(1, 8, 1, 64), *torch.randn(2, 1, 2, 256, 64), torch.tensor([[100]]), scaling=0.125)
print(len(graphs), *sorted({str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}), sep="\n")
"""


def without_interpreter(script: str) -> list[str]:
    """`script`'s printed lines, run in a process without Triton's interpreter (which conftest.py
    turns on, and which neither torch.compile nor Triton's compiler can take)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def test_torch_compile_traces_the_triton_attention_as_one_op_in_one_graph():
    # a graph break at the kernel would split the compiled decode step
    graphs, *ops = without_interpreter(TRACE_SCRIPT)
    assert graphs == "1" and any(op.startswith("frankenmerge.chunked_decode_attention") for op in ops)


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from merger.generate.kernel import BLOCK, CHUNK, SPAN, _chunk_attention, _combine_chunks


def compiles(kernel, pointers, constants, scale="fp32"):
    names = kernel.arg_names
    signature = {
        n: "constexpr" if n in constants else f"*{pointers[n]}" if n in pointers else scale if n == "scale" else "i32"
        for n in names
    }
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()})
    return "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm


# inductor types the scale fp64 when fp32 cannot hold it exactly (128 ** -0.5), fp32 otherwise
shapes = [("bf16", 4, 128, "fp64"), ("fp32", 2, 16, "fp32"), ("bf16", 2, 256, "fp64"), ("fp16", 3, 48, "fp32")]
for dtype, groups, dim, scale in shapes:
    padded = {"GP": max(16, triton.next_power_of_2(groups)), "DP": max(16, triton.next_power_of_2(dim))}
    constants = {"groups": groups, "dim": dim, **padded, "CHUNK": CHUNK, "BLOCK": BLOCK, "INTERPRETED": False}
    chunks = dict.fromkeys(("top_out", "total_out", "part_out"), "fp32")
    pointers = {"query": dtype, "keys": dtype, "values": dtype, "position": "i64"} | chunks
    attends = compiles(_chunk_attention, pointers, constants, scale)
    pointers = dict.fromkeys(("top", "total", "part"), "fp32") | {"position": "i64", "out": dtype}
    constants = {"groups": groups, "dim": dim, "DP": padded["DP"], "CHUNK": CHUNK, "SPAN": SPAN}
    print(dtype, groups, dim, attends, compiles(_combine_chunks, pointers, constants))
"""


def test_the_kernels_compile_for_hopper_gpus_in_every_dtype_and_shape_the_page_meets():
    # the interpreter runs what the compiler may refuse (types that differ between branches, dot
    # shapes): Triton's own compiler builds it for sm_90 (the H200) here, without a GPU
    assert without_interpreter(COMPILE_SCRIPT) == [
        "bf16 4 128 True True",
        "fp32 2 16 True True",
        "bf16 2 256 True True",
        "fp16 3 48 True True",
    ]
