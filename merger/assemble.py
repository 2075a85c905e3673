"""Plan -> a model on cpu/cuda, by assignment (DESIGN.md, "Assemble by assignment").

The merged config makes the model on the meta device; each output parameter is then assigned the
parent's tensor by name. Every depth is its own module (its own KV-cache slot), while a duplicated
layer's parameters are the very same tensors as the original's: no copy, no extra memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from merger.hub import download_weights
from merger.placement import Placement, dispatch, storage_device
from merger.plan import Plan

Progress = Callable[[float, str], None]


@dataclass
class LoadedTensors:
    """Parent tensors by (model, name, device), each read once from its safetensors file."""

    by_source: dict[tuple[str, str, str], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.by_source.values())


def load_parent_tensors(
    plan: Plan,
    *,
    device: str,
    dtype: torch.dtype,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> LoadedTensors:
    """Every parent tensor the plan uses, on `device`, or with a split placement on each device
    that holds it (accelerate's `disk` offload takes it from the CPU)."""
    models = {ref: download_weights(info) for ref, info in plan.models.items()}
    wanted = sorted({(src.model, src.name) for src in plan.tensors.values()})
    loaded: dict[tuple[str, str], torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for ref, name in wanted:
        by_file.setdefault(models[ref].tensors[name].file, []).append((ref, name))
    done = 0
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for ref, name in keys:
                tensor = f.get_tensor(name)
                for target in _holders(placement, (ref, name), device):
                    loaded[(ref, name, target)] = tensor.to(device=storage_device(target), dtype=dtype)
                done += 1
                if progress and done % 16 == 0:
                    progress(done / len(wanted), f"loading {ref}")
    return LoadedTensors(loaded)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _holders(placement: Placement | None, key: tuple[str, str], device: str) -> tuple[str, ...]:
    return placement.tensor_devices[key] if placement is not None and placement.is_split else (device,)


def assemble(
    plan: Plan,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    progress: Progress | None = None,
    placement: Placement | None = None,
    offload_dir: str | None = None,
) -> PreTrainedModel:
    """The merged model, ready for generation, its passthrough layers sharing parent tensors; on
    `device`, or spread over a split `placement`'s devices."""
    dt = torch_dtype(dtype or plan.dtype)
    parents = load_parent_tensors(plan, device=device, dtype=dt, progress=progress, placement=placement)
    model = assemble_loaded(plan, parents, device=device, dtype=dt, placement=placement, offload_dir=offload_dir)
    if progress:
        progress(1.0, "built")
    return model


def assemble_loaded(
    plan: Plan,
    parents: LoadedTensors,
    *,
    device: str,
    dtype: torch.dtype,
    placement: Placement | None = None,
    offload_dir: str | None = None,
) -> PreTrainedModel:
    """The merged model from parent tensors already where they belong (read from files or made in memory)."""
    config = AutoConfig.for_model(**plan.config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    split = placement is not None and placement.is_split
    state = {
        out: parents.by_source[(src.model, src.name, placement.device_of(out) if split else device)]
        for out, src in plan.tensors.items()
    }
    if plan.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    if split:
        dispatch(model, placement, offload_dir=offload_dir)
    else:
        model.to(device)  # buffers (rotary tables) were made real on the CPU
    model.eval()
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique parameter storage: shared tensors count once."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())
