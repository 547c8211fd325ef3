"""Text generation from a GPTModel: greedy, temperature, top-k and top-p sampling, KV cache.

    from megatron.generation import generate
    result = generate(model, prompt_ids, 32, greedy=True, eos_id=tokenizer.eod)
    result.tokens, result.finish_reason, result.experts

Letters: V vocabulary (padded).

One prompt at a time (batch 1: no padding, so no attention mask beyond the causal one). With
the cache (the default) the prompt runs once, through the training path's causal attention, and
each new token then costs one position: its query attends to the cached keys and values
(megatron/model/attention.py KVCache). Without the cache each step reruns the whole sequence;
that is the reference the cache is tested against (same greedy tokens, close logits).

MoE routing in generation is dropless, with the model's router and its settings (threshold,
top-k; GPTModel.set_routing or the checkpoint loader's overrides change them). Capacity
(--moe-eval-capacity-factor, --moe-min-capacity) bounds the tokens per expert of a batch, which
means nothing for one token at a time: a token's experts then depend on that token alone, so
the prompt run at once, the prompt run position by position, and the run without the cache
route every token alike. `generate` turns token dropping off for its duration and restores it.

Sampling happens on the CPU with a generator seeded by `seed`: the same seed gives the same
tokens on any device (for the same logits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence

import torch

from megatron.config import GPTConfig
from megatron.model.attention import KVCache

if TYPE_CHECKING:
    from megatron.model import GPTModel

# One token's experts: {MoE layer number (1-based): expert ids it used, most probable first}.
TokenExperts = Dict[int, List[int]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last position's logits (validated here, once).

    greedy: the most probable token (the lowest id among equals); temperature, top_k and top_p
    are then ignored. Otherwise: logits / temperature, keep the top_k most probable (0: all),
    then the fewest most probable whose mass reaches top_p (1.0: all), then draw from the rest.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.greedy:
            return
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0 (use --greedy for the most probable "
                             f"token), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    def choose(self, logits_V: torch.Tensor, generator: torch.Generator) -> int:
        """The next token id from fp32 logits [V] (already masked where it must not go)."""
        if self.greedy:
            return int(torch.argmax(logits_V))
        logits_V = logits_V.detach().float().cpu() / self.temperature
        if 0 < self.top_k < logits_V.numel():
            kth = torch.topk(logits_V, self.top_k).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        probs_V = torch.softmax(logits_V, dim=-1)
        if self.top_p < 1.0:
            # Nucleus (Holtzman et al. 2020): a token stays iff the mass of the tokens more
            # probable than it is < top_p, so the most probable one always stays (the same
            # rule as threshold routing's experts).
            sorted_V, order_V = torch.sort(probs_V, descending=True, stable=True)
            before_V = torch.cumsum(sorted_V, dim=0) - sorted_V
            dropped = order_V[before_V >= self.top_p]
            probs_V = probs_V.index_fill(0, dropped, 0.0)
        return int(torch.multinomial(probs_V, 1, generator=generator))


@dataclass(frozen=True)
class GenerationResult:
    """tokens: the new tokens only (the eos token included when it ended the text);
    finish_reason: "eos" or "length" (max_new_tokens reached);
    experts (record_experts): per new token, {layer_number: [expert ids used]};
    prompt_experts (record_experts): the same per prompt token."""

    tokens: List[int]
    finish_reason: str
    experts: Optional[List[TokenExperts]] = None
    prompt_experts: Optional[List[TokenExperts]] = None


@dataclass(frozen=True)
class Step:
    """One forward of the decoder: the last position's fp32 logits [V] and, when recorded,
    the experts of each position it ran (in order)."""

    logits_V: torch.Tensor
    experts: Optional[List[TokenExperts]]


class Decoder:
    """Feeds tokens to the model, one sequence (batch 1); each `feed` returns the Step of the
    positions fed. With use_cache the model runs only the new positions (a KVCache of
    `max_length` positions); without, the whole sequence every time."""

    def __init__(self, model: "GPTModel", max_length: int, use_cache: bool = True,
                 record_experts: bool = False) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.config.num_layers, max_length) if use_cache else None
        self.record_experts = record_experts
        self.ids: List[int] = []

    @torch.no_grad()
    def feed(self, new_ids: Sequence[int]) -> Step:
        self.ids.extend(int(i) for i in new_ids)
        run = list(new_ids) if self.cache is not None else self.ids
        input_ids = torch.tensor([run], dtype=torch.long, device=self.device)
        out = self.model(input_ids, kv_cache=self.cache, record_experts=self.record_experts)
        logits_V = out.logits[0, -1].float()
        if not self.record_experts:
            return Step(logits_V, None)
        n = len(new_ids)
        per_layer = {s.layer_number: s.token_experts_TK[-n:].tolist() for s in out.moe_stats}
        experts = [{layer: [e for e in rows[t] if e >= 0] for layer, rows in per_layer.items()}
                   for t in range(n)]
        return Step(logits_V, experts)


def check_request(config: GPTConfig, prompt_ids: Sequence[int], max_new_tokens: int
                  ) -> None:
    """ValueError naming the limit: an empty prompt, max_new_tokens < 1, or a text longer than
    the position table (prompt + new tokens > --max-position-embeddings: refused, not slid)."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit = config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens + --max-new-tokens "
                         f"{max_new_tokens} exceeds the model's --max-position-embeddings "
                         f"{limit} (at most {max(limit - len(prompt_ids), 0)} new tokens for "
                         f"this prompt)")


