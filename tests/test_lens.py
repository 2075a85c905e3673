"""The residual-stream lens against direct computations from every hidden state (plain torch)."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F

import merger.build.assemble
from merger.__main__ import main
from merger.build.assemble import assemble
from merger.lens.capture import MERGE, ResidualRecorder, TokenChunks, capture, point_labels, tokenize
from merger.lens.plots import (
    angular_distance_figure,
    block_influence_figure,
    recurrence_figure,
    seam_scores_figure,
    suggestions_figure,
)
from merger.lens.seams import score_seams
from merger.lens.search import (
    duplication_drift,
    duplication_perplexities,
    duplication_recipe,
    perplexity,
    rank_duplications,
    recurrence_recipe,
    recurrence_sweep,
    suggest_duplications,
)
from merger.plan import make_plan
from merger.recipe import passthrough
from merger.runtime import builds, devices
from merger.runtime.builds import load_tokenizer

from refs import ANY_PATH
from tiny import with_dtype

ROOT = Path(__file__).parent.parent
TEXT = (
    "The quick brown fox jumps over the lazy dog. Frankenmerges stack layers of transformer models. "
    "Hello! How are you today? I am fine, thank you. The dog did not mind the fox at all. "
) * 3
HELDOUT = "How are you? The lazy fox stacks models, and the quick dog is fine today. Thank you! " * 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spinning made small ops up to ~200x slower; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_chunks(lengths, prefix_len=1, seed=0) -> TokenChunks:
    """Chunks of random ids; the first `prefix_len` ids stand for a BOS the statistics must skip."""
    g = torch.Generator().manual_seed(seed)
    return TokenChunks(tuple(torch.randint(0, 120, (n,), generator=g) for n in lengths), prefix_len, "random")


CHUNKS = random_chunks([40, 40, 40, 23])  # an odd tail chunk, and batches of 2 split 2 + 1 + 1


def build(ref, *ranges, dtype=None):
    return assemble(make_plan(passthrough(*((ref, a, b) for a, b in ranges), dtype=dtype), ANY_PATH))


# bf16 runs everywhere a GPU build runs; on the CPU too, so dtype mistakes show without a GPU
DTYPES = ["float32", "bfloat16"]


def naive_points(model, chunks: TokenChunks) -> torch.Tensor:
    """[L+1, tokens, hidden] float64: every hidden state HF returns, one chunk at a time, with the
    last entry the stream leaving the last layer before the final norm."""
    model.config.tie_last_hidden_states = False  # else HF's last entry is after the final norm
    per_chunk = []
    with torch.no_grad():
        for ids in chunks.chunks:
            out = model.model(ids[None], output_hidden_states=True, use_cache=False)
            assert torch.equal(model.model.norm(out.hidden_states[-1]), out.last_hidden_state)
            per_chunk.append(torch.stack(out.hidden_states)[:, 0, chunks.prefix_len :])
    return torch.cat(per_chunk, dim=1).double()


def naive_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi).mean())


@pytest.mark.parametrize(("arch", "dtype"), [("tiny_llama", None), ("tiny_gemma", None), ("tiny_llama", "bfloat16")])
def test_capture_matches_naive_distances_cosines_and_block_influence(arch, dtype, request):
    ref = str(request.getfixturevalue(arch))
    model = build(ref, (0, make_plan(passthrough((ref, 0, 1)), ANY_PATH).models[ref].num_layers), dtype=dtype)
    lens = capture(model, CHUNKS, name=ref, batch_size=2)
    points = naive_points(model, CHUNKS)
    L = points.shape[0] - 1
    pairs = [[(points[i], points[j]) for j in range(L + 1)] for i in range(L + 1)]
    f64 = torch.float64
    cos = torch.tensor([[float(F.cosine_similarity(x, y, dim=-1).mean()) for x, y in row] for row in pairs], dtype=f64)
    angle = torch.tensor([[naive_distance(x, y) for x, y in row] for row in pairs], dtype=f64)
    assert lens.labels == point_labels(L) and lens.labels[-1] == f"blocks.{L - 1}.hook_resid_post"
    assert lens.tokens == points.shape[1] == sum(len(c) - 1 for c in CHUNKS.chunks)
    assert torch.allclose(lens.angular_distance, angle, atol=1e-6, rtol=0)
    assert torch.allclose(lens.mean_cos, cos, atol=1e-9, rtol=0)
    naive_bi = [1 - float(F.cosine_similarity(points[i], points[i + 1], dim=-1).mean()) for i in range(L)]
    assert torch.allclose(lens.block_influence, torch.tensor(naive_bi, dtype=f64), atol=1e-9, rtol=0)
    assert (lens.angular_distance[~torch.eye(L + 1, dtype=torch.bool)] > 0).all()


@pytest.mark.parametrize("ranges", [[(0, 6)], [(0, 2), (2, 6)]])
def test_seam_free_recipe_scores_exactly_zero_at_every_depth(tiny_llama, ranges):
    ref = str(tiny_llama)
    scores = score_seams(make_plan(passthrough(*((ref, a, b) for a, b in ranges)), ANY_PATH), CHUNKS, batch_size=3)
    assert scores.seams == ()
    assert scores.predicted == (0.0,) * 6
    assert scores.measured == (0.0,) * 6
    assert scores.measured_output == 0.0


@pytest.mark.parametrize(
    ("parents", "slices", "seam", "dtype"),
    [
        (["tiny_llama"], [(0, 0, 4), (0, 2, 6)], 4, None),  # duplicate [2, 4)
        (["tiny_gemma"], [(0, 0, 8), (0, 4, 12)], 8, None),  # off the sliding/full attention pattern
        (["tiny_llama", "tiny_llama_b"], [(0, 0, 3), (1, 3, 6)], 3, None),  # same layer index, other parent
        (["tiny_llama"], [(0, 0, 4), (0, 2, 6)], 4, "bfloat16"),
    ],
)
def test_seam_scores_match_naive_distances_between_merge_and_parents(parents, slices, seam, dtype, request):
    refs = [str(request.getfixturevalue(p)) for p in parents]
    plan = make_plan(passthrough(*((refs[i], a, b) for i, a, b in slices), dtype=dtype), ANY_PATH)
    scores = score_seams(plan, CHUNKS, batch_size=2)
    parent_points = {
        ref: naive_points(build(ref, (0, plan.models[ref].num_layers), dtype=dtype), CHUNKS) for ref in refs
    }
    merged_points = naive_points(assemble(plan), CHUNKS)

    m_prev, p_prev = plan.layer_sources[seam - 1]
    m, a = plan.layer_sources[seam]
    assert scores.seams == (seam,)
    expected = naive_distance(parent_points[m_prev][p_prev + 1], parent_points[m][a])
    assert scores.predicted[seam] == pytest.approx(expected, abs=1e-6)
    assert [v for d, v in enumerate(scores.predicted) if d != seam] == [0.0] * (plan.num_layers - 1)
    assert scores.measured[:seam] == (0.0,) * seam  # the unmodified prefix is the parent's own stream
    for d in range(seam, plan.num_layers):
        m, a = plan.layer_sources[d]
        assert scores.measured[d] == pytest.approx(naive_distance(merged_points[d], parent_points[m][a]), abs=1e-6)
    assert scores.measured[seam] > 0.01
    primary_out = parent_points[refs[0]][-1]
    assert scores.measured_output == pytest.approx(naive_distance(merged_points[-1], primary_out), abs=1e-6)
    assert scores.lens.models == (*refs, MERGE)


def test_capture_memory_does_not_grow_with_the_number_of_tokens():
    # One process, 1x then 8x the tokens: peak RSS is monotonic, so if the lens kept per-token
    # state the 8x run would raise the peak by ~40 MB (16k tokens x 5 points x 128 x 4 bytes;
    # keeping HF's hidden_states instead measured +37 MiB here), while the lens adds a few MiB.
    script = """
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from merger.lens.capture import TokenChunks, capture
torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
chunks = lambda n: TokenChunks(tuple(torch.randint(0, 128, (256,)) for _ in range(n)), 0, "random")
small, large = chunks(8), chunks(64)
capture(model, chunks(4))  # warm-up: allocator pools and the largest batch shapes
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
a = capture(model, small)
after_small = peak()
b = capture(model, large)
after_large = peak()
print(after_large - after_small, a.tokens, b.tokens,
      tuple(a.angular_distance.shape) == tuple(b.angular_distance.shape) == (5, 5))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    grow_large, tokens_small, tokens_large, same_shape = out.stdout.split()
    assert (int(tokens_small), int(tokens_large)) == (8 * 256, 64 * 256)
    assert same_shape == "True"
    assert int(grow_large) < 12 * 1024, f"8x the tokens raised peak memory by {int(grow_large) // 1024} MiB"


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_matches_the_models_own_loss(tiny_llama, dtype):
    ref = str(tiny_llama)
    model = build(ref, (0, 6), dtype=dtype)
    chunks = random_chunks([30, 30, 12], prefix_len=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks.chunks:  # with a BOS prefix, the first text token is predicted from it
            loss = model(ids[None], labels=ids[None]).loss
            total, count = total + float(loss) * (len(ids) - 1), count + len(ids) - 1
    assert perplexity(model, chunks, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-6)
    no_prefix = random_chunks([30], prefix_len=0)
    with torch.no_grad():
        expected = math.exp(float(model(no_prefix.chunks[0][None], labels=no_prefix.chunks[0][None]).loss))
    assert perplexity(model, no_prefix) == pytest.approx(expected, rel=1e-6)


def test_tokenize_puts_the_tokenizer_prefix_on_every_chunk():
    from tokenizers.processors import TemplateProcessing

    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(chat=False)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("fox")["input_ids"][0] == bos  # it adds a BOS, as Gemma's and Llama 3's do
    chunks = tokenize(tokenizer, TEXT, max_length=32, source="words")
    assert chunks.prefix_len == 1 and all(int(c[0]) == bos and len(c) <= 32 for c in chunks.chunks)
    body = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert torch.cat([c[1:] for c in chunks.chunks]).tolist() == body and chunks.num_tokens == len(body)
    assert [b.shape for b in chunks.batches(4)][-1][1] == len(chunks.chunks[-1])  # tail chunk alone, unpadded


def test_suggestions_rank_by_predicted_damage_and_confirm_with_assembled_perplexity(tiny_llama):
    ref = str(tiny_llama)
    result = suggest_duplications(
        ref,
        calibration=TEXT,
        heldout=HELDOUT,
        top_k=3,
        min_size=2,
        max_size=3,
        rank_by="predicted",
        resolver=ANY_PATH,
        build=builds.build,
    )
    lens = result.lens
    assert [(s.start, s.end) for s in result.ranked] == [(s.start, s.end) for s in rank_duplications(lens, max_size=3)]
    assert sorted((s.start, s.end) for s in result.ranked) == sorted(
        [(a, a + 2) for a in range(5)] + [(a, a + 3) for a in range(4)]
    )
    for s in result.ranked:
        assert s.predicted == float(lens.angular_distance[s.end, s.start])
    assert [s.predicted for s in result.ranked] == sorted(s.predicted for s in result.ranked)

    held = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), HELDOUT)
    assert result.heldout_tokens == held.num_tokens
    assert result.parent_perplexity == perplexity(build(ref, (0, 6)), held)
    assert [(s.start, s.end) for s in result.confirmed] == [(s.start, s.end) for s in result.ranked[:3]]
    for s in result.confirmed:
        plan = make_plan(duplication_recipe(ref, 6, s.start, s.end), ANY_PATH)
        assert plan.layer_sources == [(ref, i) for i in [*range(s.end), *range(s.start, 6)]]
        assert s.perplexity == perplexity(assemble(plan), held) != result.parent_perplexity


