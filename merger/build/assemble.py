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

from merger import architecture
from merger.architecture import EMBEDDINGS, HEAD
from merger.build.parent_reader import ParentReader, compute_blend
from merger.dtypes import torch_dtype
from merger.locks import PARAMETERS_LOCK
from merger.plan import Blend, Plan, TensorSource, text_model_plan
from merger.plan.counts import storage_key
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
    device that holds it (accelerate's `disk` offload takes it from the CPU); of a multimodal
    checkpoint, its text tower's."""
    plan = text_model_plan(plan)
    models = {ref: download_weights(info) for ref, info in plan.models.items()}
    sources = {(src.model, src.name): src for src in plan.tensors.values() if isinstance(src, TensorSource)}
    wanted = sorted(sources)
    loaded: dict[tuple[str, str, str], torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for ref, name in wanted:
        by_file.setdefault(models[ref].tensors[name].file, []).append((ref, name))
    done = 0
    held: dict[tuple[object, str], torch.Tensor] = {}  # (storage key, device) -> tensor: each read once
    with ParentReader(models) as reader:  # for the tensors a LoRA adapter changes
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for ref, name in keys:
                    src = sources[(ref, name)]
                    key = storage_key(plan, src)
                    for target in _holders(placement, key, device):
                        if (key, target) not in held:
                            stored = (
                                f.get_tensor(name) if src.delta is None else reader.read(src, device="cpu", dtype=dtype)
                            )
                            held[(key, target)] = stored.to(device=storage_device(target), dtype=dtype)
                        loaded[(ref, name, target)] = held[(key, target)]
                    done += 1
                    if progress and done % 16 == 0:
                        progress(done / len(wanted), f"loading {ref}")
    del held  # `loaded` holds the only references: packing the experts frees each layer's as read
    experts = architecture.STACKED_EXPERTS.get(plan.config.get("model_type"))
    if experts is not None:
        pack_experts(loaded, experts)
    return LoadedTensors(loaded, models)


def pack_experts(loaded: dict[tuple[str, str, str], torch.Tensor], experts: architecture.StackedExperts) -> None:
    """Each mixture-of-experts layer's expert tensors, as read, moved into one stacked tensor per
    projection (the layout transformers 5 holds: stack_experts then takes it as it is), one layer at
    a time and in place of the tensors read, so a build never holds its experts twice."""
    layers: dict[tuple[str, int, str], dict[str, tuple[str, str, str]]] = {}
    for key in loaded:
        ref, name, target = key
        found = architecture.CAUSAL_LM.layer_of(name)
        if found is not None and found[1].startswith(f"{experts.prefix}."):
            layers.setdefault((ref, found[0], target), {})[found[1]] = key
    for keys in layers.values():
        count = sum(1 for inner in keys if inner.endswith(f".{experts.down}.weight"))
        names = [[experts.stored(e, part) for e in range(count)] for part in (experts.gate, experts.up, experts.down)]
        if not count or any(inner not in keys for group in names for inner in group):
            continue  # not one tensor per expert: left as stored
        gates, ups, downs = ([loaded[keys[inner]] for inner in group] for group in names)
        gate_up = torch.empty(
            (count, 2 * gates[0].shape[0], gates[0].shape[1]), dtype=gates[0].dtype, device=gates[0].device
        )
        down = torch.empty((count, *downs[0].shape), dtype=downs[0].dtype, device=downs[0].device)
        rows = gates[0].shape[0]
        for e in range(count):
            gate_up[e, :rows].copy_(gates[e])
            gate_up[e, rows:].copy_(ups[e])
            down[e].copy_(downs[e])
            loaded[keys[names[0][e]]], loaded[keys[names[1][e]]] = gate_up[e, :rows], gate_up[e, rows:]
            loaded[keys[names[2][e]]] = down[e]
        del gates, ups, downs  # the tensors read: their memory goes back before the next layer is packed


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
    or made in memory): the text model (a multimodal checkpoint's text tower alone)."""
    plan = text_model_plan(plan)
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
    experts = architecture.STACKED_EXPERTS.get(plan.config.get("model_type"))
    if experts is not None:
        state = stack_experts(state, experts)
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


def stack_experts(state: dict[str, torch.Tensor], experts: architecture.StackedExperts) -> dict[str, torch.Tensor]:
    """A state dict by checkpoint names -> by transformers 5's module names, each layer's experts
    stacked into one tensor per projection. Depths that repeat one parent layer (the same tensors)
    share one stacked tensor, so repeated MoE layers still cost nothing."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        found = architecture.CAUSAL_LM.layer_of(name)
        if found is None:
            out[name] = tensor
        else:
            layers.setdefault(architecture.CAUSAL_LM.layer_prefix(found[0]), {})[found[1]] = tensor
    stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, tensors in layers.items():
        count = sum(
            1
            for suffix in tensors
            if suffix.startswith(f"{experts.prefix}.") and suffix.endswith(f".{experts.down}.weight")
        )
        if count:  # else the checkpoint already holds them stacked (as mergekit 0.1.5 writes them)
            gates = [tensors.pop(experts.stored(e, experts.gate)) for e in range(count)]
            ups = [tensors.pop(experts.stored(e, experts.up)) for e in range(count)]
            downs = [tensors.pop(experts.stored(e, experts.down)) for e in range(count)]
            key = tuple(id(t) for t in (*gates, *ups, *downs))
            if key not in stacked:
                gate_up, down = _packed(gates, ups), _packed(downs)
                if gate_up is None:
                    gate_up = torch.stack([torch.cat([gate, up]) for gate, up in zip(gates, ups, strict=True)])
                stacked[key] = (gate_up, torch.stack(downs) if down is None else down)
            out[f"{prefix}{experts.into}.gate_up_proj"], out[f"{prefix}{experts.into}.down_proj"] = stacked[key]
        for suffix, tensor in tensors.items():
            for old, new in experts.renames:
                suffix = new + suffix.removeprefix(old) if suffix.startswith(old) else suffix
            out[prefix + suffix] = tensor
    return out


def _packed(first: list[torch.Tensor], second: list[torch.Tensor] | None = None) -> torch.Tensor | None:
    """The stacked tensor that `first` (and `second`) are exactly the rows of (pack_experts' or a
    built model's: expert e's rows of `first`, then of `second`), else None."""
    base = first[0]._base
    if base is None or base.dim() != 3 or base.shape[0] != len(first):
        return None
    rows = first[0].shape[0]
    for e, tensor in enumerate(first):
        if tensor._base is not base or tensor.data_ptr() != base[e].data_ptr():
            return None
        if second is not None and (second[e]._base is not base or second[e].data_ptr() != base[e, rows:].data_ptr()):
            return None
    whole = rows * (2 if second is not None else 1)
    return base if base.shape[1] == whole and first[0].shape[1:] == base.shape[2:] else None


def tensors_of(model: PreTrainedModel, plan: Plan, device: str) -> LoadedTensors:
    """The parent tensors that `model`, built from `plan` (no blends) on `device`, holds, by source:
    other plans over the same parents then assemble from memory (assemble_loaded), without reading
    a file, their tensors the model's own."""
    if plan.blends:
        raise ValueError("a model with blended tensors does not hold its parents' tensors")
    plan = text_model_plan(plan)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    experts = architecture.STACKED_EXPERTS.get(plan.config.get("model_type"))
    if experts is not None:
        state |= unstacked_experts(state, experts)
    return LoadedTensors({(src.model, src.name, device): state[out] for out, src in plan.tensors.items()})


def unstacked_experts(state: dict[str, torch.Tensor], experts: architecture.StackedExperts) -> dict[str, torch.Tensor]:
    """Each expert's tensors under the checkpoint's names, as views of a built model's stacked ones
    (what stack_experts made), and the other renamed tensors under their stored names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        found = architecture.CAUSAL_LM.layer_of(name)
        if found is None:
            continue
        prefix, inner = architecture.CAUSAL_LM.layer_prefix(found[0]), found[1]
        if inner == f"{experts.into}.gate_up_proj":
            half = tensor.shape[1] // 2
            for e, rows in enumerate(tensor):
                out[prefix + experts.stored(e, experts.gate)], out[prefix + experts.stored(e, experts.up)] = (
                    rows[:half],
                    rows[half:],
                )
        elif inner == f"{experts.into}.down_proj":
            out |= {prefix + experts.stored(e, experts.down): rows for e, rows in enumerate(tensor)}
        for stored, moved in experts.renames:
            if inner.startswith(moved):
                out[prefix + stored + inner.removeprefix(moved)] = tensor
    return out


def blend_all(
    plan: Plan,
    parents: LoadedTensors,
    *,
    device: str,
    dtype: torch.dtype,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> dict[tuple[Blend, str], torch.Tensor]:
    """Every distinct blend of the plan (of its text model), computed one at a time on each device
    that holds it."""
    plan = text_model_plan(plan)
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
