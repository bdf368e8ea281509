"""The models PPO holds: the actor (our GLM, optionally LoRA, optionally carrying the value head on its own
backbone), a separate critic (GLM backbone + value head), and the frozen reference (a copy, or the LoRA
actor with its adapter switched off, so no extra weights are resident).

Alignment of a rollout batch (B rows, prompt width P left-padded, response width N right-padded):

    input_ids      [pad pad p0 p1 p2 | a0 a1 a2 pad]       (B, P + N)
    attention_mask [ 0   0  1  1  1  |  1  1  1  0 ]
    hidden h       position P - 1 + t reads s_t = prompt + a_<t and predicts a_t

so the log-prob of a_t and the value V(s_t) both come from ``h[:, P - 1 + t]``, t = 0 .. N - 1.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glmwb.pretrain.model import GLM, IGNORE_INDEX
from glmwb.pretrain.settings import LoRAConfig

# ----------------------------------------------------------------------------------------------------------
# Log-probabilities of chosen tokens


def token_logprobs(
    hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    kernel: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """log softmax(lm_head(h) / T) at ``labels`` and (optionally) the entropy of that distribution, fp32.

    hidden (B, N, D), labels (B, N) with -100 where there is no token (then 0 is returned). ``kernel``
    "triton" uses kernels.logprobs.linear_selective_logprobs (the (B, N, V) logits never exist: the win for a
    150k vocabulary on a GPU); "torch" is the plain fp32 log-softmax.
    """
    if kernel == "triton":
        from glmwb.kernels.logprobs import linear_selective_logprobs

        weight = lm_head.weight
        out = linear_selective_logprobs(hidden, weight, labels, temperature, return_entropy)
        return (out[0], out[1]) if return_entropy else (out, None)
    logits = lm_head(hidden).float() / temperature  # (B, N, V)
    logp_all = F.log_softmax(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    logp = logp_all.gather(-1, safe[..., None]).squeeze(-1) * valid  # (B, N)
    entropy = None
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * valid  # (B, N)
    return logp, entropy


def response_labels(input_ids: Tensor, response_mask: Tensor, prompt_width: int) -> Tensor:
    """The response tokens (B, N) with -100 on padding."""
    return input_ids[:, prompt_width:].masked_fill(response_mask == 0, IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------
# Value head, actor, critic


class ValueHead(nn.Module):
    """V(s) = <w, h>: a bias-free linear read of the final-norm hidden state, so a critic is exactly a
    one-head reward model (it is saved as a ``GlmForSequenceClassification`` folder with head "value")."""

    def __init__(self, hidden_size: int, init_weight: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size))  # zero: values start at 0
        if init_weight is not None:
            self.weight.data.copy_(init_weight.reshape(1, hidden_size))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight).squeeze(-1).float()  # (..., ) fp32


@dataclass
class ForwardOut:
    logprobs: Tensor | None  # (B, N) fp32, 0 on padding
    entropy: Tensor | None  # (B, N) fp32
    values: Tensor | None  # (B, N) fp32


class Actor(nn.Module):
    """The policy GLM, and the value head when the critic shares its backbone."""

    def __init__(self, glm: GLM, value_head: ValueHead | None = None) -> None:
        super().__init__()
        self.glm = glm
        self.value_head = value_head

    @property
    def config(self):
        return self.glm.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompt_width: int,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_values: bool = True,
        kernel: str = "torch",
    ) -> ForwardOut:
        h = self.glm.hidden_states(input_ids, attention_mask=attention_mask)  # (B, P + N, D)
        N = input_ids.shape[1] - prompt_width
        h = h[:, prompt_width - 1 : prompt_width - 1 + N]  # (B, N, D): the states that choose a_0 .. a_N-1
        labels = response_labels(input_ids, response_mask, prompt_width)
        logp, entropy = token_logprobs(h, self.glm.lm_head, labels, temperature, return_entropy, kernel)
        values = None
        if self.value_head is not None and return_values:
            values = self.value_head(h) * response_mask
        return ForwardOut(logp, entropy, values)


class Critic(nn.Module):
    """A separate value model: a GLM backbone (no lm_head) + ``ValueHead``."""

    def __init__(self, backbone: GLM, head: ValueHead) -> None:
        super().__init__()
        backbone.lm_head = None
        self.backbone = backbone
        self.head = head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, prompt_width: int
    ) -> Tensor:
        h = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # (B, P + N, D)
        N = input_ids.shape[1] - prompt_width
        return self.head(h[:, prompt_width - 1 : prompt_width - 1 + N]) * response_mask  # (B, N)

    @classmethod
    def from_folder(cls, folder: str | Path, head: str | None = None, zero_head: bool = True) -> Critic:
        """From a reward folder (its head ``head``, default the first, becomes the value head) or a causal-LM
        GLM folder (a new value head, zero unless ``zero_head=False``)."""
        from glmwb.rewards.model import RewardModel

        rm = RewardModel.from_pretrained(folder)
        has_head = (Path(folder) / "config.json").is_file() and _is_reward_folder(Path(folder))
        weight = None
        if has_head:
            k = rm.heads.index(head) if head else 0
            weight = rm.score.weight.data[k]
        elif not zero_head:
            weight = rm.score.weight.data[0]
        return cls(rm.backbone, ValueHead(rm.config.hidden_size, weight))

    def save(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """As a one-head reward folder ("value"): loadable by ``RewardModel.from_pretrained`` and transformers."""
        from glmwb.rewards.model import RewardModel

        rm = RewardModel(merged_glm(self.backbone), heads=["value"])
        rm.score.weight = nn.Parameter(self.head.weight.detach().clone())
        return rm.save(folder, tokenizer)


def _is_reward_folder(folder: Path) -> bool:
    import json

    arch = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return any("SequenceClassification" in a for a in arch)


# ----------------------------------------------------------------------------------------------------------
# LoRA and the reference


def apply_lora(glm: GLM, cfg: LoRAConfig) -> GLM:
    """PEFT LoRA adapters on the GLM's target linears; everything else frozen (the lm_head included)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )
    inject_adapter_in_model(lora, glm)
    for name, p in glm.named_parameters():
        p.requires_grad = "lora_" in name
    return glm


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every LoRA layer off, the trainable flags restored afterwards."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError(
            "adapters_disabled: the model has no LoRA layers (the reference would be the policy)"
        )
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for n, p in module.named_parameters():
            p.requires_grad = flags[n]


