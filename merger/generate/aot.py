"""The one-token decode step compiled ahead of time (AOTInductor), for ZeroGPU Spaces: they forbid
`torch.compile` in their GPU calls, and each call runs in a forked worker that keeps nothing a
compile would leave behind. A package compiled in one GPU call is plain bytes, which a later call
loads and runs.

Two choices make it work for our builds:
- the static cache's tensors are the step's inputs, written in place. As the exported module's
  buffers instead, AOTInductor does not carry their updates from one call to the next (tried on
  torch 2.13: the logits went wrong from the third token);
- the package leaves the weights out, and each build's own tensors are loaded into it without a
  copy (`user_managed`). Duplicated layers stay one tensor, and one package serves every build of
  a structure (`merger.generate.steps.model_structure`: the same depth, shapes and repeated layers).
On the CPU it gives `generate()`'s greedy tokens (tests/test_aot_step.py). On the H200 (torch 2.11)
AOTInductor's loader crashes the process on any CUDA package, torch's own included (README), so a
new package is first loaded in a fresh process (`check_loads`), and ZeroGPU uses it only on request.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from merger.errors import AotLoadError
from merger.generate.attention import use_decode_attention
from merger.generate.steps import allocated_static_cache

# The package holds the step's code and kernels; each build's weights are loaded into it. The
# weights go to a separate artifact that is left out, as `spaces.aoti_compile` does (torch 2.10 on).
WEIGHTLESS: dict[str, Any] = {
    "aot_inductor.package": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
    "always_keep_tensor_constants": True,
}


# Loading a package in a fresh process first: where AOTInductor's loader crashes (a segfault, not an
# exception) only that process dies, not the app or the GPU worker that serves replies.
LOAD_PACKAGE = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
LOAD_CHECK_SECONDS = 180


class _CacheStep(nn.Module):
    """The decode step as a function of the cache's tensors, for torch.export: logits [1, V] for
    one token [1, 1] at position [1, 1], each layer's keys, values and length written in place."""

    def __init__(self, model: nn.Module, cache: Cache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        lengths: list[torch.Tensor],
    ) -> torch.Tensor:
        for layer, k, v, n in zip(self.cache.layers, keys, values, lengths, strict=True):
            layer.keys, layer.values, layer.cumulative_length = k, v, n
        out = self.model(input_ids=token, position_ids=position, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]


def cache_tensors(cache: Cache) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's keys, values and length counter (of an allocated cache)."""
    layers = cache.layers
    return [la.keys for la in layers], [la.values for la in layers], [la.cumulative_length for la in layers]


def weights_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (a duplicated layer's tensors under both
    depths' names), as the exported step's constants are named."""
    tensors = dict(model.named_parameters(prefix="model", remove_duplicate=False))
    tensors.update(model.named_buffers(prefix="model", remove_duplicate=False))
    return tensors


class AotStep:
    """A structure's decode step compiled ahead of time: the package's bytes, without weights.
    Pickles as bytes (a ZeroGPU call returns it); `bind` loads it for one model and cache."""

    def __init__(self, package: bytes) -> None:
        self.package = package

    def bind(self, model: nn.Module, cache: Cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The step of `model` over `cache` (allocated): (token [1, 1], position [1, 1]) -> logits [1, V]."""
        runner = torch._inductor.aoti_load_package(io.BytesIO(self.package))
        tensors = weights_by_name(model)
        runner.load_constants(
            {name: tensors[name] for name in runner.get_constant_fqns()}, check_full_update=True, user_managed=True
        )
        keys, values, lengths = cache_tensors(cache)
        return lambda token, position: runner(token, position, keys, values, lengths)


def check_loads(package: bytes) -> None:
    """Raise AotLoadError unless a fresh process loads `package` (on this machine's device)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step.pt2"
        path.write_bytes(package)
        try:
            run = subprocess.run(
                [sys.executable, "-c", LOAD_PACKAGE, str(path)],
                capture_output=True,
                text=True,
                timeout=LOAD_CHECK_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise AotLoadError(f"loading the package took over {LOAD_CHECK_SECONDS} s") from None
    if run.returncode < 0:
        crash = signal.Signals(-run.returncode).name
        raise AotLoadError(f"AOTInductor's loader crashed ({crash}) on torch {torch.__version__}")
    if run.returncode:
        last = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
        raise AotLoadError(f"AOTInductor's loader failed: {last[0][:300]}")


def compile_step(model: nn.Module, context_tokens: int, compile_exported: Callable | None = None) -> AotStep:
    """Export `model`'s one-token step over a static cache of `context_tokens` slots and compile it ahead of
    time; `compile_exported` (ExportedProgram -> package bytes) replaces AOTInductor's own packaging
    (a Space's `spaces.aoti_compile`). Raises AotLoadError for a package this machine cannot load."""
    use_decode_attention(model)  # the step reads each cached key and value once; prefill keeps SDPA
    cache = allocated_static_cache(model, context_tokens)  # its own: the export swaps the layers' tensors
    device = next(model.parameters()).device
    example = (torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, dtype=torch.long, device=device))
    with torch.no_grad():
        exported = torch.export.export(_CacheStep(model, cache), (*example, *cache_tensors(cache)), strict=False)
    package = (compile_exported or package_without_weights)(exported)
    check_loads(package)
    return AotStep(package)


def package_without_weights(exported: torch.export.ExportedProgram) -> bytes:
    """AOTInductor's package of `exported`, its weights left out (WEIGHTLESS)."""
    from torch._inductor.package import package_aoti

    args, kwargs = exported.example_inputs
    artifacts = torch._inductor.aot_compile(exported.module(), args, kwargs, options=dict(WEIGHTLESS))
    buffer = io.BytesIO()
    package_aoti(buffer, [file for file in artifacts if isinstance(file, str)])  # not the Weights
    return buffer.getvalue()
