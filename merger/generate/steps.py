"""The one-token decode step: the static KV cache it writes, the device state it reads and writes
(`DecodeState`), its forms (eager, compiled, compiled ahead of time; each captured in a CUDA graph
on one GPU) and the compiled step's code shared by models of one structure."""

from __future__ import annotations

import json
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from merger.errors import exception_line
from merger.generate.sampling import SamplingState

GREEDY, SAMPLED = "greedy", "sampled"  # a step's two forms: argmax, or the request's sampling settings

# What served a reply's tokens, as its status says
EAGER_STEP = "eager step"
COMPILED_STEP = "compiled step"
AHEAD_OF_TIME_STEP = "step compiled ahead of time"
IN_A_CUDA_GRAPH = " in a CUDA graph"


def static_cache(config, context_tokens: int) -> Cache:
    """One full-length static layer per depth, for sliding-window layers too: the model's masks
    already limit what those see, while transformers' sliding static layer branches on a Python
    counter, which a compiled step would guard on and recompile for."""
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[StaticLayer(max_cache_len=context_tokens) for _ in range(layers)])


def allocated_static_cache(model: nn.Module, context_tokens: int, *, as_prefill: bool = False) -> Cache:
    """`static_cache`, its tensors allocated now (zeros) on the model's device and in its dtype,
    rather than by the first prefill: a step compiled ahead of time takes them as inputs. With
    `as_prefill`, the keys and values are inference tensors, as a prefill makes them (a compiled
    step guards on that)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    cache = static_cache(model.config, context_tokens)
    with torch.inference_mode(as_prefill):
        cache.early_initialization(1, config.num_key_value_heads, head_dim, parameter.dtype, parameter.device)
    return cache


@dataclass
class StepInputs:
    """What the one-token step reads besides its token and position: the model and its KV cache."""

    model: nn.Module
    cache: Cache


def forward_one(inputs: StepInputs, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Logits [1, V] for one token [1, 1] at position [1, 1]; writes its keys and values."""
    out = inputs.model(input_ids=token, position_ids=position, past_key_values=inputs.cache, use_cache=True)
    return out.logits[:, -1, :]


