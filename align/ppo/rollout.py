"""Rollouts: prompts -> sampled responses (KV-cached, batched, with the log-prob of every sampled token) ->
scores from rules, a reward model or the scoring API.

GLM has no end-of-turn token: a response ends at the first turn terminator it writes (``<|user|>``,
``<|observation|>`` or ``<|endoftext|>``). That token belongs to the response (it is an action the policy
took, gets a log-prob, a KL term and the score) but not to its text. A response that reaches
``max_new_tokens`` without one is *unterminated*: it is scored as it stands and can be penalised.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from glmwb.pretrain.generate import sample_next
from glmwb.pretrain.model import GLM, KVCache

# ----------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptItem:
    """A rollout prompt: chat messages, their token ids (generation prompt included), and what the rules need."""

    messages: list[dict[str, Any]]
    ids: list[int]
    context: Any = None  # rewards.rules.RuleContext
    world_prompt: Any = None  # pretrain.world.Prompt when it comes from the world


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of the rendered conversation + ``<|assistant|>`` (the template writes ``[gMASK]<sop>``; the
    tokenizer adds nothing, so it is not doubled)."""
    from glmwb.pretrain.tokenizer import render_chat

    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def world_items(tokenizer: Any, prompts: Sequence[Any], max_tokens: int) -> tuple[list[PromptItem], int]:
    """PromptItems of world prompts (with their rule context); prompts over ``max_tokens`` are left out and counted."""
    from glmwb.rewards.rules import RuleContext

    items, dropped = [], 0
    for p in prompts:
        ids = encode_prompt(tokenizer, p.messages)
        if len(ids) > max_tokens:
            dropped += 1
            continue
        ctx = RuleContext(prompt=p.messages, world_prompt=p, gold=p.gold, lang=p.lang)
        items.append(PromptItem(list(p.messages), ids, ctx, p))
    return items, dropped


class PromptCycle:
    """Endless seeded shuffles of the training prompts; ``state_dict`` lets a run resume the same order."""

    def __init__(self, items: Sequence[PromptItem], seed: int) -> None:
        if not items:
            raise ValueError("no training prompts")
        self.items, self.seed, self.epoch, self.pos = list(items), seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}|{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[PromptItem]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


# ----------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Samples:
    """One batch of rollouts, laid out for the training forward (see models.py's docstring)."""

    input_ids: Tensor  # (B, P + N): left-padded prompt, then the right-padded response
    attention_mask: Tensor  # (B, P + N)
    response_mask: Tensor  # (B, N): 1 on the response's tokens, terminator included
    prompt_width: int  # P
    sampling_logprobs: Tensor  # (B, N) fp32: log softmax(logits / T) of each sampled token, 0 on padding
    terminated: Tensor  # (B,) bool: the response ended with a turn terminator

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(1)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, P - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model: GLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample one response per prompt with a preallocated KV cache (prefill, then one token per step).

    Returns the layout the trainer scores and trains on, plus the log-prob of each sampled token under the
    policy PPO optimises, softmax(logits / temperature) over the whole vocabulary (with top_p / top_k the
    sample comes from a truncated distribution; the log-prob is still the untruncated one, what the training
    forward computes, so the two can be compared as a check of the padding / position handling).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = _left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, P = prompt_ids.shape
    cache_dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):
        cache_dtype = torch.get_autocast_dtype(device.type)
    cache = KVCache(model.config, B, P + max_new_tokens, device=device, dtype=cache_dtype)
    full_mask = torch.ones((B, P + max_new_tokens), dtype=torch.long, device=device)
    full_mask[:, :P] = prompt_mask
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    terminated = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    response_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        step_ids, steps = prompt_ids, 0
        for t in range(max_new_tokens):
            h = model.hidden_states(
                step_ids, attention_mask=full_mask[:, : cache.length + step_ids.shape[1]], kv_cache=cache
            )  # (B, P or 1, D)
            logits = model.lm_head(h[:, -1]).float()  # (B, V)
            next_ids = sample_next(logits, temperature, top_p, top_k, generator)  # (B,)
            logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            live = ~finished
            tokens[:, t] = torch.where(live, next_ids, pad_id)
            logprobs[:, t] = torch.where(live, logp, 0.0)
            response_mask[:, t] = live.long()
            hit = live & torch.isin(next_ids, stop)
            terminated |= hit
            finished |= hit
            full_mask[:, P + t] = live.long()  # what a finished row is fed from now on is padding
            steps = t + 1
            if bool(finished.all()):
                break
            step_ids = tokens[:, t : t + 1]  # (B, 1)
    finally:
        model.train(was_training)

    N = steps
    input_ids = torch.cat([prompt_ids, tokens[:, :N]], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask[:, :N]], dim=1)
    return Samples(input_ids, attention_mask, response_mask[:, :N], P, logprobs[:, :N], terminated)


def sample_batched(model: GLM, prompts: Sequence[Sequence[int]], batch_size: int, **kwargs: Any) -> Samples:
    """``sample`` in chunks of ``batch_size`` prompts (bounded KV-cache memory), joined into one batch."""
    parts = [sample(model, prompts[i : i + batch_size], **kwargs) for i in range(0, len(prompts), batch_size)]
    return join_samples(parts, kwargs["pad_id"])


