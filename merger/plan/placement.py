"""Where a build's tensors go, decided from the plan's sizes before any weight is read: one device,
several (a device map for accelerate's big-model dispatch), or a refusal with the numbers.

Placement follows the tensors, not the depths. The storage groups a build holds (the embeddings,
each parent layer it uses, the final norm and head) are split over the devices in contiguous runs,
in the order the merged model first uses them, and every depth runs on the device that holds its
source layer: a duplicated layer stays one set of tensors. So the self-merge [0,70)+[10,80) of a
70B over two GPUs holds 40 parent layers on each and goes GPU0 -> GPU1 -> GPU0 -> GPU1, where
contiguous depth ranges would either copy 60 layers or put 70 of the 80 on one GPU. A layer-split
pipeline runs one device at a time anyway; a hop moves one hidden state.

Only when that cannot fit (a group too big for any device: a layer repeated many times carries a
KV cache per use) are the depths split in contiguous ranges instead; each shared group that a range
boundary cuts is then loaded once per device holding it, and those copies are counted here, in the
device figures the page shows, never found as an out-of-memory error.

Memory per device: its unique tensors (copies included), the KV cache of the depths it runs, and
working memory (activations, allocator slack) as a fraction of its weights with a floor.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from merger.architecture import HEAD_MODULE, LAYER_RE, PRE_LAYER_PREFIXES, layer_module
from merger.dtypes import bytes_per_value
from merger.errors import PlacementError
from merger.limits import CONTEXT_TOKENS
from merger.plan import Plan
from merger.plan.counts import tensor_storage
from merger.sizes import human_bytes

WORKING_FRACTION = 0.15
WORKING_MIN_BYTES = 256 * 2**20
SHARED, DEPTH_RANGES = "shared", "depth ranges"


def storage_device(device: str) -> str:
    """Where a tensor placed on `device` is made: accelerate's `disk` offload takes it from the CPU."""
    return "cpu" if device == "disk" else device


def working_bytes(weight_bytes: int) -> int:
    return max(int(weight_bytes * WORKING_FRACTION), WORKING_MIN_BYTES)


def kv_bytes_per_depth(config: dict[str, Any], dtype: str, tokens: int) -> int:
    """Keys and values of one decoder layer for `tokens` positions at batch 1."""
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * kv_heads * head_dim * tokens * bytes_per_value(dtype)


def module_of(tensor: str) -> str:
    """The module of the merged model that owns an output tensor: a decoder layer, or the tensor's parent."""
    match = LAYER_RE.match(tensor)
    return layer_module(int(match[1])) if match else tensor.rsplit(".", 1)[0]


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds and runs."""

    device: str
    free_bytes: int
    weight_bytes: int  # its tensors, copies included
    copy_bytes: int  # of weight_bytes: tensors an earlier device also holds
    kv_bytes: int
    working_bytes: int
    depths: tuple[int, ...]  # merged depths it runs, ascending

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    @property
    def depth_ranges(self) -> list[tuple[int, int]]:
        """Its depths as [start, end) ranges."""
        ranges: list[tuple[int, int]] = []
        for d in self.depths:
            if ranges and ranges[-1][1] == d:
                ranges[-1] = (ranges[-1][0], d + 1)
            else:
                ranges.append((d, d + 1))
        return ranges


@dataclass(frozen=True)
class Placement:
    dtype: str
    context_tokens: int
    strategy: str  # SHARED (every depth with its source tensors) or DEPTH_RANGES (contiguous, with copies)
    shares: tuple[DeviceShare, ...]  # the devices used, in the order the forward pass first reaches them
    module_devices: dict[str, str]  # the device map over every module that holds a planned tensor
    tensor_devices: dict[Hashable, tuple[str, ...]]  # storage key -> devices holding a copy
    path: tuple[str, ...]  # the device of each module of a forward pass, in order

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.shares)

    @property
    def input_device(self) -> str:
        """Where inputs go in (the embeddings); dispatched outputs come back here."""
        return self.shares[0].device

    @property
    def is_split(self) -> bool:
        return len(self.shares) > 1

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.shares)

    @property
    def layers_per_device(self) -> dict[str, int]:
        return {s.device: len(s.depths) for s in self.shares}

    @property
    def needed_bytes(self) -> int:
        return sum(s.needed_bytes for s in self.shares)

    @property
    def weight_bytes(self) -> int:
        return sum(s.weight_bytes for s in self.shares)

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.shares)

    @property
    def copies(self) -> int:
        """Extra copies of tensors held on more than one device."""
        return sum(len(devices) - 1 for devices in self.tensor_devices.values())

    @property
    def copy_bytes(self) -> int:
        return sum(s.copy_bytes for s in self.shares)

    @property
    def hops(self) -> int:
        """Device changes along one forward pass."""
        return sum(a != b for a, b in zip(self.path, self.path[1:], strict=False))

    def device_of(self, tensor: str) -> str:
        """The device an output tensor is assigned on."""
        return self.module_devices[module_of(tensor)]


@dataclass(frozen=True)
class _Unit:
    """Tensors that must sit on one device, with the modules placed with them."""

    tensors: dict[Hashable, int]  # storage key -> bytes at the build dtype
    modules: tuple[str, ...]
    depths: tuple[int, ...]
    kv_bytes: int


def place(
    plan: Plan, *, dtype: str, devices: Sequence[tuple[str, int]], context_tokens: int | None = None
) -> Placement:
    """The placement of `plan` built at `dtype` over `devices` ((name, free bytes), in pipeline
    order): one device if the merge fits the freest one, else the fewest devices that hold it with
    every repeated layer shared, else contiguous depth ranges with counted copies. Raises
    PlacementError, with the numbers, when nothing fits."""
    if not devices:
        raise ValueError("no device to place the build on")
    # the KV cache holds CONTEXT_TOKENS (or the model's maximum, if lower)
    tokens = context_tokens or min(CONTEXT_TOKENS.value, plan.config.get("max_position_embeddings") or 1 << 30)
    per_depth = _depth_units(plan, dtype, kv_bytes_per_depth(plan.config, dtype, tokens))
    # modules in forward order: embeddings, depths, final norm, then a tied head (placed with the embeddings)
    forward = sorted((m for unit in per_depth for m in unit.modules), key=lambda m: m == HEAD_MODULE)
    ranked = sorted(devices, key=lambda d: -d[1])  # stable: ties keep the given order
    attempts: list[tuple[float, Placement]] = []
    for units, strategy, counts in (
        (_shared_units(per_depth), SHARED, range(1, len(devices) + 1)),
        (per_depth, DEPTH_RANGES, range(2, len(devices) + 1)),
    ):
        needs = _needs(units)
        for k in counts:
            if k > len(units):
                break
            chosen = {name for name, _ in ranked[:k]}
            used = [d for d in devices if d[0] in chosen]
            ratio, runs = _split(needs, [free for _, free in used])
            placement = _placement(dtype, tokens, strategy, units, runs, used, forward)
            if placement.fits:
                return placement
            attempts.append((ratio, placement))
    raise PlacementError(_refusal(min(attempts, key=lambda a: a[0])[1], devices))


def _depth_units(plan: Plan, dtype: str, kv_per_depth: int) -> list[_Unit]:
    """One unit per merged depth, between the embeddings' unit and the final norm and head's."""
    per_param = bytes_per_value(dtype)
    before: dict[Hashable, int] = {}
    after: dict[Hashable, int] = {}
    depths: list[dict[Hashable, int]] = [{} for _ in range(plan.num_layers)]
    before_modules, after_modules = set(), set()
    for out, (key, numel) in tensor_storage(plan).items():
        match = LAYER_RE.match(out)
        if match:
            depths[int(match[1])][key] = numel * per_param
        elif out.startswith(PRE_LAYER_PREFIXES):
            before[key] = numel * per_param
            before_modules.add(module_of(out))
        else:
            after[key] = numel * per_param
            after_modules.add(module_of(out))
    if plan.tied:
        before_modules.add(HEAD_MODULE)
    return [
        _Unit(before, tuple(sorted(before_modules)), (), 0),
        *(_Unit(t, (layer_module(d),), (d,), kv_per_depth) for d, t in enumerate(depths)),
        _Unit(after, tuple(sorted(after_modules)), (), 0),
    ]


def _shared_units(units: list[_Unit]) -> list[_Unit]:
    """Units that share any tensor merged into one, ordered by first use."""
    root = list(range(len(units)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    owner: dict[Hashable, int] = {}
    for i, unit in enumerate(units):
        for key in unit.tensors:
            if key in owner:
                a, b = find(owner[key]), find(i)
                root[max(a, b)] = min(a, b)  # the earliest use stays the group's root
            else:
                owner[key] = i
    groups: dict[int, list[_Unit]] = {}
    for i, unit in enumerate(units):
        groups.setdefault(find(i), []).append(unit)
    return [
        _Unit(
            tensors={k: n for u in members for k, n in u.tensors.items()},
            modules=tuple(m for u in members for m in u.modules),
            depths=tuple(d for u in members for d in u.depths),
            kv_bytes=sum(u.kv_bytes for u in members),
        )
        for _, members in sorted(groups.items())
    ]


def _needs(units: list[_Unit]) -> list[list[int]]:
    """needs[a][b]: the bytes units[a:b] take on one device."""
    m = len(units)
    needs = [[0] * (m + 1) for _ in range(m + 1)]
    for a in range(m):
        seen: set[Hashable] = set()
        weights = kv = 0
        for b in range(a + 1, m + 1):
            unit = units[b - 1]
            for key, n in unit.tensors.items():
                if key not in seen:
                    seen.add(key)
                    weights += n
            kv += unit.kv_bytes
            needs[a][b] = weights + kv + working_bytes(weights)
    return needs


def _split(needs: list[list[int]], free: list[int]) -> tuple[float, list[tuple[int, int]]]:
    """Contiguous, non-empty runs [a, b) of the units, one per device, that minimize the fullest
    device's needed/free ratio; returns that ratio (<= 1: it fits) and the runs."""
    m, k = len(needs) - 1, len(free)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k)]  # best[i][b]: units[:b] over devices 0..i
    start = [[0] * (m + 1) for _ in range(k)]
    for b in range(1, m + 1):
        best[0][b] = needs[0][b] / max(free[0], 1)
    for i in range(1, k):
        for b in range(i + 1, m + 1):
            for a in range(i, b):
                ratio = max(best[i - 1][a], needs[a][b] / max(free[i], 1))
                if ratio < best[i][b]:
                    best[i][b], start[i][b] = ratio, a
    runs, b = [], m
    for i in range(k - 1, -1, -1):
        a = start[i][b] if i else 0
        runs.append((a, b))
        b = a
    return best[k - 1][m], runs[::-1]


