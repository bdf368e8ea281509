"""Reward model: our GLM backbone + a linear head read at the turn terminator, saved as a Hugging Face
``GlmForSequenceClassification`` folder.

    r(prompt, response) = score(h_T)    h = GLM.hidden_states(encode_response(prompt, response))  (B, T, D)

T is the position of the ``<|endoftext|>`` that ends the response (GLM has no end-of-turn token; the
terminator is what the model writes when the answer is done), so the head sees the whole answer. The head
is ``nn.Linear(D, K, bias=False)`` with one output per head name (the first is the overall reward; more
heads score attributes such as correctness or harmlessness).

On disk (``save``): ``config.json`` (``GlmConfig``, ``architectures: [GlmForSequenceClassification]``,
``num_labels`` = K, ``id2label`` = head names, ``pad_token_id`` = the id of ``<eop>``), ``model.safetensors``
in Hugging Face names (``model.*`` + ``score.weight``), the tokenizer (its pad token set to ``<eop>`` too),
and ``reward_config.json`` (tie model and its parameter per head, reward mean / std, max length).
The pad token is *not* ``<|endoftext|>`` on purpose: ``GlmForSequenceClassification`` reads the rightmost
token that is not padding, which must be the terminator, so ``transformers`` and TRL score exactly as we do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.hf import (
    _load_hf_weights,
    _owning_copy,
    from_hf_config,
    to_hf_config,
    to_hf_names,
    to_hf_state_dict,
)
from glmwb.pretrain.model import GLM

PAD_TOKEN = "<eop>"  # never rendered by the GLM-4 template, and escaped when it occurs in text
REWARD_CONFIG = "reward_config.json"


@dataclass
class RewardInfo:
    """What a reward folder knows besides the weights (``reward_config.json``)."""

    heads: list[str] = field(default_factory=lambda: ["reward"])
    tie_model: str = "drop"  # losses.TIE_MODELS key used in training
    tie_params: list[float] = field(default_factory=list)  # nu (Davidson) / theta (Rao-Kupper) per head
    reward_mean: list[float] = field(default_factory=list)  # per head, over the training responses
    reward_std: list[float] = field(default_factory=list)
    max_length: int = 1024
    terminator: str | None = (
        "<|endoftext|>"  # appended after the response; the reward is read at the last token
    )
    extra: dict[str, Any] = field(default_factory=dict)  # evaluation summary, data provenance, ...
    # likelihood features of a frozen LM (rewards/verifier.py, saved in verifier/): names, W (heads x F)
    verifier_features: list[str] = field(default_factory=list)
    verifier_weight: list[list[float]] = field(default_factory=list)
    verifier_assistant_id: int | None = None


class RewardModel(nn.Module):
    """GLM backbone (its lm_head removed) + ``score`` = Linear(D, num_heads, bias=False), and optionally a
    frozen ``LikelihoodVerifier`` whose features enter through ``verifier_weight`` (heads x F, learned)."""

    def __init__(
        self,
        backbone: GLM,
        heads: Sequence[str] = ("reward",),
        info: RewardInfo | None = None,
        keep_lm_head: bool = False,
    ) -> None:
        super().__init__()
        if keep_lm_head and backbone.lm_head is not None:
            # frozen, for an auxiliary language-modelling loss during training; never saved
            backbone.lm_head.weight.requires_grad_(False)
        else:
            backbone.lm_head = (
                None  # not used by hidden_states(); a reward model has no vocabulary projection
            )
        self.backbone = backbone
        self.heads = list(heads)
        d = backbone.config.hidden_size
        self.score = nn.Linear(d, len(self.heads), bias=False)
        # r = <w, h> with h of RMS ~1 after the final norm: std 1/sqrt(D) starts rewards at O(1)
        nn.init.normal_(self.score.weight, std=1.0 / d**0.5)
        self.info = info or RewardInfo(heads=self.heads)
        self.verifier = None
        self.verifier_weight = None

    def attach_verifier(self, verifier: Any, weight: Tensor | None = None) -> RewardModel:
        """Add a frozen ``rewards.verifier.LikelihoodVerifier``; its weights start at zero (the reward is
        unchanged until training moves them) unless ``weight`` (heads x F) is given."""
        k, f = len(self.heads), len(verifier.names)
        w = torch.zeros(k, f) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        if tuple(w.shape) != (k, f):
            raise ValueError(
                f"verifier weight has shape {tuple(w.shape)}, expected (heads, features) = {(k, f)}"
            )
        dtype = self.score.weight.dtype
        self.verifier = verifier.to(device=self.score.weight.device, dtype=dtype)
        self.verifier_weight = nn.Parameter(w.to(self.score.weight.device, dtype))
        return self

    @property
    def config(self) -> GLMConfig:
        return self.backbone.config

    @property
    def gradient_checkpointing(self) -> bool:
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.backbone.gradient_checkpointing = value

    def forward(
        self,
        input_ids: Tensor,
        score_index: Tensor,
        attention_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Rewards (N, K) read at ``score_index``: (N,) flat indices into the (B * T) tokens.

        Padded batch: input_ids (B, T) right-padded, attention_mask (B, T), score_index = b * T + len_b - 1.
        Packed batch (padding-free): input_ids (B, T) holding several sequences per row, doc_ids (B, T) one
        id per sequence (attention stays inside it, positions restart), score_index = each one's last token.
        """
        h = self.backbone.hidden_states(
            input_ids, position_ids=position_ids, doc_ids=doc_ids, attention_mask=attention_mask
        )  # (B, T, D)
        h_last = h.flatten(0, 1)[score_index]  # (N, D): gather first, so the head runs on N rows, not B * T
        rewards = self.score(h_last).float()  # (N, K)
        if self.verifier is not None:
            phi = self.verifier(input_ids, score_index, attention_mask, doc_ids, position_ids)  # (N, F)
            rewards = rewards + phi.float() @ self.verifier_weight.float().T
        return (rewards, h) if return_hidden else rewards

    # -- folders ---------------------------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Hugging Face ``GlmForSequenceClassification`` names: ``model.*`` and ``score.weight``."""
        backbone = {k: v for k, v in self.backbone.state_dict().items() if not k.startswith("lm_head.")}
        sd = to_hf_state_dict(backbone, self.config)
        sd["score.weight"] = self.score.weight
        return sd

    def save(self, folder: str | Path, tokenizer: Any = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        hf_cfg = to_hf_config(cfg)
        hf_cfg.architectures = [
            "Glm4ForSequenceClassification" if cfg.post_norms else "GlmForSequenceClassification"
        ]
        hf_cfg.num_labels = len(self.heads)
        hf_cfg.id2label = dict(enumerate(self.heads))
        hf_cfg.label2id = {h: i for i, h in enumerate(self.heads)}
        hf_cfg.problem_type = "regression"
        if tokenizer is not None:
            hf_cfg.pad_token_id = reward_pad_id(tokenizer)
        hf_cfg.dtype = next(self.parameters()).dtype
        hf_cfg.save_pretrained(folder)
        from safetensors.torch import save_file

        state = {k: _owning_copy(v) for k, v in self.hf_state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tok = _with_reward_pad(tokenizer)
            tok.save_pretrained(folder)
        self.info.heads = list(self.heads)
        if self.verifier is not None:
            self.verifier.save(folder, tokenizer)
            self.info.verifier_features = list(self.verifier.names)
            self.info.verifier_weight = self.verifier_weight.detach().float().cpu().tolist()
            self.info.verifier_assistant_id = self.verifier.assistant_id
        (folder / REWARD_CONFIG).write_text(json.dumps(asdict(self.info), indent=2, ensure_ascii=False))
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        heads: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        keep_lm_head: bool = False,
    ) -> RewardModel:
        """A reward folder (``save`` / ``GlmForSequenceClassification``), or a base / SFT GLM causal-LM folder
        (then the head is new, with ``heads`` outputs, default one "reward")."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"RewardModel.from_pretrained: no config.json in {folder}")
        raw = json.loads(config_path.read_text())
        cfg = from_hf_config(raw)
        weights = _load_hf_weights(folder)
        head_weight = weights.pop("score.weight", None)
        lm_head = weights.pop("lm_head.weight", None)  # a causal LM's vocabulary projection
        names = {k: v for k, v in to_hf_names(cfg).items() if k != "lm_head.weight"}
        expected = {n for hf in names.values() for n in hf}
        missing, unexpected = (
            expected - weights.keys(),
            {k for k in weights.keys() - expected if "rotary" not in k},
        )
        if missing or unexpected:
            raise KeyError(
                f"RewardModel.from_pretrained({folder}): missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )
        sd = {
            ours: (weights[hf[0]] if len(hf) == 1 else torch.cat([weights[n] for n in hf], dim=0)).to(dtype)
            for ours, hf in names.items()
        }
        with torch.device("meta"):
            backbone = GLM(cfg)
        if keep_lm_head:
            if lm_head is None:
                raise ValueError(
                    f"{folder} has no lm_head (a reward folder?): an LM loss needs a causal-LM init"
                )
            sd["lm_head.weight"] = lm_head.to(dtype)
        else:
            backbone.lm_head = None
        backbone.load_state_dict(sd, assign=True)
        info = RewardInfo()
        if (folder / REWARD_CONFIG).is_file():
            saved = json.loads((folder / REWARD_CONFIG).read_text())
            if saved.pop("verifier_gate", False):
                raise ValueError(
                    f"{folder}: its feature weights are gated (verifier/gate.safetensors), which this reward "
                    "model does not read; retrain it with the recipe's plain feature weights"
                )
            info = RewardInfo(**saved)
        if head_weight is not None:
            saved_heads = [
                raw.get("id2label", {}).get(str(i), f"head_{i}") for i in range(head_weight.shape[0])
            ]
            if heads is not None and list(heads) != saved_heads:
                raise ValueError(f"{folder} has reward heads {saved_heads}, asked for {list(heads)}")
            model = cls(backbone, saved_heads, info)
            model.score.weight = nn.Parameter(head_weight.to(dtype))
        else:
            model = cls(backbone, list(heads or ("reward",)), keep_lm_head=keep_lm_head)
            model.score.to(dtype)
        if info.verifier_features:
            from glmwb.rewards.verifier import VERIFIER_DIR, LikelihoodVerifier

            verifier = LikelihoodVerifier.from_pretrained(
                folder / VERIFIER_DIR, info.verifier_assistant_id, info.verifier_features, dtype
            )
            model.attach_verifier(verifier, info.verifier_weight)
        return model.to(device) if device is not None else model


def reward_pad_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {PAD_TOKEN} token to pad reward-model batches with")
    return token_id


def _with_reward_pad(tokenizer: Any) -> Any:
    """A copy of the tokenizer whose pad token is ``<eop>`` (so TRL and transformers pad like we do)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------------------------------------
# Batches


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded (B, T) input_ids / attention_mask and the flat score index of each last token."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    lengths = mask.sum(1)
    score_index = torch.arange(len(sequences)) * T + lengths - 1  # (B,)
    return {"input_ids": ids, "attention_mask": mask, "score_index": score_index}


def packed_batch(sequences: Sequence[Sequence[int]], pad_id: int, row_tokens: int) -> dict[str, Tensor]:
    """Padding-free packing: sequences laid end to end into rows of at most ``row_tokens`` tokens (first fit,
    in the given order, which is kept in ``score_index``), rows padded to the longest row.

    doc_ids (B, T): one id per sequence (padding has its own), so attention stays within a sequence and
    positions restart at 0 (``GLM.hidden_states``); score_index (N,) = flat index of each sequence's last token.
    """
    rows: list[list[int]] = []  # sequence indices per row
    fill: list[int] = []
    for i, s in enumerate(sequences):
        n = len(s)
        for r, used in enumerate(fill):
            if used + n <= row_tokens:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    T = max(fill)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    score_index = torch.empty(len(sequences), dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for i in members:
            s = sequences[i]
            ids[r, pos : pos + len(s)] = torch.tensor(s, dtype=torch.long)
            doc_ids[r, pos : pos + len(s)] = i
            score_index[i] = r * T + pos + len(s) - 1
            pos += len(s)
    return {"input_ids": ids, "doc_ids": doc_ids, "score_index": score_index}


def score_sequences(
    model: RewardModel,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_tokens: int = 8192,
    max_batch: int = 64,
) -> Tensor:
    """Rewards (N, K) of token sequences, in batches of similar length (sorted), returned in input order."""
    return _in_length_batches(model, model, sequences, pad_id, len(model.heads), batch_tokens, max_batch)


def verifier_features(
    model: RewardModel,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_tokens: int = 8192,
    max_batch: int = 64,
) -> Tensor:
    """The likelihood features φ (N, F) of ``model.verifier`` on token sequences, in input order."""
    if model.verifier is None:
        raise ValueError("the reward model has no verifier (model.verifier.enabled)")
    width = len(model.verifier.names)
    return _in_length_batches(model, model.verifier, sequences, pad_id, width, batch_tokens, max_batch)


def _in_length_batches(model, fn, sequences, pad_id, width, batch_tokens, max_batch) -> Tensor:
    """``fn(**padded batch)`` (N, width) over sequences batched by similar length, under no_grad in eval."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.empty(len(sequences), width)
    start = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while start < len(order):
            end = start + 1
            # the longest sequence of a sorted chunk is its last: grow while rows x longest fits the budget
            while (
                end < len(order)
                and end - start < max_batch
                and (end - start + 1) * len(sequences[order[end]]) <= batch_tokens
            ):
                end += 1
            idx = order[start:end]
            batch = padded_batch([sequences[i] for i in idx], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out[idx] = fn(**batch).float().cpu()
            start = end
    model.train(was_training)
    return out