@pytest.mark.parametrize(
    ("arch", "blocks", "dtype"),
    [
        ("tiny_llama", [(2, 4), (1, 4), (4, 6)], None),
        ("tiny_gemma", [(4, 8)], None),
        ("tiny_llama", [(2, 4), (4, 6)], "bfloat16"),  # the recorder's float32 stream fed to a bf16 tail
    ],
)
def test_duplication_drift_equals_measured_scores_of_the_whole_assembled_merge(arch, blocks, dtype, request):
    ref = str(request.getfixturevalue(arch))
    L = make_plan(passthrough((ref, 0, 1)), ANY_PATH).models[ref].num_layers
    parent = build(ref, (0, L), dtype=dtype)
    drift = duplication_drift(parent, CHUNKS, blocks, batch_size=2)
    for a, b in blocks:  # the tail shortcut against the real merge, run in lockstep with the parent
        plan = make_plan(duplication_recipe(ref, L, a, b).model_copy(update={"dtype": dtype}), ANY_PATH)
        scores = score_seams(plan, CHUNKS, parents={ref: parent}, batch_size=2)
        assert drift[(a, b)].seam == pytest.approx(scores.measured[b], abs=1e-9)
        assert drift[(a, b)].mean == pytest.approx(sum(scores.measured[b:]) / (L - a), abs=1e-9)
        assert drift[(a, b)].output == pytest.approx(scores.measured_output, abs=1e-9) and scores.measured_output > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_suggestions_ranked_by_drift_follow_the_measured_output_drift(tiny_llama, dtype):
    ref = str(tiny_llama)
    result = suggest_duplications(
        ref,
        calibration=TEXT,
        heldout=HELDOUT,
        top_k=2,
        max_size=3,
        rank_by="drift",
        drift_tokens=60,
        resolver=ANY_PATH,
        build=builds.build,
        dtype=dtype,
    )
    sample = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), TEXT, max_tokens=60)
    parent = build(ref, (0, 6), dtype=dtype)
    drift = duplication_drift(parent, sample, [(s.start, s.end) for s in result.ranked])
    assert [s.drift for s in result.ranked] == sorted(drift[(s.start, s.end)].output for s in result.ranked)
    held = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), HELDOUT)
    assert result.parent_perplexity == perplexity(parent, held)
    for s in result.confirmed:
        plan = make_plan(duplication_recipe(ref, 6, s.start, s.end).model_copy(update={"dtype": dtype}), ANY_PATH)
        assert s.perplexity == perplexity(assemble(plan), held)


