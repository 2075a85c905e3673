"""A Triton kernel for batch-1 matrix products, y = W x with W [N, K]: the decode step's weight reads.

At batch 1 a product reads its whole matrix once, so its time is its bytes over the bandwidth it
reaches. cuBLAS picks tile shapes made for matrices on both sides (and split-K with a second reduce
kernel for some); on the H200 this plain GEMV reads Llama-3-8B's step matrices about 6% faster
(`benchmarks/gemv.py`; README, Benchmarks). Each program takes BLOCK_N rows and walks
K in BLOCK_K columns, multiplying in fp32 and summing once at the end.

Imported only where Triton is (torch's CUDA builds ship it); with TRITON_INTERPRET=1 it also runs
on CPU tensors, which the tests use.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(weight, vector, out, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # row offsets in int64: a matrix of over 2**31 elements (a large vocabulary's head) passes int32
    starts = weight + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for first in range(0, K, BLOCK_K):
        cols = first + tl.arange(0, BLOCK_K)
        tile = tl.load(
            starts + cols[None, :],
            mask=(rows[:, None] < N) & (cols[None, :] < K),
            other=0.0,
        )
        x = tl.load(vector + cols, mask=cols < K, other=0.0)
        acc += tile.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out + rows, tl.sum(acc, 1).to(out.dtype.element_ty), mask=rows < N)


def config_for(n: int, k: int) -> dict[str, int]:
    """Block sizes and warps for an [n, k] matrix: the best of `benchmarks/gemv.py`'s grid on the
    H200 for each of Llama-3-8B's step shapes: long matrices (gate/up, the output head) in short
    column blocks, square and wide ones (the output and down products) in long ones with more
    warps, the fused q/k/v in between."""
    if n >= 16384:
        return {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}
    if k >= 8192 or n <= 4096:
        return {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8}
    return {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4}


def launch(weight: torch.Tensor, vector: torch.Tensor, out: torch.Tensor, config: dict[str, int]) -> None:
    """out [N] = weight [N, K] (rows of any stride, columns contiguous) @ vector [K] (contiguous), eagerly."""
    n, k = weight.shape
    _gemv[(triton.cdiv(n, config["BLOCK_N"]),)](weight, vector, out, n, k, weight.stride(0), **config)


@torch.library.triton_op("frankenmerge::gemv", mutates_args=())
def gemv(vector: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (columns contiguous) @ vector (K values, any leading shape of one row) -> [N]
    in the vector's dtype. A custom op, so torch.compile puts it in the step's graph as one call
    whose kernel inductor then launches itself."""
    n, k = weight.shape
    vector = vector.reshape(k)
    out = torch.empty(n, device=vector.device, dtype=vector.dtype)
    config = config_for(n, k)
    torch.library.wrap_triton(_gemv)[(triton.cdiv(n, config["BLOCK_N"]),)](
        weight, vector, out, n, k, weight.stride(0), **config
    )
    return out
