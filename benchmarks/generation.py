"""Decode speed at batch 1 on a GPU: plain `generate()` against merger.generate.generator, parent against merge.

Makes a random model of Llama-3-8B's shape (bf16, written as safetensors to local disk), builds it
and the merge [0,24)+[16,32) (40 layers, 8 repeated, shared tensors) with merger.build.assemble, and
reports as JSON, for both: the first reply right after the build (on the eager step's CUDA graph,
while the step compiles in the background), another visitor's reply speed during that compile
against its speed alone, then tokens/s of the page's chat path (merger.chat.replies.stream_reply on a
build prepared by merger.runtime.builds.prepare_for_chat: fused projections, the compiled step in a CUDA
graph, text decoded as it streams), greedy and sampled, of plain `generate()` and of
FastGenerator called directly (unfused, then fused), time to first text for a 512-token prompt,
and each speed against the memory-bandwidth bound (weight bytes one step reads / device copy
bandwidth measured in this run); then a second merge of the same depth with its seam moved (its
first reply, its compile, its speed), and the step as a ZeroGPU Space runs it: unfused and
uncompiled, its eager step captured in a CUDA graph against the same step left eager (`zero_gpu_`),
and compiled ahead of time by merger.generate.aot (`aot_`).
Stages run in order of importance and stop starting new ones when the time budget runs low; the
JSON is rewritten after every stage, so a cut-off run still reports what it measured.

    python benchmarks/generation.py [--budget-s 480] [--out DIR] [--only chat_path zero_gpu aot ...]
                                    [--decode-attention grouped|flex|triton] [--step-options JSON]
                                    [--weights DIR]
    python benchmarks/generation.py --smoke   # the same stages on a tiny shape, on the CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merger.build.assemble import assemble, parameter_bytes
from merger.chat.replies import ReplyStats, stream_reply
from merger.errors import exception_line
from merger.generate import attention, generator
from merger.generate.aot import compile_step
from merger.generate.fuse import fuse_projections
from merger.generate.generator import CUDA_CHUNK, FastGenerator
from merger.generate.loop import LOOP, ModelDecoder
from merger.generate.settings import GenerationSettings
from merger.limits import CONTEXT_TOKENS
from merger.plan import Plan, make_plan
from merger.recipe import passthrough
from merger.runtime.builds import Built, prepare_for_chat
from merger.runtime.devices import plan_placement
from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())  # references read as the CLI reads them

LLAMA3_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
# --smoke: every stage on the CPU in seconds, to check the script before spending GPU time
SMOKE_SHAPE = {**LLAMA3_8B_SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128}
SMOKE_SHAPE.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
PARENT = ((0, 32),)
MERGE = ((0, 24), (16, 32))
RESEAMED = ((0, 20), (12, 32))  # the merge's depth (40 layers, 8 repeated) with its seam moved
PAGE_CONTEXT_TOKENS = CONTEXT_TOKENS.value  # the page's builds hold it: both paths attend over one cache size
PROMPT_LEN = 32  # decode-speed prompt
TTFT_PROMPT_LEN = 512
FAST_TOKENS = 256
PLAIN_TOKENS = 64


SETUP_STAGES = ("bandwidth", "write_weights", "build", "fuse")


class Report:
    def __init__(self, out: Path, budget_s: float, only: Sequence[str] = ()) -> None:
        self.data: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "generation.json"
        self.deadline = time.monotonic() + budget_s
        self.only = tuple(only)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))

    def stage(self, name: str, fn: Callable[[], Any], *, needs_s: float = 0.0) -> Any:
        """Run one stage unless too little time is left (or --only leaves it out); a failure is
        recorded, not fatal."""
        if self.only and name not in SETUP_STAGES and not name.startswith(self.only):
            return None
        if self.left() < needs_s:
            self.data.setdefault("skipped", []).append(f"{name} (needs ~{needs_s:.0f} s, {self.left():.0f} s left)")
            self.save()
            return None
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # keep the other stages' numbers
            self.data.setdefault("errors", {})[name] = exception_line(exc)
            traceback.print_exc()
            result = None
        self.data.setdefault("stage_seconds", {})[name] = round(time.monotonic() - start, 1)
        self.save()
        print(f"[{name}] {time.monotonic() - start:.1f} s, {self.left():.0f} s left", flush=True)
        return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, numel: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:  # after warm-up
            times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def write_parent(folder: Path, shape: dict[str, Any], device: str) -> None:
    """Random bf16 weights of `shape`, one safetensors shard per layer."""
    folder.mkdir(parents=True)
    LlamaConfig(**shape, dtype="bfloat16").save_pretrained(folder)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    h, ffn, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    meta = {"format": "pt"}
    save_file(
        {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": ones(h), "lm_head.weight": rand(vocab, h)},
        folder / "model-head.safetensors",
        metadata=meta,
    )
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shard = {
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(ffn, h),
            p + "mlp.up_proj.weight": rand(ffn, h),
            p + "mlp.down_proj.weight": rand(h, ffn),
        }
        save_file(shard, folder / f"model-layer-{layer:02d}.safetensors", metadata=meta)


def fast_scratch() -> Path | None:
    """Where 16 GB of weights are quick to write and read: memory (tmpfs) where it has room."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and shutil.disk_usage(shm).free > 24e9 else None


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: each depth's layer weights (a repeated layer is read
    again), the final norm and the head; of the input embedding table only one row."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.nbytes for _, p in model.named_parameters(remove_duplicate=False))
    return total - embed.nbytes if embed is not head else total - head.nbytes