@pytest.fixture
def file_opens(monkeypatch) -> list[str]:
    """Every safetensors file assembly opens, from now on."""
    opened = []
    real = merger.build.assemble.safe_open

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(merger.build.assemble, "safe_open", counting)
    return opened


@pytest.mark.parametrize("rank_by", ["drift", "predicted"])
def test_suggestions_read_the_parent_once_and_build_every_candidate_from_its_tensors(tiny_llama, file_opens, rank_by):
    ref = str(tiny_llama)
    messages = []
    progress = lambda f, m: messages.append((f, m))  # noqa: E731
    result = suggest_duplications(
        ref,
        calibration=TEXT,
        heldout=HELDOUT,
        top_k=3,
        max_size=3,
        rank_by=rank_by,
        resolver=ANY_PATH,
        build=builds.build,
        progress=progress,
    )
    assert len(file_opens) == 1  # the parent's one file; its 9 tails are its own layers, its 3 merges its tensors
    held = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), HELDOUT)
    for s in result.confirmed:  # the same figure as the whole merge read from disk
        plan = make_plan(duplication_recipe(ref, 6, s.start, s.end), ANY_PATH)
        assert s.perplexity == perplexity(assemble(plan), held)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("perplexity of duplicating [") and " left" in m for _, m in messages)
    if rank_by == "drift":
        assert any(m.startswith("drift of duplicating blocks [") for _, m in messages)


