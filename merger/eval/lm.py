"""A built model as lm-evaluation-harness sees it: an `lm_eval.api.model.LM` (through its
`TemplateLM`, which splits a request's context and continuation into tokens as every lm-eval
backend does) backed by our build.

- log-likelihoods: batched forward passes, requests sorted longest first and packed into batches of
  at most `batch_tokens` tokens, right-padded as lm-eval's `hf` backend pads them; requests whose
  inputs are the same tokens (a multiple-choice question's one-token answers) share one row; only the
  positions scored are projected to the vocabulary (`logits_to_keep`), so a batch never holds a
  [batch, length, vocabulary] tensor;
- generation: our fast decoder (`merger.generate`: static cache, the step in a CUDA graph on a GPU),
  greedy unless the task asks to sample, stopping at the model's end-of-text ids and the task's
  stop strings, cut as lm-eval cuts them;
- chat: the model's chat template, applied as lm-eval's `hf` backend applies it, within our
  template limits (`merger.chat.templates`).

Tokenization, truncation and the scoring arithmetic follow `lm_eval.models.huggingface.HFLM`, so
scores equal its scores on the same items (tests/test_eval_lm.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from merger.chat.templates import render_chat_template
from merger.errors import ChatTemplateError, UserError

if TYPE_CHECKING:
    from merger.runtime.builds import Built

# tokens in one log-likelihood batch (rows x padded length): bounds the activations of a forward pass
BATCH_TOKENS = {"cuda": 16384, "cpu": 2048}
Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context tokens, continuation tokens)


class BuiltLM(TemplateLM):
    """lm-eval's LM over a build (`merger.runtime.Built`). `report(done, total)` is called as
    requests complete (the caller's progress), `check()` at every generated token too: either may
    raise to stop the run."""

    def __init__(
        self,
        built: Built,
        *,
        batch_tokens: int | None = None,
        report: Callable[[int, int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.built = built
        self.model = built.model
        self.tokenizer = built.tokenizer
        self.device_name = built.device
        kind = "cuda" if built.device.startswith("cuda") else "cpu"
        self.batch_tokens = batch_tokens or BATCH_TOKENS[kind]
        self.report = report or (lambda done, total: None)
        self.check = check or (lambda: None)
        model_max = resolve_max_length(self.model.config, self.tokenizer)
        self._max_length = min(model_max, built.context_tokens)
        self.add_bos_token: bool | None = None  # the tokenizer's own choice, as lm-eval's hf backend leaves it

    # ---- what lm-eval reads of a model ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256  # lm-eval's default when a task names none

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """As the hf backend encodes: special tokens as the tokenizer adds them, unless the text
        already begins with the BOS token."""
        options: dict[str, bool] = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation through the model's chat template, as the hf backend renders it (a
        template that refuses system messages gets the conversation without them)."""
        owner = self.built.plan.tokenizer_model.label
        options = {"add_generation_prompt": add_generation_prompt, "continue_final_message": not add_generation_prompt}
        try:
            return render_chat_template(self.tokenizer, chat_history, model=owner, **options)
        except ChatTemplateError:
            without_system = [m for m in chat_history if m["role"] != "system"]
            if len(without_system) == len(chat_history):
                raise
            return render_chat_template(self.tokenizer, without_system, model=owner, **options)

    # ---- log-likelihoods ----

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) for each request."""
        inputs: dict[tuple[int, ...], list[int]] = {}  # the model's input tokens -> the requests that share them
        for i, (_, context, continuation) in enumerate(requests):
            inputs.setdefault(tuple(self._input_tokens(context, continuation)), []).append(i)
        rows = sorted(inputs.items(), key=lambda item: (-len(item[0]), item[0]))  # longest first, as hf sorts
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        done = 0
        for batch in _batches(rows, self.batch_tokens):
            scored = self._score_batch(
                [tokens for tokens, _ in batch], [[requests[i][2] for i in ids] for _, ids in batch]
            )
            for (_, ids), answers in zip(batch, scored, strict=True):
                for i, answer in zip(ids, answers, strict=True):
                    results[i] = answer
                done += len(ids)
            self.report(done, len(requests))
        return results  # type: ignore[return-value]

    def _input_tokens(self, context: list[int], continuation: list[int]) -> list[int]:
        """What the model reads to score `continuation` after `context`: both, truncated on the left
        to the window, without the last token (its prediction is not needed)."""
        if not context or not continuation or len(continuation) > self.max_length:
            raise ValueError("a log-likelihood request needs a context and a continuation that fits the window")
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    @torch.inference_mode()
    def _score_batch(
        self, rows: list[tuple[int, ...]], continuations: list[list[list[int]]]
    ) -> list[list[tuple[float, bool]]]:
        """One forward pass over right-padded `rows`; for each row, each of its continuations scored."""
        longest = len(rows[0])
        starts = [len(row) - max(len(c) for c in conts) for row, conts in zip(rows, continuations, strict=True)]
        keep = longest - min(starts)  # the last `keep` positions hold every continuation
        batch = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, row in enumerate(rows):
            batch[r, : len(row)] = torch.tensor(row)
        logits = self.model(input_ids=batch.to(self.device_name), logits_to_keep=keep).logits  # [B, keep, V]
        offset = longest - keep
        answers = []
        for r, (row, conts) in enumerate(zip(rows, continuations, strict=True)):
            row_answers = []
            for cont in conts:
                first = len(row) - len(cont) - offset
                log_probs = F.log_softmax(logits[r, first : first + len(cont)], dim=-1)  # [len(cont), V]
                target = torch.tensor(cont, device=log_probs.device)
                greedy = bool((log_probs.argmax(dim=-1) == target).all())
                row_answers.append((float(log_probs.gather(1, target[:, None]).sum()), greedy))
            answers.append(row_answers)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, scored in disjoint windows of the model's length (as hf does)."""
        windows: list[Request] = []
        owners: list[int] = []
        for i, (string,) in enumerate(request.args for request in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += log_prob
        return totals

    # ---- generation ----

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation from our fast decoder, cut at the first stop string."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        answers = []
        for done, (context, gen_kwargs) in enumerate(request.args for request in requests):
            answers.append(self._generate(context, dict(gen_kwargs), eos))
            self.report(done + 1, len(requests))
        return answers

    def _generate(self, context: str, gen_kwargs: dict[str, Any], eos: str) -> str:
        options = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(options.pop("until", None), eos=eos)
        max_new = int(options.pop("max_gen_toks"))
        if max_new >= self.max_length:
            raise UserError(
                f"the task asks for {max_new} new tokens, more than this build's {self.max_length}-token window"
            )
        ids = self._generation_prompt(context, self.max_length - max_new)
        sampled = bool(options.get("do_sample")) and float(options.get("temperature") or 0.0) > 0
        settings = {
            "temperature": float(options.get("temperature", 0.0)) if sampled else 0.0,
            "top_p": float(options.get("top_p") or 1.0) if sampled else 1.0,
            "top_k": int(options.get("top_k") or 0) if sampled else 0,
        }
        # the end-of-text token stops the decoder itself; other stop strings are looked for, as hf's
        # stopping criteria look, in the text of the last tokens (a stop's length in tokens, plus 2)
        stops = [stop for stop in until if stop and stop != eos]
        window = max((len(self.tokenizer.encode(stop, add_special_tokens=False)) + 2 for stop in stops), default=0)
        tokens: list[int] = []
        for _ in self._stream(ids, max_new, settings, tokens):
            tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False) if stops else ""
            if any(stop in tail for stop in stops):
                break
        return postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until, None)

    def _generation_prompt(self, context: str, room: int) -> torch.Tensor:
        """The context's tokens [1, T], as the hf backend encodes a batch of one, truncated on the left to `room`."""
        options = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            options["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        ids = self.tokenizer(context, return_tensors="pt", **options)["input_ids"]
        return ids[:, -room:]

    def _stream(self, ids: torch.Tensor, max_new: int, settings: dict[str, Any], tokens: list[int]) -> Iterator[int]:
        """Each new token, appended to `tokens` before it is yielded; ends at an end-of-text id."""
        stop = threading.Event()
        stream = self.built.decoder.stream(
            ids, stop=stop, max_new_tokens=max_new, stop_ids=self._stop_ids(), seed=0, **settings
        )
        try:
            for token in stream:
                self.check()
                tokens.append(token)
                yield token
        finally:
            stop.set()
            stream.close()

    def _stop_ids(self) -> Sequence[int]:
        """Where hf's generate() stops: the generation config's end ids and the tokenizer's end-of-text."""
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return sorted({*ids, self.eot_token_id} - {None})


def _batches(
    rows: list[tuple[tuple[int, ...], list[int]]], budget: int
) -> Iterator[list[tuple[tuple[int, ...], list[int]]]]:
    """Consecutive rows (longest first) in batches of at most `budget` tokens once padded (a row
    longer than the budget goes alone)."""
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    for row in rows:
        if batch and len(batch[0][0]) * (len(batch) + 1) > budget:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch
