"""Plan -> a model on cpu/cuda, by assignment (DESIGN.md, "Assemble by assignment").

The merged config makes the model on the meta device; each output parameter is then assigned the
parent's tensor by name. Every depth is its own module (its own KV-cache slot), while a duplicated
layer's parameters are the very same tensors as the original's: no copy, no extra memory.
Blended tensors are computed on the build device in the build dtype, one at a time (their inputs
freed after each), and held once however often the plan uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from merger.architecture import EMBEDDINGS, HEAD
from merger.build.parent_reader import ParentReader, compute_blend
from merger.dtypes import torch_dtype
from merger.locks import PARAMETERS_LOCK
from merger.plan import Blend, Plan, TensorSource
from merger.plan.placement import Placement, dispatch, storage_device
from merger.sources.hub import download_weights
from merger.sources.model_info import ModelInfo

Progress = Callable[[float, str], None]


@dataclass
class LoadedTensors:
    """Parent tensors by (model, name, device), each read once from its safetensors file."""

    by_source: dict[tuple[str, str, str], torch.Tensor]
    models: dict[str, ModelInfo] = field(default_factory=dict)  # the parents with their weights on disk

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.by_source.values())

    def on(self, device: str) -> dict[tuple[str, str], torch.Tensor]:
        """The tensors held on `device`, by (model, name)."""
        return {(m, n): t for (m, n, d), t in self.by_source.items() if d == device}


def load_parent_tensors(
    plan: Plan,
    *,
    device: str,
    dtype: torch.dtype,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> LoadedTensors:
    """Every parent tensor the plan passes through, on `device`, or with a split placement on each
    device that holds it (accelerate's `disk` offload takes it from the CPU)."""
    models = {ref: download_weights(info) for ref, info in plan.models.items()}
    wanted = sorted({(src.model, src.name) for src in plan.tensors.values() if isinstance(src, TensorSource)})
    loaded: dict[tuple[str, str, str], torch.Tensor] = {}
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
    return LoadedTensors(loaded, models)


def _holders(placement: Placement | None, key: object, device: str) -> tuple[str, ...]:
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
    blended = blend_all(plan, parents, device=device, dtype=dt, progress=progress, placement=placement)
    model = assemble_loaded(
        plan, parents, blended=blended, device=device, dtype=dt, placement=placement, offload_dir=offload_dir
    )
    if progress:
        progress(1.0, "built")
    return model


def assemble_loaded(
    plan: Plan,
    parents: LoadedTensors,
    *,
    device: str,
    dtype: torch.dtype,
    blended: dict[tuple[Blend, str], torch.Tensor] | None = None,
    placement: Placement | None = None,
    offload_dir: str | None = None,
) -> PreTrainedModel:
    """The merged model from parent tensors (and blends) already where they belong (read from files
    or made in memory)."""
    config = AutoConfig.for_model(**plan.config)
    split = placement is not None and placement.is_split
    blended = blended or {}
    state = {}
    for out, src in plan.tensors.items():
        where = placement.device_of(out) if split else device
        if isinstance(src, Blend):
            state[out] = blended[(src, where)]
        else:
            state[out] = parents.by_source[(src.model, src.name, where)]
    if plan.tied:
        state[HEAD] = state[EMBEDDINGS]
    with PARAMETERS_LOCK:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
    if split:
        dispatch(model, placement, offload_dir=offload_dir)
    else:
        model.to(device)  # buffers (rotary tables) were made real on the CPU
    model.eval()
    return model


def tensors_of(model: PreTrainedModel, plan: Plan, device: str) -> LoadedTensors:
    """The parent tensors that `model`, built from `plan` (no blends) on `device`, holds, by source:
    other plans over the same parents then assemble from memory (assemble_loaded), without reading
    a file, their tensors the model's own."""
    if plan.blends:
        raise ValueError("a model with blended tensors does not hold its parents' tensors")
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return LoadedTensors({(src.model, src.name, device): state[out] for out, src in plan.tensors.items()})


def blend_all(
    plan: Plan,
    parents: LoadedTensors,
    *,
    device: str,
    dtype: torch.dtype,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> dict[tuple[Blend, str], torch.Tensor]:
    """Every distinct blend of the plan, computed one at a time on each device that holds it."""
    blends = plan.blends
    if not blends:
        return {}
    done: dict[tuple[Blend, str], torch.Tensor] = {}
    views: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    with ParentReader(parents.models) as reader:
        for i, item in enumerate(blends, start=1):
            for target in _holders(placement, item, device):
                local = views.setdefault(target, parents.on(target))
                done[(item, target)] = compute_blend(
                    item, reader, device=storage_device(target), dtype=dtype, loaded=local
                )
            if progress and i % 16 == 0:
                progress(i / len(blends), f"blending ({item.method})")
    return done


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique parameter storage: shared tensors count once."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())