def plain_tok_s(model, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> float:
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    model.generate(ids, **settings)  # warm-up (a static cache compiles for this length here)
    sync(model.device.type)
    start = time.perf_counter()
    model.generate(ids, **settings)
    sync(model.device.type)
    return new_tokens / (time.perf_counter() - start)


def fast_decode(fast: FastGenerator, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> dict[str, float]:
    """Tokens/s between the first and the last token, as a streaming reader sees them."""
    runs = []
    for _ in range(3):
        sync(fast.device.type)
        stamps = [time.perf_counter()]
        for _ in fast.generate(ids, max_new_tokens=new_tokens, **kwargs):
            stamps.append(time.perf_counter())
        runs.append(((new_tokens - 1) / (stamps[-1] - stamps[1]), new_tokens / (stamps[-1] - stamps[0])))
    return {"decode_tok_s": round(max(r[0] for r in runs), 1), "with_prefill_tok_s": round(max(r[1] for r in runs), 1)}


def ttft_ms(fast: FastGenerator, ids: torch.Tensor) -> float:
    times = []
    for _ in range(6):
        sync(fast.device.type)
        start = time.perf_counter()
        stream = fast.generate(ids, max_new_tokens=2)
        next(stream)
        times.append((time.perf_counter() - start) * 1e3)
        stream.close()
    return round(statistics.median(times[1:]), 1)


def word_tokenizer(vocab_size: int):
    """A tokenizer whose every id is one word ("w0" .. "wN"), so random models' ids decode to text
    and a prompt of n words is n tokens; no chat template (plain completion, as for a base model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def words(n: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(1000, 100000, (n,), generator=gen).tolist())


def merge_over_expected(merge_tok_s: float, parent_tok_s: float) -> float:
    """The merge's speed over the parent's scaled by their depths (1.0: a repeated layer costs
    what a parent layer does)."""
    merge_layers = sum(end - start for start, end in MERGE)
    return round(merge_tok_s / (parent_tok_s * LLAMA3_8B_SHAPE["num_hidden_layers"] / merge_layers), 3)


def first_difference(a: list, b: list) -> int | None:
    """Where two runs first part (None: they agree; a length if one is a prefix of the other)."""
    ends = None if len(a) == len(b) else min(len(a), len(b))
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), ends)


def chat_reply(built: Built, prompt: str, **settings: Any) -> tuple[list[str], ReplyStats]:
    """One reply through the page's path: the streamed texts and the stats shown under it."""
    stats = ReplyStats()
    history = [{"role": "user", "content": prompt}]
    pieces = list(stream_reply(built, history, GenerationSettings(**settings), None, stats))
    return pieces, stats


GREEDY_REPLY = dict(temperature=0.0, max_new_tokens=FAST_TOKENS)
SAMPLED_REPLY = dict(
    temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, repetition_penalty=1.1, seed=5, max_new_tokens=FAST_TOKENS
)
GREEDY_SETTINGS = dict(
    temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0
)  # as FastGenerator.start takes them
SAMPLED_SETTINGS = dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, repetition_penalty=1.1)


def first_reply(built: Built, prepare: Callable[[Built], Any] = prepare_for_chat) -> dict[str, Any]:
    """The page's first reply right after a build: `prepare`, then a 16-token reply, timed from
    the build's end, with the step that served it and where its time went."""
    start = time.perf_counter()
    prepare(built)
    result: dict[str, Any] = {"prepare_s": round(time.perf_counter() - start, 2), "compiled": built.decoder.compiled}
    first = chat_reply(built, words(PROMPT_LEN, 1), temperature=0.0, max_new_tokens=16)[1]
    result["first_reply_after_build_s"] = round(time.perf_counter() - start, 2)
    result["first_reply_served_by"] = first.served_by()
    # where the first reply's time goes: its prompt's pass (the process's first prefill loads
    # cuBLAS and the attention's kernels), then its steps
    result["first_reply_first_text_s"] = round(first.first_text_s or 0.0, 2)
    result["first_reply_rest_s"] = round(first.seconds - (first.first_text_s or 0.0), 2)
    return result


def measure_chat_path(
    name: str,
    built: Built,
    bound: float,
    prepare: Callable[[Built], Any] = prepare_for_chat,
    while_compiling: Callable[[Built], dict[str, Any]] | None = None,
) -> dict:
    """The page's path: a build prepared for chat (`prepare`: fused, its eager step captured and its
    step compiled in the background), replies through stream_reply; speeds and the step that
    served each as the reply's stats show them. The first reply right after the build, this
    build's replies and (`while_compiling`) another build's while its step compiles, then the
    compiled step's speed, first text and sampled replies."""

    reply = functools.partial(chat_reply, built)
    seconds: dict[str, float] = {}  # wall time of each part: a recompile shows up as a slow part
    lap = start = time.perf_counter()

    def part(name: str) -> None:
        nonlocal lap
        seconds[name] = round(time.perf_counter() - lap, 1)
        lap = time.perf_counter()

    result = first_reply(built, prepare)
    decoder = built.decoder
    part("prepare_and_first_reply")
    if decoder.compiling_for() is not None:  # this build's own replies meanwhile
        own = reply(words(PROMPT_LEN, 1), **GREEDY_REPLY)[1]
        result["while_compiling"] = {"decode_tok_s": round(own.tokens_per_s, 1), "served_by": own.served_by()}
        if while_compiling is not None:
            result["while_compiling"].update(while_compiling(built))
    part("replies_while_compiling")
    decoder.wait_compiled()
    result["compile_ready_after_build_s"] = round(time.perf_counter() - start, 1)
    result["compile_error"] = built.decoder._shared and built.decoder._shared.compile_error
    part("rest_of_compile")
    greedy = [reply(words(PROMPT_LEN, 1), **GREEDY_REPLY)[1] for _ in range(3)]
    part("greedy_replies")
    best = max(greedy, key=lambda s: s.tokens_per_s)
    result.update(decode_tok_s=round(best.tokens_per_s, 1), new_tokens=best.new_tokens)
    result["greedy_tok_s_each"] = [round(s.tokens_per_s, 1) for s in greedy]
    result["greedy_reply_s_each"] = [round(s.seconds, 3) for s in greedy]
    result["greedy_first_text_ms_each"] = [round((s.first_text_s or 0.0) * 1e3, 1) for s in greedy]
    result["served_by"] = best.served_by()
    result["fraction_of_bound"] = round(best.tokens_per_s / bound, 3)
    ttft = [reply(words(TTFT_PROMPT_LEN, 2), temperature=0.0, max_new_tokens=2)[1].first_text_s for _ in range(6)]
    result[f"first_text_ms_{TTFT_PROMPT_LEN}"] = round(statistics.median(ttft[1:]) * 1e3, 1)
    part("first_text_replies")
    texts = [reply(words(PROMPT_LEN, 3), **SAMPLED_REPLY) for _ in range(3)]
    result["sampling_first_different_word"] = first_difference(texts[0][0][-1].split(), texts[1][0][-1].split())
    result["sampling_decode_tok_s"] = round(max(t[1].tokens_per_s for t in texts), 1)
    result["sampling_new_tokens"] = [t[1].new_tokens for t in texts]
    result["sampled_over_greedy"] = round(result["sampling_decode_tok_s"] / result["decode_tok_s"], 3)
    result["sampling_served_by"] = texts[0][1].served_by()
    part("sampled_replies")
    result["seconds"] = seconds
    print(f"{name} chat path: {result}", flush=True)
    return result


def replies_during_compile(other: Built, alone: dict[str, Any], replies: int = 6) -> Callable[[Built], dict]:
    """`while_compiling` for measure_chat_path: `other`'s (a compiled build's) greedy replies while the
    fresh build's step compiles, against `alone`, its chat path's greedy replies with nothing compiling."""

    def measure(fresh: Built) -> dict[str, Any]:
        during: list[Any] = []
        for _ in range(replies):
            stats = chat_reply(other, words(PROMPT_LEN, 4), **GREEDY_REPLY)[1]
            if fresh.decoder.compiling_for() is None:
                break  # ended after the compile: not a reply during it
            during.append(stats)
        result: dict[str, Any] = {}
        for key, alone_key, of in (
            ("tok_s", "greedy_tok_s_each", lambda s: round(s.tokens_per_s, 1)),
            ("reply_s", "greedy_reply_s_each", lambda s: round(s.seconds, 3)),
            ("first_text_ms", "greedy_first_text_ms_each", lambda s: round((s.first_text_s or 0.0) * 1e3, 1)),
        ):
            result[f"other_visitor_{key}_during_compile"] = [of(s) for s in during]
            result[f"other_visitor_{key}_alone"] = alone[alone_key]
            if during:  # medians, during / alone
                ratio = statistics.median(map(of, during)) / statistics.median(alone[alone_key])
                result[f"other_visitor_{key}_during_over_alone"] = round(ratio, 3)
        return result

    return measure


def step_anatomy(fast: FastGenerator, ids: torch.Tensor, steps: int = 64) -> dict[str, Any]:
    """Where a decode step's time goes. Steps queued back to back by hand (greedy, then sampled):
    host time to queue one, device time per step (at the prompt's end and late in the window), the
    kernels that take it. Then the real loop (`generate`, prefill included): wall time per token
    against its kernels' time per token (the difference is time the GPU waited for the host), and
    the host-side calls that take its time."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof, per: int) -> list[tuple[str, float]]:
        found = [(e.key, e.self_device_time_total / per) for e in prof.key_averages() if e.self_device_time_total > 0]
        return sorted(found, key=lambda k: -k[1])

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def run(at: int | None = None, settings: dict[str, Any] = GREEDY_SETTINGS) -> tuple[float, float]:
        """Steps from cache slot `at` on (the slots between the prompt and it hold zeros: the
        kernels do the same work as over a real long context)."""
        mode = fast.start(ids, **settings)
        if at is not None:
            fast.state.position.fill_(at)
        torch.cuda.synchronize()
        first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        first.record()
        for i in range(steps):
            if i % CUDA_CHUNK == 0:
                fast.draw_ahead(mode)  # as generate() does: a sampled chunk's draws
            fast.advance(mode)
        queued = time.perf_counter() - start
        last.record()
        torch.cuda.synchronize()
        return queued / steps * 1e3, first.elapsed_time(last) / steps

    @torch.inference_mode()
    def loop() -> float:
        start = time.perf_counter()
        list(fast.generate(ids, max_new_tokens=FAST_TOKENS))
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / FAST_TOKENS * 1e3

    run()
    host_ms, device_ms = run()
    run(settings=SAMPLED_SETTINGS)
    _, sampled_device_ms = run(settings=SAMPLED_SETTINGS)
    late = fast.context_tokens * 3 // 4  # a long chat: attention that reads only the slots in use costs more here
    _, late_device_ms = run(late)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    step_kernels = kernels(prof, steps)
    loop()
    loop_ms = loop()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loop()
    loop_kernels = kernels(prof, FAST_TOKENS)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loop()
    host_calls = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        "host_ms_to_queue_a_step": round(host_ms, 3),
        "device_ms_per_step": round(device_ms, 3),
        "sampled_device_ms_per_step": round(sampled_device_ms, 3),
        "serving": fast.serving,
        f"device_ms_per_step_from_slot_{late}": round(late_device_ms, 3),
        "kernel_ms_per_step": round(sum(us for _, us in step_kernels) / 1e3, 3),
        "top_kernels_us_per_step": {name[:90]: round(us, 1) for name, us in step_kernels[:14]},
        "loop_wall_ms_per_token": round(loop_ms, 3),
        "loop_kernel_ms_per_token": round(sum(us for _, us in loop_kernels) / 1e3, 3),
        "loop_top_kernels_us_per_token": {name[:90]: round(us, 1) for name, us in loop_kernels[:14]},
        "loop_host_calls_us_per_token": {
            e.key[:60]: [round(e.self_cpu_time_total / FAST_TOKENS, 1), round(e.count / FAST_TOKENS, 2)]
            for e in host_calls
        },
    }


def measure_fast(name: str, model, ids: torch.Tensor, long_ids: torch.Tensor, bound: float, label: str) -> dict:
    fast = FastGenerator(model, context_tokens=PAGE_CONTEXT_TOKENS)
    start = time.perf_counter()
    list(fast.generate(ids, max_new_tokens=16))  # captures the eager step and starts the compile
    fast.wait_compiled()
    compile_s = time.perf_counter() - start
    speed = fast_decode(fast, ids, FAST_TOKENS)
    result = {
        "compile_s": round(compile_s, 1),
        "compile_error": fast.compile_error,
        "serving": fast.serving,
        **speed,
        "fraction_of_bound": round(speed["decode_tok_s"] / bound, 3),
        f"ttft_ms_{TTFT_PROMPT_LEN}": ttft_ms(fast, long_ids),
    }
    greedy = list(fast.generate(ids, max_new_tokens=32))
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    result["greedy_first_token_unlike_generate"] = first_difference(greedy, plain)
    settings = dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, seed=5)
    first = list(fast.generate(ids, max_new_tokens=64, **settings))
    again = list(fast.generate(ids, max_new_tokens=64, **settings))
    result["sampling_first_different_token"] = first_difference(first, again)
    result["sampling_decode_tok_s"] = fast_decode(fast, ids, FAST_TOKENS, **settings)["decode_tok_s"]
    if fast.graphed:
        try:
            result["step_anatomy"] = step_anatomy(fast, ids)
        except Exception as exc:  # a diagnosis: never worth the stage's other numbers
            result["step_anatomy"] = repr(exc)
    stats = torch._dynamo.utils.counters
    result["dynamo_graphs_so_far"] = stats["stats"]["unique_graphs"]
    result["dynamo_graph_breaks_so_far"] = sum(stats["graph_break"].values())
    print(f"{name} {label}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the script only")
    parser.add_argument("--weights", type=Path, help="the random parent's folder: written there if missing, kept")
    parser.add_argument("--only", nargs="+", default=(), help="run only the stages whose names start so")
    parser.add_argument("--decode-attention", choices=("grouped", "flex", "triton"), default=attention.DECODE_KERNEL)
    parser.add_argument(
        "--step-options",
        type=json.loads,
        default=generator.STEP_COMPILE["options"],
        help="inductor options for the compiled step, as JSON (e.g. '{\"triton.cudagraphs\": true}': no tuning)",
    )
    args = parser.parse_args()
    import transformers

    device = "cpu" if args.smoke else "cuda"
    shape = SMOKE_SHAPE if args.smoke else LLAMA3_8B_SHAPE
    assert args.smoke or torch.cuda.is_available(), "needs a CUDA GPU (or --smoke)"
    report = Report(args.out, args.budget_s, args.only)
    data = report.data
    attention.DECODE_KERNEL = data["decode_attention"] = args.decode_attention
    generator.STEP_COMPILE = {"options": args.step_options}
    data["step_options"] = args.step_options
    data["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    data["torch"], data["transformers"] = torch.__version__, transformers.__version__
    data["shape"] = "tiny (smoke)" if args.smoke else "Llama-3-8B (random bf16 weights), batch 1"
    data["recipe"] = "merge: [0,24)+[16,32) of the parent, 40 layers, 8 repeated, tensors shared"
    bandwidth = report.stage("bandwidth", lambda: copy_bandwidth(device, 1 << (20 if args.smoke else 30)))
    data["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)  # 2 GiB on the GPU: far past its L2

    tmp = Path(tempfile.mkdtemp(prefix="gen-bench-", dir=fast_scratch()))
    ref = str(args.weights or tmp / "parent")
    data["weights_on"] = ref
    if not (Path(ref) / "config.json").is_file():
        report.stage("write_weights", lambda: write_parent(Path(ref), shape, device))
    models: dict[str, Any] = {}
    ranges = {"parent": PARENT, "merge": MERGE}

    def splice(layer_ranges: Sequence[tuple[int, int]]) -> Plan:
        return make_plan(passthrough(*[(ref, a, b) for a, b in layer_ranges]), ANY_PATH)

    def as_built(plan: Plan, model) -> Built:
        """A build as the page holds it, for the chat path."""
        tokenizer = word_tokenizer(shape["vocab_size"])
        return Built(plan, model, tokenizer, device, 0.0, placement=plan_placement(plan, device))

    def assemble_bf16(plan: Plan) -> Any:
        model = assemble(plan, device=device, dtype="bfloat16")
        model.generation_config.pad_token_id = shape["eos_token_id"]  # generate() asks for one
        return model

    def build_parent() -> Any:
        return assemble_bf16(splice(PARENT))

    def build() -> None:
        models["parent"] = build_parent()
        models["merge"] = assemble_bf16(splice(MERGE))
        merge = models["merge"].model.layers
        same = merge[24].mlp.up_proj.weight.data_ptr() == merge[16].mlp.up_proj.weight.data_ptr()
        data["merge_shares_repeated_layers"] = same
        data["param_bytes"] = {k: parameter_bytes(m) for k, m in models.items()}

    report.stage("build", build)
    ids = torch.randint(0, shape["vocab_size"], (1, PROMPT_LEN), device=device)
    long_ids = torch.randint(0, shape["vocab_size"], (1, TTFT_PROMPT_LEN), device=device)
    bounds = {}
    for name, model in models.items():
        per_token = weight_bytes_per_token(model)
        bounds[name] = bandwidth / per_token
        data[name] = {"weight_bytes_per_token": per_token, "bound_tok_s": round(bounds[name], 1)}

    def plain(name: str) -> None:
        tok_s = plain_tok_s(models[name], ids, PLAIN_TOKENS)
        data[name]["generate_tok_s"] = round(tok_s, 1)
        data[name]["generate_fraction_of_bound"] = round(tok_s / bounds[name], 3)

    def fuse_all() -> None:
        data["fused_modules"] = {k: fuse_projections(m) for k, m in models.items()}
        data["param_bytes_after_fusing"] = {k: parameter_bytes(m) for k, m in models.items()}

    def fast(name: str) -> None:
        label = "fast_fused" if data.get("fused_modules", {}).get(name) else "fast"
        data[name][label] = measure_fast(name, models[name], ids, long_ids, bounds[name], label)

    def unfused_parent() -> None:
        # a fresh build of the parent, for fusing's A/B on the same path
        data["parent"]["fast"] = measure_fast("parent", build_parent(), ids, long_ids, bounds["parent"], "fast")

    def static(name: str) -> None:
        tok_s = plain_tok_s(models[name], ids, PLAIN_TOKENS, cache_implementation="static")
        data[name]["generate_static_tok_s"] = round(tok_s, 1)

    def chat_path(name: str) -> None:
        built = as_built(splice(ranges[name]), models[name])
        while_compiling = None
        if "parent" in prepared:  # a second visitor, whose build is compiled, replies meanwhile
            while_compiling = replies_during_compile(prepared["parent"], data["parent"]["chat_path"])
        data[name]["chat_path"] = measure_chat_path(name, built, bounds[name], while_compiling=while_compiling)
        fast = built.decoder._shared
        if fast is not None and fast.graphed:  # on the loop's thread: nothing else runs meanwhile
            anatomy = LOOP.call(lambda: step_anatomy(fast, ids))
            data[name]["chat_path"]["step_anatomy"] = anatomy
            print(f"{name} step anatomy: {anatomy}", flush=True)
        prepared[name] = built

    def alternating() -> None:
        """Both prepared models' greedy replies in turn, three rounds: a drift of the device over the
        run (clocks, heat) then touches both alike, unlike one model's stage after the other's."""
        best = dict.fromkeys(prepared, 0.0)
        for _ in range(3):
            for name, built in prepared.items():
                stats = chat_reply(built, words(PROMPT_LEN, 1), temperature=0.0, max_new_tokens=FAST_TOKENS)[1]
                best[name] = max(best[name], stats.tokens_per_s)
        for name, tok_s in best.items():
            data[name]["chat_path"]["alternating_decode_tok_s"] = round(tok_s, 1)
            data[name]["chat_path"]["alternating_fraction_of_bound"] = round(tok_s / bounds[name], 3)
        if len(best) == 2:
            data["alternating_merge_over_parent_x_32_40"] = merge_over_expected(best["merge"], best["parent"])

    def reseamed() -> None:
        """A merge of the first one's depth with its seam moved, as a visitor trying seams builds it:
        other layers repeat, so it is another structure with its own compile (2026-12-02 run f,
        before structures told repeats apart: it shared the step's code, yet its first reply waited
        73.9 s, a compile's length)."""
        plan = splice(RESEAMED)
        built = as_built(plan, assemble_bf16(plan))
        result = measure_chat_path("reseamed merge", built, bounds["merge"])
        data["merge"]["chat_path_reseamed"] = {**result, "reuses_compiled_step": built.decoder.reuses_compiled_step}
        built.decoder.close()

    def zero_gpu(name: str) -> None:
        """The step as a ZeroGPU worker runs it without AOT: a fresh (unfused) build, uncompiled,
        in the caller's thread; its eager step captured in a CUDA graph, then left eager."""
        plan = splice(ranges[name])
        built = as_built(plan, assemble_bf16(plan))
        runs = {}
        for way in ("graphed", "eager"):
            built._decoder = ModelDecoder(
                built.model, context_tokens=built.context_tokens, threaded=False, compile=False
            )
            fast = built._decoder._shared  # None on the CPU (--smoke): eager there
            if fast is not None:
                fast.graphed = fast.graphed and way == "graphed"
            runs[way] = measure_chat_path(f"{name} on ZeroGPU, {way}", built, bounds[name], prepare=lambda b: b.decoder)
            runs[way]["serving_at_end"] = fast.serving if fast is not None else None
            runs[way]["capture_error"] = fast and fast.compile_error
        runs["graphed_over_eager"] = round(runs["graphed"]["decode_tok_s"] / runs["eager"]["decode_tok_s"], 2)
        data[name]["zero_gpu"] = runs
        built.decoder.close()

    def ahead_of_time(name: str) -> None:
        """The step as a ZeroGPU Space runs it: a fresh (unfused) build, its step exported and
        compiled ahead of time (timed), then loaded with its weights (in prepare_s) and replying."""
        plan = splice(ranges[name])
        built = as_built(plan, assemble_bf16(plan))
        start = time.perf_counter()
        built.aot_step = compile_step(built.model, built.context_tokens)
        compile_s = round(time.perf_counter() - start, 1)
        result = measure_chat_path(f"{name} ahead of time", built, bounds[name], prepare=lambda b: b.decoder)
        shared = built.decoder._shared
        data[name]["aot"] = {
            **result,
            "compile_s": compile_s,
            "package_mb": round(len(built.aot_step.package) / 1e6, 1),
            "ahead_of_time": shared is not None and shared.ahead_of_time,
            "load_error": shared and shared.compile_error,
        }
        built.decoder.close()

    prepared: dict[str, Built] = {}

    def first_reply_alone(name: str) -> None:
        built = as_built(splice(ranges[name]), models[name])
        data[name]["first_reply"] = first_reply(built)
        built.decoder.close()

    # in order of importance: the page's path on both is the point; the rest only if time is left
    report.stage("fuse", fuse_all)
    if any(only.startswith("first_reply") for only in args.only):
        # a fresh process's first reply in seconds, without the minutes of the rest; only when asked
        # for by name, since the first reply in a process is the one that pays its first calls
        report.stage("first_reply_parent", lambda: first_reply_alone("parent"))
    for name in models:
        report.stage(f"chat_path_{name}", lambda n=name: chat_path(n), needs_s=100)
    if prepared:
        report.stage("chat_path_alternating", alternating, needs_s=20)
    if "merge" in prepared:
        report.stage("chat_path_reseamed", reseamed, needs_s=60)
    for built in prepared.values():
        built.decoder.close()
    for name in models:
        report.stage(f"generate_{name}", lambda n=name: plain(n), needs_s=30)
    # on the decode loop's thread, as the page decodes
    for name in models:
        report.stage(f"fast_{name}", lambda n=name: LOOP.call(lambda: fast(n)), needs_s=100)
    report.stage("fast_unfused_parent", lambda: LOOP.call(unfused_parent), needs_s=120)
    if not args.smoke:  # compiling generate() on the CPU would take minutes
        report.stage("generate_static_parent", lambda: LOOP.call(lambda: static("parent")), needs_s=90)

    # merge against parent on the same variant: the page's path, else fused where both have it
    variants = ("chat_path", "fast_fused", "fast")
    variant = next((v for v in variants if all(v in data.get(n, {}) for n in models)), None)
    if variant and len(models) == 2:
        parent, merge = data["parent"][variant], data["merge"][variant]
        during = merge.get("while_compiling", {})
        data["goals"] = {
            "variant": variant,
            "fraction_of_bound_parent (>= 0.8)": parent["fraction_of_bound"],
            "fraction_of_bound_merge (>= 0.8)": merge["fraction_of_bound"],
            "merge_over_parent_x_32_40 (0.95..1.05)": merge_over_expected(
                merge["decode_tok_s"], parent["decode_tok_s"]
            ),
            f"first_token_ms_{TTFT_PROMPT_LEN}_parent (< 100)": parent.get(
                f"ttft_ms_{TTFT_PROMPT_LEN}", parent.get(f"first_text_ms_{TTFT_PROMPT_LEN}")
            ),
            f"first_token_ms_{TTFT_PROMPT_LEN}_merge (< 100)": merge.get(
                f"ttft_ms_{TTFT_PROMPT_LEN}", merge.get(f"first_text_ms_{TTFT_PROMPT_LEN}")
            ),
            "first_reply_after_build_s_parent (< 3)": parent.get("first_reply_after_build_s"),
            "first_reply_after_build_s_merge (< 3)": merge.get("first_reply_after_build_s"),
            "sampled_over_greedy_parent (>= 0.95)": parent.get("sampled_over_greedy"),
            "sampled_over_greedy_merge (>= 0.95)": merge.get("sampled_over_greedy"),
            "other_visitor_tok_s_during_compile_over_alone (>= 0.9)": during.get(
                "other_visitor_tok_s_during_over_alone"
            ),
            "other_visitor_reply_s_during_compile_over_alone (<= 1.1)": during.get(
                "other_visitor_reply_s_during_over_alone"
            ),
        }
    report.save()
    for name in models:
        report.stage(f"zero_gpu_{name}", lambda n=name: zero_gpu(n), needs_s=120)
    # last, after the goals are saved: on the H200 (torch 2.11) the load check refuses the package
    # (AOTInductor's loader crashes there), which the stage records as its error
    for name in models:
        report.stage(f"aot_{name}", lambda n=name: ahead_of_time(n), needs_s=150)
    shutil.rmtree(tmp)
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
