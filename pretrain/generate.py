"""Batched sampling from our GLM: left padding + attention mask, a preallocated KV cache (prefill, then one
token per step), temperature / top-k / top-p, and per-row stop tokens (GLM has no end-of-turn token: a turn
ends at <|user|>, <|observation|> or <|endoftext|>, the config's ``eos_token_ids``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from glmwb.pretrain.model import GLM, KVCache


def _left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> input_ids (B, T) padded on the left, attention_mask (B, T) with 0 on the padding."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, T - len(r) :] = 1
    return input_ids, attention_mask


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row from logits (B, V): argmax when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the top_k largest (top_k > 0) and to the smallest set whose
    probability reaches top_p (top_p < 1; the most likely token is always kept). Returns (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GLM,
    input_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens only, per row, ending
    with the stop token when one was hit.

    input_ids: token lists of any lengths (left-padded here) or a (B, T) tensor (with an optional
    ``attention_mask`` (B, T), 0 = left padding). stop_token_ids: defaults to ``model.config.eos_token_ids``;
    pass ``()`` to never stop early. pad_token_id: what finished rows are fed (defaults to the config's, else
    0). Greedy when ``temperature == 0``; ``seed`` (or a ``generator``) makes sampling reproducible.
    """
    cfg = model.config
    stop_ids = tuple(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    )
    param = next(model.parameters())
    device = param.device

    if isinstance(input_ids, Tensor):
        ids = input_ids.to(device=device, dtype=torch.long)
        mask = (
            torch.ones_like(ids)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long)
        )
    else:
        ids, mask = _left_pad(input_ids, pad)
        ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    if max_new_tokens <= 0:
        return [[] for _ in range(B)]
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg, B, T + max_new_tokens, device=device, dtype=param.dtype)
        full_mask = torch.ones((B, T + max_new_tokens), dtype=torch.long, device=device)  # (B, T + N)
        full_mask[:, :T] = mask
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, N)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)

        step_ids = ids  # prefill the prompt, then feed one token per step
        for t in range(max_new_tokens):
            h = model.hidden_states(
                step_ids, attention_mask=full_mask[:, : cache.length + step_ids.shape[1]], kv_cache=cache
            )  # (B, T or 1, D)
            logits = model.lm_head(h[:, -1])  # (B, V): only the last position is needed
            next_ids = sample_next(logits, temperature, top_p, top_k, generator)  # (B,)
            next_ids = next_ids.masked_fill(finished, pad)
            new_tokens[:, t] = next_ids
            just_stopped = ~finished & torch.isin(next_ids, stop)
            lengths = torch.where(just_stopped, t + 1, lengths)
            finished |= just_stopped
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]  # (B, 1)
    finally:
        model.train(was_training)

    return [row[:n] for row, n in zip(new_tokens.tolist(), lengths.tolist(), strict=True)]


def load_policy(folder: str | Path, device: str | None = None):
    """(our GLM in eval mode, its tokenizer) from a Hugging Face policy folder."""
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.tokenizer import load_glm_tokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
    model = load_pretrained(folder, device=device).eval()
    return model, load_glm_tokenizer(folder)


@torch.no_grad()
def generate_answers(
    model,
    tok,
    prompts: Sequence[Sequence[dict[str, Any]]],
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """One answer per chat prompt (a list of messages ending with a user turn), decoded without specials.

    Prompts are sorted by length and generated in batches (less left padding); the order of the result is
    the order of ``prompts``."""
    from glmwb.pretrain.tokenizer import render_chat, turn_terminator_ids

    ids = [
        tok(render_chat(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    stops = turn_terminator_ids(tok)
    answers: list[str] = [""] * len(ids)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        outs = generate(
            model,
            [ids[i] for i in rows],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_token_ids=stops,
            pad_token_id=tok.pad_token_id,
            seed=seed + start,
        )
        for i, out in zip(rows, outs, strict=True):
            answers[i] = tok.decode(out, skip_special_tokens=True).strip()
    return answers
