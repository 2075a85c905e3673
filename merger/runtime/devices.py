"""Where a build goes: the device, the dtype a build for chat is made in and the one the lens
measures in, the free memory of each device (ZeroGPU's card, a container's limit), its placement,
and the budget of all built models."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from merger.errors import PlacementError
from merger.host import on_zero_gpu
from merger.plan import Plan, build_dtype, in_dtype
from merger.plan.placement import place
from merger.runtime.container import memory_available, memory_total

if TYPE_CHECKING:
    from merger.plan.placement import Placement


def compile_unavailable() -> str | None:
    """Why the decode step cannot be compiled here (None: it can). torch.compile builds its GPU
    kernels' launchers with a C compiler at run time, which a Space's image may lack (packages.txt
    asks for one); without it a GPU's step runs eagerly, captured in a CUDA graph."""
    if any(shutil.which(cc) for cc in (os.environ.get("CC"), "cc", "gcc", "clang") if cc):
        return None
    return "no C compiler on this machine, which torch.compile needs"


ZERO_GPU_DEFAULT_GB = 48  # a ZeroGPU Space's card (DESIGN.md); FRANKENMERGE_ZERO_GPU_GB overrides


def best_device() -> str:
    """Where builds are assembled: CUDA when present; the CPU on ZeroGPU, whose GPU exists only inside
    GPU calls (each call moves the builds it uses onto it: `merger.runtime.zero_gpu`)."""
    if on_zero_gpu():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def chat_dtype(plan: Plan, device: str) -> str:
    """The dtype a build for chat is made in: on ZeroGPU the GPU's, where its replies run, though
    it waits on the CPU between them."""
    return build_dtype(plan, "cuda" if on_zero_gpu() else device)


def cpu_multiplies_bf16_fast() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX), with which torch
    multiplies bf16 faster than float32; without them several times slower (README, Benchmarks,
    Suggest)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def lens_dtype(plan: Plan, device: str) -> str:
    """The dtype the lens measures `plan`'s models in on `device`: on the CPU (ZeroGPU's included),
    float32 when the recipe names no dtype, the model's is 16-bit, and a float32 build fits, except
    bf16 on a CPU that multiplies it fast (`cpu_multiplies_bf16_fast`): the lens reads numbers and
    ships no weights, 16-bit values widen exactly, and float32's products are the faster there
    (fp16's slower still); else what a chat build uses."""
    dtype = chat_dtype(plan, device)
    if device != "cpu" or plan.recipe.dtype is not None or dtype == "float32":
        return dtype
    if dtype == "bfloat16" and cpu_multiplies_bf16_fast():
        return dtype
    try:
        plan_placement(in_dtype(plan, "float32"), device)
        return "float32"
    except PlacementError:
        return dtype


def free_memory(device: str) -> int:
    """Bytes a new build may use on `device` ("cpu", "cuda" or "cuda:N")."""
    if device.startswith("cuda") and on_zero_gpu():  # no real device to ask outside a GPU call
        return int(float(os.environ.get("FRANKENMERGE_ZERO_GPU_GB", ZERO_GPU_DEFAULT_GB)) * 2**30)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    return memory_available()


def device_memory(kind: str) -> list[tuple[str, int]]:
    """The devices of `kind` a build may use, with their free bytes: the CPU, the GPU, or each GPU
    of several."""
    if kind == "cuda" and not on_zero_gpu():
        import torch

        if torch.cuda.device_count() > 1:
            return [(f"cuda:{i}", free_memory(f"cuda:{i}")) for i in range(torch.cuda.device_count())]
    return [(kind, free_memory(kind))]


def plan_placement(plan: Plan, device: str | None = None) -> Placement:
    """Where a build of `plan` on `device` (cpu|cuda) would go, from the plan's sizes and the free
    memory now; raises PlacementError, with the numbers, when it cannot fit. On ZeroGPU a build is
    held on the CPU and runs on the card inside GPU calls: it must fit both."""
    device = device or best_device()
    dtype = chat_dtype(plan, device)
    if on_zero_gpu():
        place(plan, dtype=dtype, devices=[("cuda", free_memory("cuda"))])
    return place(plan, dtype=dtype, devices=device_memory(device))


def needed_bytes(plan: Plan, device: str | None = None) -> int:
    """What a build of `plan` on `device` will hold (weights, KV cache, working memory), whatever is free now."""
    device = device or best_device()
    return place(plan, dtype=chat_dtype(plan, device), devices=[(device, 1 << 62)]).needed_bytes


def default_budget(device: str) -> int:
    """The memory all built models together may hold: FRANKENMERGE_MEMORY_BUDGET_GB, else 90% of the
    GPUs' memory on CUDA or half the container's memory (its limit, not the host's) on the CPU."""
    if env := os.environ.get("FRANKENMERGE_MEMORY_BUDGET_GB"):
        return int(float(env) * 2**30)
    if device == "cuda":
        import torch

        return int(0.9 * sum(torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count())))
    return memory_total() // 2