@contextlib.contextmanager
def generation_mode(model: "GPTModel") -> Iterator[None]:
    """Eval mode (no dropout) and dropless MoE routing for the block; both restored after."""
    was_training = model.training
    has_moe = any(layer.is_moe for layer in model.transformer.layers)
    dropping = has_moe and model.config.moe.drop_tokens
    model.eval()
    if dropping:
        model.set_routing(drop_tokens=False)
    try:
        yield
    finally:
        if dropping:
            model.set_routing(drop_tokens=True)
        model.train(was_training)


def generate(model: "GPTModel", prompt_ids: List[int], max_new_tokens: int, *,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None,
             use_cache: bool = True, record_experts: bool = False,
             vocab_size: Optional[int] = None) -> GenerationResult:
    """Up to `max_new_tokens` tokens after `prompt_ids`, stopping after `eos_id` (None: never).

    Sampling: see Sampling (ValueError naming the flag for bad values); seed None draws a
    random seed. vocab_size: ids >= it (Megatron's vocabulary padding) are never chosen.
    record_experts: the experts every prompt and new token used per MoE layer (the last new
    token then runs one more position, so that its own routing is known).
    """
    sampling = Sampling(greedy, temperature, top_k, top_p)
    check_request(model.config, prompt_ids, max_new_tokens)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    decoder = Decoder(model, len(prompt_ids) + max_new_tokens, use_cache, record_experts)
    tokens: List[int] = []
    experts: List[TokenExperts] = []
    with generation_mode(model):
        step = decoder.feed(prompt_ids)
        prompt_experts = step.experts
        while True:
            logits_V = step.logits_V
            if vocab_size is not None and vocab_size < logits_V.numel():
                logits_V = logits_V.clone()
                logits_V[vocab_size:] = float("-inf")
            token = sampling.choose(logits_V, generator)
            tokens.append(token)
            done = token == eos_id or len(tokens) == max_new_tokens
            if done and not record_experts:
                break
            step = decoder.feed([token])
            experts.extend(step.experts or ())
            if done:
                break
    reason = "eos" if tokens[-1] == eos_id else "length"
    if not record_experts:
        return GenerationResult(tokens, reason)
    return GenerationResult(tokens, reason, experts, prompt_experts)


def mean_experts_per_token(experts: Sequence[TokenExperts]) -> Dict[int, float]:
    """{layer number: mean experts per token} over `experts` (empty for a dense model)."""
    layers = sorted({layer for token in experts for layer in token})
    return {layer: sum(len(t[layer]) for t in experts) / max(len(experts), 1)
            for layer in layers}