def test_the_lens_measures_16_bit_weights_in_float32_on_a_cpu_without_bf16_units_unless_told_or_it_does_not_fit(
    tiny_llama, tmp_path, monkeypatch
):
    # a Hub model declared bf16 (SmolLM2's own config) measured on a CPU Space without bf16
    # dot-product instructions: float32 is several times faster there, and bf16 values widen
    # exactly; a dtype the caller names is kept, and a float32 copy that does not fit the memory
    # falls back to the model's own dtype
    monkeypatch.setattr(devices, "cpu_multiplies_bf16_fast", lambda: False)
    ref = str(with_dtype(tiny_llama, tmp_path / "tiny-bf16", "bfloat16"))
    stored = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    widened = make_plan(passthrough((ref, 0, 4), (ref, 2, 6), dtype="float32"), ANY_PATH)
    assert (devices.lens_dtype(stored, "cpu"), devices.chat_dtype(stored, "cpu")) == ("float32", "bfloat16")

    def suggest(**options):
        found = suggest_duplications(
            ref, calibration=TEXT, heldout=HELDOUT, top_k=1, max_size=2, resolver=ANY_PATH, device="cpu", **options
        )
        return found.dtype, found.confirmed[0]

    dtype, best = suggest(build=builds.build_for_lens)
    assert dtype == "float32"
    merge = make_plan(
        duplication_recipe(ref, 6, best.start, best.end).model_copy(update={"dtype": "float32"}), ANY_PATH
    )
    held = tokenize(load_tokenizer(merge), HELDOUT)
    assert best.perplexity == perplexity(assemble(merge), held)  # the bf16 weights, widened: the same figure
    chunks = tokenize(load_tokenizer(stored), TEXT)  # the Lens tab's seam scores, in the lens's dtype
    scores = [
        score_seams(plan, chunks, device="cpu", dtype=devices.lens_dtype(plan, "cpu")) for plan in (stored, widened)
    ]
    assert [(s.predicted, s.measured, s.measured_output) for s in scores] == 2 * [
        (scores[1].predicted, scores[1].measured, scores[1].measured_output)
    ]
    assert suggest(build=builds.build_for_lens, dtype="bfloat16")[0] == "bfloat16"
    assert suggest(build=builds.build)[0] == "bfloat16"  # a chat build keeps the model's dtype
    needs = [devices.needed_bytes(make_plan(passthrough((ref, 0, 6), dtype=d), ANY_PATH), "cpu") for d in DTYPES]
    monkeypatch.setattr(devices, "free_memory", lambda device: sum(needs) // 2)  # bf16's fits, float32's not
    assert suggest(build=builds.build_for_lens)[0] == "bfloat16"


def test_the_lens_keeps_bf16_on_a_cpu_with_bf16_units_and_widens_fp16(tiny_llama, tmp_path, monkeypatch):
    # AVX-512 BF16 or AMX multiply bf16 faster than float32; no CPU measured multiplies fp16 fast
    monkeypatch.setattr(devices, "cpu_multiplies_bf16_fast", lambda: True)
    plans = {
        dtype: make_plan(passthrough((str(with_dtype(tiny_llama, tmp_path / dtype, dtype)), 0, 6)), ANY_PATH)
        for dtype in ("bfloat16", "float16")
    }
    assert devices.lens_dtype(plans["bfloat16"], "cpu") == "bfloat16"
    assert devices.lens_dtype(plans["float16"], "cpu") == "float32"
    built = builds.build_for_lens(plans["bfloat16"], device="cpu")
    assert next(built.model.parameters()).dtype == torch.bfloat16


def test_the_cpus_bf16_units_are_read_from_torch(monkeypatch):
    for avx512_bf16, amx, fast in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert devices.cpu_multiplies_bf16_fast() == fast


def test_duplication_perplexities_of_no_block_is_the_parents_alone(tiny_llama):
    parent = build(str(tiny_llama), (0, 6))
    held = tokenize(load_tokenizer(make_plan(passthrough((str(tiny_llama), 0, 6)), ANY_PATH)), HELDOUT)
    assert duplication_perplexities(parent, held, []) == (perplexity(parent, held), {})


def test_seam_scores_and_the_recurrence_sweep_read_each_parent_once(tiny_llama, file_opens):
    ref = str(tiny_llama)
    score_seams(make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH), CHUNKS)
    assert len(file_opens) == 1  # the parent; the merge is built from its tensors
    lens = capture(build(ref, (0, 6)), CHUNKS, name=ref)
    file_opens.clear()
    recurrence_sweep(ref, 2, 4, max_repeats=3, lens=lens, heldout=HELDOUT, resolver=ANY_PATH, build=builds.build)
    assert len(file_opens) == 1


