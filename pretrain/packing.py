"""Preference pairs as token ids, laid out padded or packed, and their summed response log-probs.

Packing concatenates the sequences of many pairs into a few rows; ``doc_ids`` keep attention inside each
sequence and restart its positions (``GLM.hidden_states``), so a packed row computes exactly what a padded
batch computes, without the padding's work and memory. Used by packed DPO (align/packed_dpo.py) and by the
reward model's likelihood baseline (rewards/evaluate.py).

    sequence log-prob   log pi(y | x) = sum_{t in response} log softmax(W h_{t-1})[y_t]
    response tokens     the answer and its turn terminator <|endoftext|> (GLM has no end-of-turn token)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from glmwb.pretrain.tokenizer import encode_response

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------
# Tokenised pairs and batches


@dataclass(frozen=True)
class PairTokens:
    """One preference pair as token ids: the rendered prompt (ending with ``<|assistant|>``) and the two
    responses as the model writes them (``\\n`` + answer + ``<|endoftext|>``)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def encode_pair(tok, prompt: Sequence[dict[str, Any]], chosen: str, rejected: str) -> PairTokens:
    """GLM chat template with control tokens in text escaped; the response keeps its terminator."""
    prompt_ids = list(
        tok.apply_chat_template(
            [dict(m) for m in prompt], tokenize=True, return_dict=False, add_generation_prompt=True,
            sanitize_control_tokens=True,
        )
    )  # fmt: skip
    out = []
    for response in (chosen, rejected):
        full = encode_response(tok, prompt, response)  # prompt + answer + <|endoftext|>
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template is not prefix-stable at the generation prompt")
        out.append(tuple(full[len(prompt_ids) :]))
    return PairTokens(tuple(prompt_ids), out[0], out[1])


@dataclass
class SeqBatch:
    """Sequences laid out in rows (packed or padded) with what is needed to sum their response log-probs.

    input_ids / labels (R, T); doc_ids (R, T) for packed rows, attention_mask (R, T) for padded ones;
    seq_index (R, T): the sequence each label belongs to (-1 where labels are ignored). Sequences are
    numbered chosen_0, rejected_0, chosen_1, ... (2B of them)."""

    input_ids: Tensor
    labels: Tensor
    seq_index: Tensor
    num_seqs: int
    lengths: Tensor  # (num_seqs,) response tokens (label positions) of each sequence
    doc_ids: Tensor | None = None
    attention_mask: Tensor | None = None

    @property
    def real_tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int((self.doc_ids >= 0).sum())

    def to(self, device: torch.device | str) -> SeqBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SeqBatch(
            move(self.input_ids), move(self.labels), move(self.seq_index), self.num_seqs, move(self.lengths),
            move(self.doc_ids), move(self.attention_mask),
        )  # fmt: skip


def _sequences(pairs: Sequence[PairTokens]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) for chosen_0, rejected_0, chosen_1, ..."""
    out = []
    for p in pairs:
        out.append((list(p.prompt_ids + p.chosen_ids), len(p.prompt_ids)))
        out.append((list(p.prompt_ids + p.rejected_ids), len(p.prompt_ids)))
    return out


def _fill_labels(labels: Tensor, seq_index: Tensor, row: int, start: int, ids: list[int], plen: int, s: int):
    # position t predicts token t + 1: the response tokens ids[plen:] are predicted at plen - 1 .. len - 2
    n = len(ids)
    labels[row, start + plen - 1 : start + n - 1] = torch.tensor(ids[plen:], dtype=torch.long)
    seq_index[row, start + plen - 1 : start + n - 1] = s


def pad_batch(pairs: Sequence[PairTokens], pad_id: int) -> SeqBatch:
    """The padded layout TRL uses: one row per sequence, right padding to the longest."""
    seqs = _sequences(pairs)
    R, T = len(seqs), max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    seq_index = torch.full((R, T), -1, dtype=torch.long)
    for s, (ids, plen) in enumerate(seqs):
        input_ids[s, : len(ids)] = torch.tensor(ids)
        attention_mask[s, : len(ids)] = 1
        _fill_labels(labels, seq_index, s, 0, ids, plen, s)
    lengths = torch.tensor([len(ids) - plen for ids, plen in seqs])
    return SeqBatch(input_ids, labels, seq_index, R, lengths, attention_mask=attention_mask)


def pack_batch(pairs: Sequence[PairTokens], pad_id: int, row_tokens: int = 1024) -> SeqBatch:
    """Sequences packed first-fit (longest first) into rows of at most ``row_tokens`` (wider when one
    sequence is longer); doc_ids number the sequences, the padding at a row's end is its own document (-1)."""
    seqs = _sequences(pairs)
    width = max(row_tokens, max(len(ids) for ids, _ in seqs))
    rows: list[list[int]] = []  # sequence numbers per row
    room: list[int] = []
    for s in sorted(range(len(seqs)), key=lambda s: -len(seqs[s][0])):
        n = len(seqs[s][0])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(s)
                room[r] -= n
                break
        else:
            rows.append([s])
            room.append(width - n)
    T = max(width - free for free in room)  # trim to the fullest row
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    doc_ids = torch.full((R, T), -1, dtype=torch.long)
    labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    seq_index = torch.full((R, T), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for s in members:
            ids, plen = seqs[s]
            input_ids[r, start : start + len(ids)] = torch.tensor(ids)
            doc_ids[r, start : start + len(ids)] = s
            _fill_labels(labels, seq_index, r, start, ids, plen, s)
            start += len(ids)
    lengths = torch.tensor([len(ids) - plen for ids, plen in seqs])
    return SeqBatch(input_ids, labels, seq_index, len(seqs), lengths, doc_ids=doc_ids)


def make_batch(pairs: Sequence[PairTokens], pad_id: int, packed: bool, row_tokens: int = 1024) -> SeqBatch:
    return pack_batch(pairs, pad_id, row_tokens) if packed else pad_batch(pairs, pad_id)


# ----------------------------------------------------------------------------------------------------------
# Log-probs


def token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """log softmax(hidden @ weight.T)[labels] for rows of hidden (N, D), fp32 (N,): the Triton kernel on
    CUDA, its fp32 PyTorch reference elsewhere (both from kernels/logprobs.py)."""
    from glmwb.kernels.logprobs import linear_selective_logprobs, linear_selective_logprobs_ref

    if hidden.is_cuda:
        return linear_selective_logprobs(hidden, weight, labels)
    return linear_selective_logprobs_ref(hidden, weight, labels)


def sequence_logps(model, batch: SeqBatch) -> Tensor:
    """Summed response log-probs of every sequence in ``batch``: fp32 (num_seqs,). ``model`` is our GLM."""
    hidden = model.hidden_states(
        batch.input_ids, doc_ids=batch.doc_ids, attention_mask=batch.attention_mask
    )  # (R, T, D)
    valid = batch.labels != IGNORE_INDEX  # (R, T)
    logp = token_logprobs(hidden[valid], model.lm_head.weight, batch.labels[valid])  # (N,)
    out = torch.zeros(batch.num_seqs, dtype=torch.float32, device=logp.device)
    return out.index_add(0, batch.seq_index[valid], logp)


def pair_logps(model, batch: SeqBatch) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed log-probs, (B,) each."""
    logps = sequence_logps(model, batch)
    return logps[0::2], logps[1::2]
