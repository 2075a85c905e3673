"""A Triton flash-decoding kernel for one query token over a static KV cache, reading only the
slots up to the step's position (or its sliding window).

The compiled step's other attentions (`merger.generate.attention`) read the whole cache window every
step, or (FlexAttention) build a block mask per layer. Here each program takes one key/value head
and one chunk of the window: it loads that head's group of query heads once, walks its chunk's
slots up to the position in blocks (a loop bound read from the device, so a CUDA graph replays it
at any position), and leaves its running max, sum and weighted values. A second kernel, one program
per query head, combines the chunks that hold attended slots, and only those: the window's chunks
past the position (most of them, in a chat of a few hundred tokens) are neither written nor read.
Dots in the cache's dtype on tensor cores; scores, softmax and sums in fp32.

Imported only where Triton is (torch's CUDA builds ship it); with TRITON_INTERPRET=1 it also runs
on CPU tensors, which the tests use.
"""

import os

import torch
import triton
import triton.language as tl

# window slots per program: a chat of a few hundred tokens still spreads over many programs, each
# waiting on its loads only twice (4,096 slots x 8 key/value heads make 512 programs)
CHUNK = 64
BLOCK = 32  # slots per loop iteration
SPAN = 16  # chunks the combining kernel reads per loop iteration