def test_recorder_keeps_only_the_points_asked_for(tiny_llama):
    model = build(str(tiny_llama), (0, 6))
    ids = CHUNKS.chunks[0][None]
    with torch.inference_mode(), ResidualRecorder(model) as every, ResidualRecorder(model, points=[5, 2, 6]) as some:
        model.model(input_ids=ids, use_cache=False)
        assert torch.equal(some.take(), every.take()[:, [5, 2, 6]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_recurrence_sweep_repeats_the_block_and_adds_one_seam_per_repeat(tiny_llama, dtype):
    ref = str(tiny_llama)
    parent = build(ref, (0, 6), dtype=dtype)
    lens = capture(parent, tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), TEXT), name=ref)
    points = recurrence_sweep(
        ref, 2, 4, max_repeats=3, lens=lens, heldout=HELDOUT, resolver=ANY_PATH, build=builds.build, dtype=dtype
    )
    held = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), HELDOUT)
    seam = float(lens.angular_distance[4, 2])
    assert [p.repeats for p in points] == [1, 2, 3] and [p.num_layers for p in points] == [6, 8, 10]
    assert [p.predicted for p in points] == pytest.approx([0.0, seam, 2 * seam], abs=1e-12)
    assert points[0].perplexity == perplexity(parent, held)
    recipe = recurrence_recipe(ref, 6, 2, 4, 3).model_copy(update={"dtype": dtype})
    assert recipe.slices[1].repeat == 2
    assert points[2].perplexity == perplexity(assemble(make_plan(recipe, ANY_PATH)), held)


