"""merger.generate.gemv's batch-1 product equals F.linear, and merger.generate.linear sends only a
compiled product of one row on a GPU to it. Without a GPU the kernel runs in Triton's interpreter
on CPU tensors (conftest.py turns it on)."""

import pytest
import torch
import torch.nn.functional as F

from merger.generate import linear

pytest.importorskip("triton")
from merger.generate import gemv  # after the skip: it imports Triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def product(vector: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel launched as the compiled step's op launches it (the op itself runs compiled, on a
    GPU: torch 2.11's wrap_triton refuses the interpreter's functions)."""
    n, k = weight.shape
    out = torch.empty(n, device=DEVICE, dtype=vector.dtype)
    gemv.launch(weight.to(DEVICE), vector.reshape(k).to(DEVICE), out, gemv.config_for(n, k))
    return out.cpu()


@pytest.mark.parametrize(
    ("n", "k"),
    [
        (37, 300),  # neither side a multiple of any block
        (64, 1029),  # K just past two column blocks of 512
        (5000, 300),  # each of config_for's three choices: between the two others (a q/k/v's)
        (100, 8200),  # a wide matrix: long column blocks (a down product's)
        (16384, 64),  # a long matrix: short column blocks (gate/up's), K inside one
    ],
)
def test_gemv_equals_f_linear_in_float32(n, k):
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen)
    vector = torch.randn(1, 1, k, generator=gen)
    got = product(vector, weight)
    assert got.shape == (n,)
    exact = F.linear(vector.double(), weight.double()).reshape(n)
    # fp32 sums in another order than cuBLAS's: off by a few fp32 steps of the terms' magnitudes
    scale = F.linear(vector.double().abs(), weight.double().abs()).reshape(n)
    assert ((got.double() - exact).abs() <= scale * 1e-6).all()


def test_gemv_of_bf16_errs_no_more_than_rounding_its_output_to_bf16():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 2048, generator=gen).bfloat16()
    vector = torch.randn(2048, generator=gen).bfloat16()
    got = product(vector, weight)
    exact = F.linear(vector.double(), weight.double())
    assert got.dtype == torch.bfloat16
    # fp32 sums in another order than cuBLAS's: at most one bf16 step of the output from the exact value
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()


def test_gemv_reads_rows_of_a_fused_matrix():
    # a fused q/k/v's parts are row views of one buffer: rows strided by the whole width, offset
    fused = torch.randn(96, 200, generator=torch.Generator().manual_seed(2))
    part = fused[40:72]
    vector = torch.randn(200, generator=torch.Generator().manual_seed(3))
    got = product(vector, fused.to(DEVICE)[40:72])
    torch.testing.assert_close(got, F.linear(vector, part), rtol=1e-5, atol=1e-4)


def test_eager_products_and_products_of_several_rows_stay_on_f_linear(monkeypatch):
    def refuse(*args):
        raise AssertionError("the GEMV kernel ran")

    monkeypatch.setattr(gemv, "gemv", refuse)
    layer = torch.nn.Linear(64, 32, bias=True, device=DEVICE)
    linear.use_decode_linear(layer)
    assert isinstance(layer, linear.DecodeLinear)
    with torch.no_grad():
        for rows in (1, 4):
            x = torch.randn(1, rows, 64, device=DEVICE)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_compiled_product_of_one_row_on_a_cpu_stays_on_f_linear(monkeypatch):
    def refuse(*args):
        raise AssertionError("the GEMV kernel ran")

    monkeypatch.setattr(gemv, "gemv", refuse)
    layer = torch.nn.Linear(64, 32, bias=False)
    linear.use_decode_linear(layer)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="eager")(x), F.linear(x, layer.weight))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs compiled only on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_product_of_one_row_on_a_gpu_runs_the_gemv_kernel(dtype):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    layer = torch.nn.Linear(4096, 1000, bias=True, device="cuda", dtype=dtype)
    linear.use_decode_linear(layer)
    one, several = (torch.randn(1, rows, 4096, device="cuda", dtype=dtype) for rows in (1, 8))
    compiled = torch.compile(layer)
    with torch.no_grad():
        for x, expect_kernel in ((one, True), (several, False)):
            got, code = run_and_get_code(compiled, x)
            assert ("_gemv" in "".join(code)) is expect_kernel
            torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=2e-2)