@triton.jit
def _chunk_attention(
    query,  # [KV, G, D] (a view of [1, H, 1, D])
    keys,  # [KV, W, D] (a view of [1, KV, W, D]; any strides)
    values,
    position,  # [1]: the step's slot; slots [lo, position] are attended
    top_out,  # [KV, S, G] fp32: each chunk's max score
    total_out,  # [KV, S, G] fp32: each chunk's sum of exp(score - max)
    part_out,  # [KV, S, G, D] fp32: each chunk's values weighted by exp(score - max)
    stride_qh,
    stride_qd,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vh,
    stride_vn,
    stride_vd,
    scale,
    sliding_window,  # 0: none
    groups: tl.constexpr,
    dim: tl.constexpr,
    GP: tl.constexpr,  # groups padded to a power of two of at least 16 (tl.dot's smallest side)
    DP: tl.constexpr,  # dim padded to a power of two of at least 16
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    pos = tl.load(position).to(tl.int32)
    # inductor passes a float that fp32 cannot hold exactly (128 ** -0.5) as fp64, which would make
    # the scores fp64 and the values' dot refuse them
    scale = tl.cast(scale, tl.float32)
    lo = tl.where(sliding_window > 0, tl.maximum(pos - sliding_window + 1, 0), 0)
    start = tl.maximum(chunk * CHUNK, lo)
    end = tl.minimum(chunk * CHUNK + CHUNK, pos + 1)

    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    q = tl.load(
        query + head * groups * stride_qh + g[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=(g[:, None] < groups) & (d[None, :] < dim),
        other=0.0,
    )  # [GP, DP]
    if INTERPRETED:  # Triton's interpreter computes bf16 dots wrongly: there every dot is in fp32
        q = q.to(tl.float32)
    top = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    part = tl.zeros([GP, DP], tl.float32)
    for first in range(start, end, BLOCK):
        n = first + tl.arange(0, BLOCK)
        inside = n < end
        load_mask = inside[:, None] & (d[None, :] < dim)
        k = tl.load(
            keys + head * stride_kh + n[:, None] * stride_kn + d[None, :] * stride_kd, mask=load_mask, other=0.0
        )
        v = tl.load(
            values + head * stride_vh + n[:, None] * stride_vn + d[None, :] * stride_vd, mask=load_mask, other=0.0
        )
        if INTERPRETED:
            k, v = k.to(tl.float32), v.to(tl.float32)
        # dots in the cache's dtype, summed in fp32 (a bf16 cache's products are exact in fp32, and its
        # dots run on tensor cores); "ieee": an fp32 cache's dots without tf32 rounding
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GP, BLOCK]
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        shrink = tl.exp(top - new_top)  # 0 on the first block (top = -inf)
        p = tl.exp(scores - new_top[:, None])
        total = total * shrink + tl.sum(p, 1)
        # the weights rounded to the values' dtype, as transformers' eager attention and SDPA's kernels do
        part = part * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        top = new_top
    row = (head * chunks + chunk) * groups + g  # [GP]: only the first `groups` are real
    # a chunk without attended slots writes nothing: no program reads it
    real = g < tl.where(start < end, groups, 0)
    tl.store(top_out + row, top, mask=real)
    tl.store(total_out + row, total, mask=real)
    tl.store(part_out + row[:, None] * dim + d[None, :], part, mask=real[:, None] & (d[None, :] < dim))


@triton.jit
def _combine_chunks(
    top,  # [KV, S, G] fp32, as _chunk_attention left them
    total,
    part,  # [KV, S, G, D] fp32
    position,  # [1]
    out,  # [H, D] in the query's dtype (a view of [1, H, 1, D])
    chunks,
    sliding_window,  # 0: none
    groups: tl.constexpr,
    dim: tl.constexpr,
    DP: tl.constexpr,
    CHUNK: tl.constexpr,
    SPAN: tl.constexpr,
):
    head = tl.program_id(0)  # query head h attends with key/value head h // groups
    kv = head // groups
    g = head % groups
    pos = tl.load(position).to(tl.int32)
    lo = tl.where(sliding_window > 0, tl.maximum(pos - sliding_window + 1, 0), 0)
    last = pos // CHUNK
    d = tl.arange(0, DP)
    # every chunk from lo's to the position's holds attended slots, so the first span's max is finite
    top_all = tl.full([1], float("-inf"), tl.float32)
    denominator = tl.zeros([1], tl.float32)
    acc = tl.zeros([DP], tl.float32)
    for first in range(lo // CHUNK, last + 1, SPAN):
        s = first + tl.arange(0, SPAN)
        inside = s <= last
        row = (kv * chunks + s) * groups + g
        t = tl.load(top + row, mask=inside, other=float("-inf"))
        z = tl.load(total + row, mask=inside, other=0.0)
        p = tl.load(part + row[:, None] * dim + d[None, :], mask=inside[:, None] & (d[None, :] < dim), other=0.0)
        new_top = tl.maximum(top_all, tl.max(t, 0, keep_dims=True))
        shrink = tl.exp(top_all - new_top)  # 0 on the first span
        weight = tl.exp(t - new_top)  # 0 past the position
        denominator = denominator * shrink + tl.sum(z * weight, 0, keep_dims=True)
        acc = acc * shrink + tl.sum(p * weight[:, None], 0)
        top_all = new_top
    tl.store(out + head * dim + d, (acc / denominator).to(out.dtype.element_ty), mask=d < dim)


@torch.library.triton_op("frankenmerge::chunked_decode_attention", mutates_args=())
def chunked_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position: torch.Tensor,
    scaling: float,
    sliding_window: int,
    chunk: int,
) -> torch.Tensor:
    """Attention of one query token [1, H, 1, D] at `position` (its cache slot, [1, 1]) over
    key/value [1, KV, W, D], `chunk` slots per program, sliding_window 0 for none. Returns
    [1, H, 1, D] in the query's dtype. A custom op, so torch.compile puts it in the step's graph as
    one call whose two kernels inductor then launches itself."""
    _, heads, _, dim = query.shape
    kv_heads, window = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    chunks = triton.cdiv(window, chunk)
    top = torch.empty(kv_heads, chunks, groups, device=query.device, dtype=torch.float32)
    total = torch.empty_like(top)
    part = torch.empty(kv_heads, chunks, groups, dim, device=query.device, dtype=torch.float32)
    torch.library.wrap_triton(_chunk_attention)[(kv_heads, chunks)](
        query,
        key,
        value,
        position,
        top,
        total,
        part,
        query.stride(1),
        query.stride(3),
        key.stride(1),
        key.stride(2),
        key.stride(3),
        value.stride(1),
        value.stride(2),
        value.stride(3),
        scaling,
        sliding_window,
        groups=groups,
        dim=dim,
        GP=max(16, triton.next_power_of_2(groups)),
        DP=max(16, triton.next_power_of_2(dim)),
        CHUNK=chunk,
        BLOCK=BLOCK,
        INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1",
    )
    out = torch.empty(1, heads, 1, dim, device=query.device, dtype=query.dtype)
    torch.library.wrap_triton(_combine_chunks)[(heads,)](
        top,
        total,
        part,
        position,
        out,
        chunks,
        sliding_window,
        groups=groups,
        dim=dim,
        DP=max(16, triton.next_power_of_2(dim)),
        CHUNK=chunk,
        SPAN=SPAN,
    )
    return out
