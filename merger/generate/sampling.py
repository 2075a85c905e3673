"""Choosing the next token on the device, as tensor operations without a branch on their values or a
host sync, so that a decode step captured in a CUDA graph chooses it too: the settings are tensors
the graph reads (`SamplingState`), and the random draws come from a buffer refilled between steps
from the request's seeded generator.

Filters apply in the order repetition penalty, temperature, top-k (exactly k tokens), top-p, min-p;
temperature 0 is greedy (argmax of the penalized logits), as `generate()` does.
"""

from __future__ import annotations

import torch

FIXED_POINT = 2.0**40  # top-p's running sum in integers: exact in any order (see `draw`)


MIN_TEMPERATURE = 1e-6  # divides the logits when temperature is 0, whose draw is then discarded


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """`generate()`'s repetition penalty: the logits [1, V] of tokens already in the text (`seen`,
    bool [1, V]) are divided by `penalty` where positive and multiplied by it where negative (1: unchanged)."""
    logits = logits.float()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def draw(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """The next token [1] from logits [1, V] and Exp(1) draws `noise` [1, V] (no zeros); the
    settings are tensors [1] (top_k int64, 0: off; top_p 1 and min_p 0: off; temperature 0: greedy)."""
    greedy = logits.argmax(dim=-1)
    scaled = logits.float() / temperature.clamp_min(MIN_TEMPERATURE)
    ordered, order = scaled.sort(dim=-1, descending=True)  # [1, V]: most likely first
    ranks = torch.arange(ordered.shape[-1], device=logits.device)
    past_k = (top_k > 0) & (ranks >= top_k)  # [1, V]
    probs = ordered.masked_fill(past_k, float("-inf")).softmax(dim=-1)
    # Drop a token once the more likely ones already hold top_p (the most likely always stays).
    # CUDA's float cumsum is not deterministic (torch.use_deterministic_algorithms lists it), and at
    # the nucleus edge a last-bit change decides a draw: scan fixed-point integers, exact in any
    # order, so a seed always gives the same tokens.
    fixed = (probs * FIXED_POINT).long()
    drop = (fixed.cumsum(dim=-1) - fixed >= (top_p * FIXED_POINT).round().long()) & (top_p < 1.0)
    probs = probs.masked_fill(drop, 0.0)
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)  # the first is the largest, and stays
    # argmax(p / E), E ~ Exp(1), draws from p without torch.multinomial's host sync
    choice = (probs / noise).argmax(dim=-1)  # [1]: a rank in `order`
    sampled = order.gather(-1, choice[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def exponential_draws(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill `out` with Exp(1) draws from `generator`, none of them 0 (a 0 would turn a filtered
    token's 0/0 into a NaN that argmax picks)."""
    return out.exponential_(generator=generator).clamp_min_(torch.finfo(out.dtype).tiny)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`draw` with plain settings and fresh draws from `generator`: the next token [1] from logits [1, V]."""

    def setting(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor([value], dtype=dtype, device=logits.device)

    noise = exponential_draws(torch.empty(logits.shape, dtype=torch.float32, device=logits.device), generator)
    return draw(logits, noise, setting(temperature), setting(top_p), setting(top_k, torch.long), setting(min_p))


class SamplingState:
    """One request's sampling settings and draws on the device, at fixed addresses (a captured step
    reads them): `start` sets them per request, `refill` draws `rows` tokens' noise ahead."""

    def __init__(self, vocab: int, rows: int, device: torch.device) -> None:
        def scalar(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.full((1,), value, dtype=dtype, device=device)

        self.temperature, self.top_p, self.min_p = scalar(0.0), scalar(1.0), scalar(0.0)
        self.repetition_penalty = scalar(1.0)
        self.top_k = scalar(0, torch.long)
        self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)  # tokens in the text so far
        self.noise = torch.ones(rows, vocab, dtype=torch.float32, device=device)
        self.row = scalar(0, torch.long)  # the noise row the next draw reads

    def start(
        self,
        prompt: torch.Tensor,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> bool:
        """Settings for a request whose prompt is `prompt` [1, T] (its tokens count as seen), named as
        GenerationSettings names them (each unset one leaves the logits as they are). Returns whether
        they choose greedily: the argmax of unchanged logits, with no draw."""
        for tensor, value in (
            (self.temperature, temperature),
            (self.top_p, top_p),
            (self.top_k, top_k),
            (self.min_p, min_p),
            (self.repetition_penalty, repetition_penalty),
        ):
            tensor.fill_(value)
        self.seen.zero_().scatter_(1, prompt, True)
        return temperature <= 0 and repetition_penalty == 1.0

    def refill(self, generator: torch.Generator) -> None:
        """Fresh draws for the next `rows` tokens."""
        exponential_draws(self.noise, generator)
        self.row.zero_()

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [1] under the request's settings; marks it seen and uses up a noise row."""
        penalized = penalize(logits, self.seen, self.repetition_penalty)
        noise = self.noise.index_select(0, self.row)  # [1, V]
        # wraps rather than ever reading past the buffer, should a caller step on without `refill`:
        # an out-of-range index is a device-side assert, which ends the process's CUDA context
        self.row.add_(1).remainder_(self.noise.shape[0])
        token = draw(penalized, noise, self.temperature, self.top_p, self.top_k, self.min_p)
        self.seen.scatter_(1, token[:, None], True)
        return token