Forward = Callable[[StepInputs, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeState:
    """Everything a decode step reads and writes besides the model and its cache, at fixed
    addresses, so a step captured in a CUDA graph reads the last token and writes the next one itself:
    the host only replays it, and reads `tokens` back once a chunk."""

    def __init__(self, vocab: int, max_tokens: int, chunk: int, device: torch.device) -> None:
        with torch.inference_mode():  # as the cache: a compiled step guards on it
            self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the last token
            self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # its cache slot
            self.tokens = torch.zeros(max_tokens, dtype=torch.long, device=device)  # the request's new tokens
            self.count = torch.zeros(1, dtype=torch.long, device=device)  # how many so far
            self.sampling = SamplingState(vocab, chunk, device)

    def take(self, token: torch.Tensor) -> None:
        """`token` [1] is the next one: the step's input, and the request's next new token."""
        self.token.copy_(token.view(1, 1))
        self.tokens.index_copy_(0, self.count, token)
        self.count.add_(1)

    def pick(self, logits: torch.Tensor, mode: str) -> None:
        """Choose the next token from logits [1, V] (GREEDY: argmax; SAMPLED: the request's settings)."""
        self.take(logits.argmax(dim=-1) if mode == GREEDY else self.sampling.pick(logits))


def decode(forward: Forward, inputs: StepInputs, state: DecodeState, mode: str) -> torch.Tensor:
    """One step on the device: the token after `state.token`, into `state`. Returns the logits."""
    logits = forward(inputs, state.token, state.position)
    state.position.add_(1)
    state.pick(logits, mode)
    return logits


@dataclass
class Step:
    """A decode step (`forward` then the pick) and, on one GPU, its CUDA graph for each mode used so
    far (None for a mode whose capture failed: that mode runs eagerly)."""

    forward: Forward
    kind: str  # EAGER_STEP, COMPILED_STEP or AHEAD_OF_TIME_STEP
    graphs: dict[str, torch.cuda.CUDAGraph | None] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # each graph's output, rewritten per replay

    def form(self, mode: str, graphed: bool) -> str:
        """What runs `mode` (on one GPU, `graphed`: a graph unless its capture failed)."""
        return self.kind + (IN_A_CUDA_GRAPH if graphed and self.graphs.get(mode, True) is not None else "")


@contextmanager
def capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> Iterator[None]:
    """Record the block's work on `stream` into `graph`, running nothing. torch.cuda.graph would
    first synchronize the device, collect garbage and empty the allocator's cache: a pause for every
    thread's replies. Thread-local: other threads keep using the GPU meanwhile."""
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()


def capture_step(
    step: Step, inputs: StepInputs, state: DecodeState, mode: str, stream: torch.cuda.Stream
) -> str | None:
    """Capture `step` in `mode` in a CUDA graph on `stream` (into step.graphs, its logits into
    step.logits), reading and writing `inputs` and `state` where they are now; None, or why it
    failed (a host sync or a host-to-device copy inside the step): the mode then runs eagerly."""
    graph = torch.cuda.CUDAGraph()
    try:
        with capturing(graph, stream):
            logits = decode(step.forward, inputs, state, mode)
    except Exception as exc:
        step.graphs[mode] = None
        return exception_line(exc)
    step.graphs[mode], step.logits[mode] = graph, logits
    return None


# Dynamo keeps a function's compiled entries on its code object, keeps dead models' entries there,
# and past `recompile_limit` (8) entries runs that code eagerly without a word: the ninth model
# structure a long-lived app builds would decode at eager speed. So each structure gets its own
# copy of the step's code: builds of one structure (other seams, the same depth and shapes) share
# its compiled step, every new structure compiles, and a structure's entries are dropped once no
# generator uses it.
_STEP_CODES: weakref.WeakValueDictionary[str, types.FunctionType] = weakref.WeakValueDictionary()
_STEP_CODES_LOCK = threading.Lock()


def model_structure(model: nn.Module) -> str:
    """What a compiled step of `model` depends on: its class, dtype and device, its config (the
    values its forward branches on), its module tree (depth, fused projections, shapes) and which
    of its tensors are one (duplicated layers, a tied head); not its name or weights, which the
    step takes as inputs."""
    parameter = next(model.parameters())
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    config_text = json.dumps(config, sort_keys=True, default=str)
    shared = " ".join(shared_tensors(model))
    return f"{type(model).__qualname__} {parameter.dtype} {parameter.device} {config_text} {model} shared: {shared}"


def shared_tensors(model: nn.Module) -> list[str]:
    """Each parameter or buffer that is an earlier one's tensor, as "name=first_name". A compiled
    step takes such a tensor as one input: a step compiled where layers 24-31 repeat 16-23 would
    read the wrong weights for a merge that repeats other layers (and dynamo recompiles for it)."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    shared = []
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))  # the shape tells a fused matrix from its first part
        if key in first:
            shared.append(f"{name}={first[key]}")
        else:
            first[key] = name
    return shared


def step_code_for(model: nn.Module) -> types.FunctionType:
    """`forward_one` under a code object shared by the models of `model`'s structure
    (`model_structure`). `compiled_once` tells whether a compiled step of it has run."""
    structure = model_structure(model)
    with _STEP_CODES_LOCK:
        step = _STEP_CODES.get(structure)
        if step is None:
            base = forward_one
            code = base.__code__.replace()  # a new code object, the same bytecode
            step = types.FunctionType(code, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
            step.compiled_once = False
            weakref.finalize(step, _drop_compiled, code)
            _STEP_CODES[structure] = step
        return step


def _drop_compiled(code: types.CodeType) -> None:
    """Free the compiled entries dynamo keeps on `code` (they hold the compiled graphs, and outlive
    the function otherwise). A private torch function: where it is missing, they stay."""
    reset = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
    if reset is not None:
        reset(code)