def test_analyze_cli_writes_the_contract_fields(tiny_llama, tmp_path, capsys):
    ref = str(tiny_llama)
    text, out = tmp_path / "text.txt", tmp_path / "lens.json"
    text.write_text(TEXT)
    assert main(["analyze", ref, "--text", str(text), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    chunks = tokenize(load_tokenizer(make_plan(passthrough((ref, 0, 6)), ANY_PATH)), TEXT)
    lens = capture(build(ref, (0, 6)), chunks)
    assert data["num_layers"] == 6 and data["tokens"] == chunks.num_tokens and data["text"] == str(text)
    assert len(data["angular_distance"]) == 7 and all(len(row) == 7 for row in data["angular_distance"])
    assert torch.allclose(torch.tensor(data["angular_distance"], dtype=torch.float64), lens.angular_distance)
    assert data["block_influence"] == pytest.approx(lens.block_influence.tolist(), abs=1e-12)
    assert "seam_scores" not in data

    recipe = tmp_path / "dup.yml"
    recipe.write_text(passthrough((ref, 0, 4), (ref, 2, 6)).to_yaml())
    assert main(["analyze", str(recipe), "--out", str(out), "--max-tokens", "300"]) == 0  # default text
    data = json.loads(out.read_text())
    assert data["num_layers"] == 8 and data["tokens"] == 300 and data["text"].endswith("assets/calibration.txt")
    assert data["seam_scores"]["seams"] == [4] and data["seam_scores"]["measured"][:4] == [0.0] * 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bundled:nope"], "unknown model 'bundled:nope'"),
        (["{model}", "--text", "/no/such/file.txt"], "cannot read text file '/no/such/file.txt'"),
    ],
)
def test_analyze_user_mistakes_exit_2_with_one_sentence(tiny_llama, tmp_path, capsys, args, message):
    args = [a.format(model=tiny_llama) for a in args]
    assert main(["analyze", *args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_suggest_cli_ranks_smollm2_in_bf16_by_drift_and_confirms_five(tmp_path, capsys):
    # Every model of the run is bf16 on the CPU, as the page's Suggest runs on a GPU. Fewer tokens
    # than the page reads (16 of each text, 8 for each candidate's drift) keep the run short.
    out = tmp_path / "suggest.json"
    args = ["--dtype", "bfloat16", "--device", "cpu", "--max-tokens", "16", "--drift-tokens", "8", "--out", str(out)]
    assert main(["suggest", "bundled:smollm2-135m-instruct", *args]) == 0
    data = json.loads(out.read_text())
    assert (data["rank_by"], data["dtype"], data["device"], data["num_layers"]) == ("drift", "bfloat16", "cpu", 30)
    assert len(data["ranked"]) == sum(31 - size for size in range(2, 9))  # every 2-8-layer block
    drifts = [block["drift"] for block in data["ranked"]]
    assert drifts == sorted(drifts) and drifts[0] > 0
    assert [block["block"] for block in data["confirmed"]] == [block["block"] for block in data["ranked"][:5]]
    assert all(math.isfinite(block["perplexity"]) for block in data["confirmed"])
    assert math.isfinite(data["parent_perplexity"]) and data["heldout_tokens"] == data["calibration_tokens"] == 16
    assert "182 blocks of bundled:smollm2-135m-instruct ranked by drift (bfloat16, cpu)" in capsys.readouterr().out


def test_suggest_cli_ranks_by_prediction_and_confirms_top_k_with_the_lens_numbers(tiny_llama, tmp_path):
    ref, out = str(tiny_llama), tmp_path / "suggest.json"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["--rank-by", "predicted", "--top-k", "2", "--text", str(text), "--heldout", str(text)]
    assert main(["suggest", ref, *args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    expected = suggest_duplications(
        ref, calibration=TEXT, heldout=TEXT, top_k=2, rank_by="predicted", resolver=ANY_PATH, build=builds.build
    ).as_dict()
    assert data == expected and data["dtype"] == "float32" and len(data["confirmed"]) == 2
    assert [b["predicted"] for b in data["ranked"]] == sorted(b["predicted"] for b in data["ranked"])


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--top-k", "0"], "is not a whole number of at least 1"), (["--rank-by", "vibes"], "invalid choice")],
)
def test_suggest_cli_refuses_bad_options_with_exit_2(tiny_llama, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(["suggest", str(tiny_llama), *args, "--out", str(tmp_path / "x.json")])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_figures_carry_exact_values_and_mark_the_recipe(tiny_llama):
    ref = str(tiny_llama)
    plan = make_plan(passthrough((ref, 0, 4), (ref, 2, 6)), ANY_PATH)
    scores = score_seams(plan, CHUNKS)
    lens = scores.lens.lens(ref)
    heat = angular_distance_figure(lens, recipe=plan.recipe)
    assert isinstance(heat, go.Figure)
    assert heat.data[0].z[4][2] == float(lens.angular_distance[4, 2])  # hover shows z itself
    assert "%{z}" in heat.data[0].hovertemplate
    assert [(s.x0, s.x1) for s in heat.layout.shapes] == [(-0.5, 4.5), (1.5, 6.5)]  # the two slices
    seam_marks = heat.data[1]
    assert (list(seam_marks.x), list(seam_marks.y)) == ([2], [4])  # the cell holding the prediction
    assert list(block_influence_figure(lens).data[0].y) == lens.block_influence.tolist()
    seam_fig = seam_scores_figure(scores)
    assert list(seam_fig.data[0].y) == list(scores.predicted) and list(seam_fig.data[1].y) == list(scores.measured)
    assert len(seam_fig.layout.shapes) == 1  # one seam line

    from merger.lens.search import RecurrencePoint, Suggestion, Suggestions

    ranked = tuple(rank_duplications(lens, max_size=3))
    confirmed = (Suggestion(ranked[0].start, ranked[0].end, ranked[0].predicted, 12.5),)
    sugg = suggestions_figure(Suggestions(ref, 6, ranked, confirmed, 10.0, 100, lens), top=5)
    assert list(sugg.data[0].y)[-1] == ranked[0].label and list(sugg.data[1].x)[-1] == 12.5
    by_drift = tuple(replace(s, drift=0.1 * i) for i, s in enumerate(ranked))
    sugg = suggestions_figure(Suggestions(ref, 6, by_drift, (), 10.0, 100, lens), top=3)
    assert list(sugg.data[0].x)[::-1] == [0.0, 0.1, 0.2] and "drift" in sugg.layout.annotations[0].text
    rec = recurrence_figure([RecurrencePoint(1, 6, 0.0, 10.0), RecurrencePoint(2, 8, 0.3, 11.0)])
    assert list(rec.data[0].y) == [10.0, 11.0] and list(rec.data[1].y) == [0.0, 0.3]
