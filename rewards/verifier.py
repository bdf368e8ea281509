"""Likelihood features: what a frozen causal LM thinks of each token of the judged answer, as extra inputs
to the reward head.

    r(x, y) = score(h_T) + W · φ(x, y)        φ = features of log π_LM(y_t | x, y_<t), t over the answer

A scalar head fine-tuned on a few thousand pairs learns surface features (length, filler, language) but
not to *read out* whether a stated value is the one the LM would have written (docs/rewards.md: the base
LM ranks the right answer of a minimal pair first 99 % of the time on facts; a trained head 77 %). The LM
that knows is kept frozen beside the reward model, and a handful of statistics of its per-token
predictions over the answer are added to the reward through learned weights W (one row per head, trained
with the head by the same preference loss). The features are built to separate "the LM was sure of
another token here" (a contradicted belief: a wrong value) from "the LM had no strong guess" (a phrasing
it did not expect), which the plain sum of log-probabilities conflates with length.

Per answer token t (the tokens after the last ``<|assistant|>`` up to and including the terminator), with
p_t the LM's probability of the token written and m_t its largest probability at that position:

- ``contradiction``: max_t m_t · log(m_t / p_t) — the strongest belief the answer goes against (nats);
- ``contradiction_sum``: Σ_t m_t · log(m_t / p_t);
- ``confident_misses``: #{t : m_t > 0.5 and the token written is not the LM's first choice};
- ``logp_sum``: Σ_t log p_t (the plain likelihood; it also pays for length);
- ``logp_min``: min_t log p_t;
- ``length``: the number of answer tokens / 32;
- ``opening_contradiction``: ``contradiction`` over the answer's opening (its first ``OPENING`` tokens: the
  newline GLM writes after ``<|assistant|>`` and the first word, where form and language are decided);
- ``body_contradiction``, ``body_contradiction_sum``, ``body_confident_misses``: the same three over the
  rest, where the content (names, values) is. A language switch or a filler opening then no longer reads
  as a wrong value.

Features are computed in fp32 under ``torch.no_grad`` and never train the LM. The LM is saved in the reward
folder's ``verifier/`` (a GLM causal-LM folder); ``reward_config.json`` records the feature names, W and the
id of the assistant token. ``transformers``' ``GlmForSequenceClassification`` reads only ``score(h_T)``, so
a folder with a verifier scores the same as ours only through ``RewardModel`` / ``RewardScorer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from glmwb.pretrain.model import GLM
from glmwb.rewards.config import VERIFIER_FEATURES, VerifierConfig, check_verifier_features

VERIFIER_DIR = "verifier"
ASSISTANT_TOKEN = "<|assistant|>"
OPENING = 2  # answer tokens in the opening: GLM's newline after <|assistant|> and the first word
DEFAULT_FEATURES = VerifierConfig().features


def answer_spans(
    input_ids: Tensor, score_index: Tensor, assistant_id: int, doc_ids: Tensor | None = None
) -> list[tuple[int, int, int]]:
    """(row, first, last) per scored sequence: the answer's token positions, from the token after the last
    ``<|assistant|>`` before ``score_index`` (in the same packed document) to ``score_index`` itself. A
    sequence without an assistant token (its prompt truncated away) is scored from its second token."""
    B, T = input_ids.shape
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    # running max over positions: the last assistant token so far, and the start of the current document
    last_assistant = torch.where(input_ids == assistant_id, pos, -1).cummax(dim=1).values
    if doc_ids is None:
        doc_start = torch.zeros_like(pos)
    else:
        new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        doc_start = torch.where(new_doc, pos, 0).cummax(dim=1).values
    rows, last = score_index // T, score_index % T
    a, start = last_assistant[rows, last], doc_start[rows, last]
    first = torch.where(a >= start, a + 1, start + 1).minimum(last)
    return list(zip(rows.tolist(), first.tolist(), last.tolist(), strict=True))


def token_features(logprobs: Tensor, targets: Tensor, names: Sequence[str]) -> Tensor:
    """Features (F,) of one answer from the LM's log-probabilities at the positions that predict its tokens:
    logprobs (n, V), targets (n,)."""
    lp = logprobs.gather(-1, targets[:, None])[:, 0]  # log p_t
    top = logprobs.max(-1).values  # log m_t
    m = top.exp()
    regret = top - lp  # log(m_t / p_t) >= 0
    c = m * regret
    miss = ((m > 0.5) & (regret > 1e-6)).float()
    body = c[OPENING:]
    values = {
        "contradiction": c.max(),
        "contradiction_sum": c.sum(),
        "confident_misses": miss.sum(),
        "opening_contradiction": c[:OPENING].max(),
        "body_contradiction": body.max() if len(body) else c.new_zeros(()),
        "body_contradiction_sum": body.sum(),
        "body_confident_misses": miss[OPENING:].sum(),
        "logp_sum": lp.sum(),
        "logp_min": lp.min(),
        "length": torch.tensor(float(len(targets))),
    }
    return torch.stack([values[n] / VERIFIER_FEATURES[n] for n in names])


class LikelihoodVerifier(nn.Module):
    """A frozen causal-LM GLM whose predictions over the answer give ``features`` (N, F)."""

    def __init__(self, lm: GLM, assistant_id: int, names: Sequence[str] = DEFAULT_FEATURES) -> None:
        super().__init__()
        if lm.lm_head is None:
            raise ValueError("the verifier needs a causal-LM GLM (with an lm_head), not a reward model")
        self.lm = lm.eval().requires_grad_(False)
        self.assistant_id = int(assistant_id)
        self.names = check_verifier_features(names)

    def train(self, mode: bool = True) -> LikelihoodVerifier:  # always in eval mode: it is never trained
        super().train(False)
        return self

    @torch.no_grad()
    def forward(
        self,
        input_ids: Tensor,
        score_index: Tensor,
        attention_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        logits = self.lm(
            input_ids, position_ids=position_ids, doc_ids=doc_ids, attention_mask=attention_mask
        ).logits
        out = []
        for row, first, last in answer_spans(input_ids, score_index, self.assistant_id, doc_ids):
            lp = torch.log_softmax(logits[row, first - 1 : last].float(), dim=-1)  # predicts first..last
            out.append(token_features(lp, input_ids[row, first : last + 1], self.names))
        return torch.stack(out)

    def save(self, folder: str | Path, tokenizer=None) -> Path:
        from glmwb.pretrain.hf import save_pretrained

        return save_pretrained(self.lm, Path(folder) / VERIFIER_DIR, tokenizer)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, assistant_id: int, names: Sequence[str], dtype: torch.dtype = torch.float32
    ) -> LikelihoodVerifier:
        from glmwb.pretrain.hf import load_pretrained

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"verifier: no causal-LM GLM folder at {folder} (no config.json)")
        return cls(load_pretrained(folder).to(dtype), assistant_id, names)