def _placement(
    dtype: str,
    tokens: int,
    strategy: str,
    units: list[_Unit],
    runs: list[tuple[int, int]],
    devices: list[tuple[str, int]],
    forward: list[str],
) -> Placement:
    module_devices: dict[str, str] = {}
    holders: dict[Hashable, list[str]] = {}
    shares = []
    for (device, free), (a, b) in zip(devices, runs, strict=True):
        tensors: dict[Hashable, int] = {}
        depths: list[int] = []
        kv = 0
        for unit in units[a:b]:
            tensors.update(unit.tensors)
            depths += unit.depths
            kv += unit.kv_bytes
            module_devices.update(dict.fromkeys(unit.modules, device))
        copied = sum(n for key, n in tensors.items() if key in holders)
        for key in tensors:
            holders.setdefault(key, []).append(device)
        weights = sum(tensors.values())
        shares.append(DeviceShare(device, free, weights, copied, kv, working_bytes(weights), tuple(sorted(depths))))
    return Placement(
        dtype=dtype,
        context_tokens=tokens,
        strategy=strategy,
        shares=tuple(shares),
        module_devices=module_devices,
        tensor_devices={key: tuple(devs) for key, devs in holders.items()},
        path=tuple(module_devices[m] for m in forward),
    )


def _refusal(best: Placement, devices: Sequence[tuple[str, int]]) -> str:
    what = (
        f"{human_bytes(best.weight_bytes)} of weights in {best.dtype}, {human_bytes(best.kv_bytes)} of KV cache "
        f"for {best.context_tokens:,} tokens, plus working memory"
    )
    if len(devices) == 1:
        share = best.shares[0]
        return (
            f"this merge needs about {human_bytes(share.needed_bytes)} on {share.device} ({what}) "
            f"but only {human_bytes(share.free_bytes)} is free; pick fewer or smaller layers"
        )
    fullest = max(best.shares, key=lambda s: s.needed_bytes / max(s.free_bytes, 1))
    free = ", ".join(f"{name} {human_bytes(n)}" for name, n in devices)
    return (
        f"this merge needs about {human_bytes(best.needed_bytes)} ({what}) but the {len(devices)} devices have "
        f"{free} free; split over {len(best.shares)} of them, {fullest.device} would still need "
        f"{human_bytes(fullest.needed_bytes)}; pick fewer or smaller layers"
    )


def dispatch(model: Any, placement: Placement, *, offload_dir: str | None = None) -> Any:
    """Spread a built model over the placement's devices with accelerate's big-model dispatch: its
    hooks move activations (never the KV cache, which each layer keeps on its own device) from
    module to module. The tensors must already sit where the placement says, so nothing is copied.
    `offload_dir` serves accelerate's `disk` device (the CPU tests' stand-in for a second device)."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    device_map = dict(placement.module_devices)
    _map_remaining(model, "", device_map, placement.input_device)
    model = dispatch_model(
        model,
        device_map=device_map,
        main_device=placement.input_device,
        offload_dir=offload_dir,
        skip_keys=getattr(model, "_skip_keys_device_placement", None),
    )
    # accelerate also hooks every submodule of a mapped module, to move inputs to the device they
    # are already on: about ten Python calls per layer and token. The mapped module's own hook moves
    # them once; offloaded modules keep theirs (they load the weights).
    offloaded = ("disk",) if placement.input_device == "cpu" else ("cpu", "disk")
    for name, device in device_map.items():
        if device not in offloaded:
            for child in model.get_submodule(name).children():
                remove_hook_from_submodules(child)
    return model


def _map_remaining(module: Any, prefix: str, device_map: dict[str, str], device: str) -> None:
    """Put every module that holds no planned tensor (rotary tables, other buffers) on `device`,
    where the forward pass starts."""
    for name, child in module.named_children():
        full = prefix + name
        if full in device_map:
            continue
        if any(m.startswith(full + ".") for m in device_map):
            _map_remaining(child, full + ".", device_map, device)
        else:
            device_map[full] = device
