"""In-process batch scoring with a reward folder: what PPO, annotation suggestions and the comparison app call.

    scorer = RewardScorer.from_pretrained("runs/reward/final")
    scorer.score(["What is 2 + 3?", [{"role": "user", "content": "..."}]], ["5", "..."])  # -> [float, float]

A prompt is a string (one user turn) or a list of chat messages; each response is the assistant's answer to
it. Inputs are tokenised exactly as in training (``rewards.data.encode_response``: GLM-4 chat template +
``<|endoftext|>``), sorted by length and scored in batches of at most ``max_batch`` sequences and
``batch_tokens`` padded tokens. Over ``max_length`` tokens: ``truncation="left"`` keeps ``[gMASK]<sop>`` and
the newest tokens (the response stays whole when it fits), ``"error"`` raises ``ScoringError``.
Before tokenizing, a text longer than ``keep_chars`` (``(max_length + 16)`` times the longest token's
length in characters) is cut to its last ``keep_chars`` characters: it alone is over ``max_length`` tokens,
so left truncation would drop everything before the cut anyway, and the cost (time and memory) of a
request is bounded by the model's length, not by the text's.
Bad input raises ``ScoringError`` naming the field ("responses[3]: empty response").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from glmwb.annotation.records import ROLES
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.tokenizer import encode_response
from glmwb.rewards.data import PreferenceDataError, truncate
from glmwb.rewards.ensemble import RewardEnsemble, load_reward_model
from glmwb.rewards.model import RewardModel, reward_pad_id, score_sequences


class ScoringError(ConfigError):
    """Bad scoring input; ``field`` names the offending field ("prompts[2][0].role")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _messages(prompt: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ScoringError(where, "empty prompt")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or not prompt:
        raise ScoringError(
            where, f"must be a string or a non-empty list of chat messages, got {type(prompt).__name__}"
        )
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise ScoringError(f"{where}[{i}]", "must be a message {'role': ..., 'content': '...'}")
        if m.get("role") not in ROLES:
            raise ScoringError(f"{where}[{i}].role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}")
        out.append(dict(m))
    if out[-1]["role"] == "assistant":
        raise ScoringError(f"{where}[{len(out) - 1}]", "the prompt must not end with an assistant turn")
    return out


def chars_per_token(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary entry, special
    tokens aside: text cannot produce them). For a byte-level BPE an entry's length is its bytes, at least
    its characters."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    return max((len(t) for t in tokenizer.get_vocab() if t not in special), default=1)


class RewardScorer:
    def __init__(
        self,
        model: RewardModel | RewardEnsemble,
        tokenizer: Any,
        max_length: int | None = None,
        truncation: str = "left",
        batch_tokens: int = 16384,
        max_batch: int = 64,
        name: str = "reward-model",
    ) -> None:
        if truncation not in ("left", "error"):
            raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length or model.info.max_length or model.config.max_position_embeddings
        self.max_length = min(self.max_length, model.config.max_position_embeddings)
        self.truncation = truncation
        self.batch_tokens, self.max_batch = batch_tokens, max_batch
        self.pad_id = reward_pad_id(tokenizer)
        self.keep_chars = (self.max_length + 16) * chars_per_token(tokenizer)
        self.name = name
        self._lock = threading.Lock()  # one forward at a time (the HTTP server calls from a thread pool)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> RewardScorer:
        from glmwb.pretrain.tokenizer import load_glm_tokenizer

        folder = Path(folder)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_reward_model(
            folder, dtype=dtype, device=device
        )  # a RewardEnsemble for an ensemble folder
        tok = load_glm_tokenizer(folder)
        return cls(
            model,
            tok,
            name=kwargs.pop("name", folder.name if folder.name != "final" else str(folder)),
            **kwargs,
        )

    @property
    def heads(self) -> list[str]:
        return list(self.model.heads)

    def encode(self, prompts: Sequence[Any], responses: Sequence[Any]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per (prompt, response), and whether each was truncated; validates every field."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ScoringError("prompts", "must be a list")
        if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
            raise ScoringError("responses", "must be a list")
        if len(prompts) != len(responses):
            raise ScoringError("responses", f"{len(responses)} responses for {len(prompts)} prompts")
        ids, truncated = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            messages = _messages(prompt, f"prompts[{i}]")
            if not isinstance(response, str):
                raise ScoringError(f"responses[{i}]", f"must be a string, got {type(response).__name__}")
            if not response.strip():
                raise ScoringError(f"responses[{i}]", "empty response")
            cut = False
            if len(response) > self.keep_chars:
                response, cut = self._cut(response, f"responses[{i}]"), True
            for j, m in enumerate(messages):
                if len(m["content"]) > self.keep_chars:
                    m["content"], cut = self._cut(m["content"], f"prompts[{i}][{j}].content"), True
            full = encode_response(self.tokenizer, messages, response, self.model.info.terminator)
            try:
                fitted = truncate(full, self.max_length, self.truncation, f"item {i}")
            except PreferenceDataError:
                raise ScoringError(
                    f"responses[{i}]", f"{len(full)} tokens > max_length {self.max_length}"
                ) from None
            ids.append(fitted)
            truncated.append(cut or len(fitted) < len(full))
        return ids, truncated

    def _cut(self, text: str, field: str) -> str:
        """The last ``keep_chars`` characters of ``text`` (which alone is over ``max_length`` tokens)."""
        if self.truncation == "error":
            raise ScoringError(field, f"{len(text):,} characters: over max_length {self.max_length} tokens")
        return text[-self.keep_chars :]

    def _rewards(self, prompts: Sequence[Any], responses: Sequence[Any]) -> tuple[torch.Tensor, list[bool]]:
        ids, truncated = self.encode(prompts, responses)
        if not ids:
            return torch.empty(0, len(self.heads)), truncated
        with self._lock:
            return score_sequences(self.model, ids, self.pad_id, self.batch_tokens, self.max_batch), truncated

    def score_all(self, prompts: Sequence[Any], responses: Sequence[Any]) -> torch.Tensor:
        """Rewards (N, K) for every head."""
        return self._rewards(prompts, responses)[0]

    def head_index(self, head: str | None) -> int:
        if head is None:
            return 0
        if head not in self.heads:
            raise ScoringError("head", f"{head!r} is not one of this model's heads {self.heads}")
        return self.heads.index(head)

    def score_detailed(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        head: str | None = None,
        normalize: bool = False,
    ) -> tuple[list[float], list[bool]]:
        """(rewards, whether each input was truncated); see ``score``."""
        k = self.head_index(head)
        rewards, truncated = self._rewards(prompts, responses)
        rewards = rewards[:, k]
        if normalize:
            info = self.model.info
            if info.reward_mean and info.reward_std:
                rewards = (rewards - info.reward_mean[k]) / max(info.reward_std[k], 1e-6)
        return rewards.tolist(), truncated

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        head: str | None = None,
        normalize: bool = False,
    ) -> list[float]:
        """One reward per (prompt, response): the first head's unless ``head`` names another; ``normalize``
        standardises with the training responses' reward mean / std (saved in the folder)."""
        return self.score_detailed(prompts, responses, head, normalize)[0]

    def score_heads(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[dict[str, float]]:
        rewards = self.score_all(prompts, responses)
        return [dict(zip(self.heads, row, strict=True)) for row in rewards.tolist()]