def join_samples(parts: Sequence[Samples], pad_id: int) -> Samples:
    """Concatenate batches with different prompt / response widths (re-padding left and right)."""
    if len(parts) == 1:
        return parts[0]
    P = max(s.prompt_width for s in parts)
    N = max(s.response_mask.shape[1] for s in parts)

    def pad(t: Tensor, left: int, right: int, value: float) -> Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    ids, attn, resp, logp = [], [], [], []
    for s in parts:
        left, right = P - s.prompt_width, N - s.response_mask.shape[1]
        ids.append(pad(s.input_ids, left, right, pad_id))
        attn.append(pad(s.attention_mask, left, right, 0))
        resp.append(pad(s.response_mask, 0, right, 0))
        logp.append(pad(s.sampling_logprobs, 0, right, 0.0))
    return Samples(
        torch.cat(ids), torch.cat(attn), torch.cat(resp), P, torch.cat(logp),
        torch.cat([s.terminated for s in parts]),
    )  # fmt: skip


def decode_responses(tokenizer: Any, samples: Samples) -> list[str]:
    """Response texts: the tokens before the terminator (specials dropped), as the reward sees them."""
    out = []
    for row, n, term in zip(
        samples.response_ids.tolist(), samples.lengths.tolist(), samples.terminated.tolist(), strict=True
    ):
        tokens = row[: n - 1] if term else row[:n]
        out.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rewards


class EmptySafeScorer:
    """A reward-model scorer (``RewardScorer`` or ``RewardClient``) that gives empty responses a fixed score
    instead of sending them (both refuse an empty response, and a policy can write one: a bare terminator)."""

    def __init__(self, scorer: Any, empty_score: float, head: str | None = None) -> None:
        self.scorer, self.empty_score, self.head = scorer, empty_score, head

    def score(self, prompts: Sequence[Any], responses: Sequence[str], **kwargs: Any) -> list[float]:
        keep = [i for i, r in enumerate(responses) if r.strip()]
        out = [self.empty_score] * len(responses)
        if keep:
            if self.head is not None:
                kwargs["head"] = self.head
            scores = self.scorer.score([prompts[i] for i in keep], [responses[i] for i in keep], **kwargs)
            for i, s in zip(keep, scores, strict=True):
                out[i] = float(s)
        return out


@dataclass
class RewardFunction:
    """One interface over every reward source: ``CombinedReward`` (rules + RM in-process or over HTTP), then
    the PPO-side penalties. ``__call__`` returns the scores (B,) and one breakdown dict per response."""

    combined: Any  # rewards.rules.CombinedReward
    missing_terminator_penalty: float = 0.0
    length_penalty: float = 0.0
    clip: float | None = None
    terms: list[str] = field(default_factory=list)

    def __call__(
        self,
        items: Sequence[PromptItem],
        texts: Sequence[str],
        lengths: Sequence[int],
        terminated: Sequence[bool],
    ) -> tuple[Tensor, list[dict[str, float]]]:
        prompts = [it.messages for it in items]
        contexts = [it.context for it in items] if all(it.context is not None for it in items) else None
        rows = self.combined.breakdown(prompts, list(texts), contexts)
        scores = []
        for row, n, term in zip(rows, lengths, terminated, strict=True):
            total = row["total"]
            if not term and self.missing_terminator_penalty:
                row["missing_terminator"] = -self.missing_terminator_penalty
                total -= self.missing_terminator_penalty
            if self.length_penalty:
                row["length_tokens"] = -self.length_penalty * n
                total -= self.length_penalty * n
            if self.clip is not None:
                total = max(-self.clip, min(self.clip, total))
            if not math.isfinite(total):
                raise ValueError(f"reward: non-finite score {total} ({row})")
            row["score"] = total
            scores.append(total)
        return torch.tensor(scores, dtype=torch.float32), rows


def build_reward(section: Any, device: str | None = None, client: Any = None) -> tuple[RewardFunction, Any]:
    """(RewardFunction, the RM scorer or None) from a ``RewardSection``: rules, an RM folder, or the scoring API.

    ``client`` replaces the HTTP client of ``RewardClient`` (tests pass FastAPI's TestClient)."""
    from glmwb.rewards.rules import CombinedReward

    rules = {} if section.kind in ("rm", "http") else dict(section.rules)
    scorer = None
    if section.kind in ("rm", "combined") and section.rm:
        from glmwb.rewards.scoring import RewardScorer

        scorer = RewardScorer.from_pretrained(section.rm, device=device)
    elif section.kind in ("http", "combined"):
        from glmwb.rewards.server import RewardClient

        scorer = RewardClient(section.url, client=client)
    rm_weight = section.rm_weight if scorer is not None else 0.0
    safe = EmptySafeScorer(scorer, section.empty_score, section.head) if scorer is not None else None
    combined = CombinedReward(rules, scorer=safe, rm_weight=rm_weight, normalize_rm=section.normalize_rm)
    terms = [*rules, *(["rm"] if rm_weight else [])]
    fn = RewardFunction(
        combined, section.missing_terminator_penalty, section.length_penalty, section.clip, terms
    )
    return fn, scorer