def merged_glm(glm: GLM) -> GLM:
    """A plain GLM (new tensors) with any LoRA adapters merged in: what is saved as the policy folder."""
    from glmwb.rewards.train import plain_state_dict

    sd = {k: v.detach().clone() for k, v in plain_state_dict(glm).items()}
    with torch.device("meta"):
        out = GLM(glm.config)
    if glm.lm_head is None:  # a critic's backbone
        out.lm_head = None
    out.load_state_dict(sd, assign=True)
    return out


class Reference:
    """Log-probs of the frozen initial policy, from a frozen copy or from the LoRA actor with its adapter off."""

    def __init__(self, actor: Actor, mode: str) -> None:
        if mode not in ("copy", "adapter_off"):
            raise ValueError(f"reference must be 'copy' or 'adapter_off', got {mode!r}")
        self.mode = mode
        self.actor = actor
        self.glm: GLM | None = None
        if mode == "copy":
            self.glm = copy.deepcopy(actor.glm).eval()
            self.glm.requires_grad_(False)

    @torch.no_grad()
    def logprobs(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, prompt_width: int,
        temperature: float, kernel: str = "torch",
    ) -> Tensor:  # fmt: skip
        if self.mode == "copy":
            ref = Actor(self.glm)
            return ref(
                input_ids, attention_mask, response_mask, prompt_width, temperature, kernel=kernel
            ).logprobs
        was_training = self.actor.training
        self.actor.eval()
        try:
            with adapters_disabled(self.actor.glm):
                out = self.actor(input_ids, attention_mask, response_mask, prompt_width, temperature,
                                 return_values=False, kernel=kernel)  # fmt: skip
        finally:
            self.actor.train(was_training)
        return out.logprobs

    def to(self, device: torch.device) -> Reference:
        if self.glm is not None:
            self.glm.to(device)
        return self


def parameter_count(*modules: nn.Module | None) -> dict[str, float]:
    """Resident and trainable parameters (millions), each tensor counted once (shared ones too)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            seen[id(p)] = p
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"resident_M": total / 1e6, "trainable_M": trainable / 1e6}
