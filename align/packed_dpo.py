"""Padding-free (packed) DPO on our GLM, and the DPO-family losses as pure functions.

TRL 1.16's DPOTrainer pads every chosen / rejected sequence of a batch to the longest one (its
``padding_free`` option warns and falls back to padding). Here the sequences of many pairs are concatenated
into a few packed rows instead; ``doc_ids`` keep attention inside each sequence and restart the positions
(``pretrain.model.GLM.hidden_states``), so a packed row computes exactly what the padded batch computes,
without the padding's work and memory (``tests/align/test_packed_dpo.py``: loss and gradients equal, fp32).

    sequence log-prob   log pi(y | x) = sum_{t in response} log softmax(W h_{t-1})[y_t]
    response tokens     the answer and its turn terminator <|endoftext|> (GLM has no end-of-turn token)

Only the response positions go through the LM head: the hidden states of those positions are gathered and
``kernels.logprobs`` computes their selective log-probs (the Triton ``linear_selective_logprobs`` on CUDA,
its fp32 PyTorch reference ``linear_selective_logprobs_ref`` on a CPU), then ``index_add`` sums them per
sequence. The reference log-probs are computed once, before the first update, from the same model (no
second model is kept), and stored per pair.

Losses (``LOSSES``; ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``):

| name    | per-pair loss                                                     | paper                         |
|---------|-------------------------------------------------------------------|-------------------------------|
| sigmoid | -log s(beta h)                                                    | DPO, Rafailov et al. 2023     |
| ipo     | (h_c / L_c - h_r / L_r - 1 / (2 beta))^2  (length-normalised, TRL)| IPO, Azar et al. 2023         |
| robust  | (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)            | rDPO, Chowdhury et al. 2024   |
| cdpo    | -(1 - e) log s(beta h) - e log s(-beta h)                         | cDPO, Mitchell 2023           |
| hinge   | max(0, 1 - beta h)                                                | SLiC, Zhao et al. 2023        |
| simpo   | -log s(beta (log pi(y_c) / L_c - log pi(y_r) / L_r) - gamma)      | SimPO, Meng et al. 2024       |

(s = sigmoid, e = label smoothing, L = response tokens; simpo is reference-free.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from glmwb.pretrain.packing import PairTokens, make_batch, pair_logps
from glmwb.pretrain.run_folder import METRICS, MetricsLog, TimeLimit

# ----------------------------------------------------------------------------------------------------------
# Losses: pure functions of per-sequence log-probs, (B,) tensors


@dataclass(frozen=True)
class PairLogps:
    """Per-pair sequence log-probs (B,) and response lengths (B,); ref_* are None when reference-free."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_len: Tensor
    rejected_len: Tensor

    def logratios(self) -> tuple[Tensor, Tensor]:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs (ref_chosen / ref_rejected)")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected


def sigmoid_loss(p: PairLogps, beta: float, **_: float) -> Tensor:
    """DPO: -log sigmoid(beta * h), h = chosen log-ratio - rejected log-ratio. (B,)"""
    c, r = p.logratios()
    return -F.logsigmoid(beta * (c - r))


def ipo_loss(p: PairLogps, beta: float, **_: float) -> Tensor:
    """IPO: (h_c / L_c - h_r / L_r - 1 / (2 beta))^2, log-ratios averaged per response token as TRL does
    (beta is IPO's tau). (B,)"""
    c, r = p.logratios()
    delta = c / p.chosen_len.clamp(min=1) - r / p.rejected_len.clamp(min=1)
    return (delta - 1.0 / (2.0 * beta)) ** 2


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """Robust DPO (unbiased under label-flip rate e):
    (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e). (B,)"""
    c, r = p.logratios()
    z, e = beta * (c - r), label_smoothing
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)


def cdpo_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """Conservative DPO (labels smoothed by e): -(1 - e) log s(beta h) - e log s(-beta h). (B,)"""
    c, r = p.logratios()
    z, e = beta * (c - r), label_smoothing
    return -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)


def hinge_loss(p: PairLogps, beta: float, **_: float) -> Tensor:
    """SLiC-style hinge: max(0, 1 - beta h). (B,)"""
    c, r = p.logratios()
    return torch.relu(1 - beta * (c - r))


def simpo_loss(p: PairLogps, beta: float, simpo_gamma: float = 0.5, **_: float) -> Tensor:
    """SimPO (reference-free): -log s(beta (log pi(y_c) / L_c - log pi(y_r) / L_r) - gamma). (B,)"""
    avg_c = p.chosen / p.chosen_len.clamp(min=1)
    avg_r = p.rejected / p.rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "cdpo": cdpo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
}
REFERENCE_FREE = {"simpo"}


def implicit_rewards(p: PairLogps, beta: float, reference_free: bool = False) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards beta * log(pi / ref) per response (SimPO: beta * mean token log-prob)."""
    if reference_free:
        return beta * p.chosen / p.chosen_len.clamp(min=1), beta * p.rejected / p.rejected_len.clamp(min=1)
    c, r = p.logratios()
    return beta * c, beta * r


def preference_loss(
    kind: str, p: PairLogps, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
) -> Tensor:
    """Mean loss of ``LOSSES[kind]`` over the pairs."""
    if kind not in LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; one of {', '.join(LOSSES)}")
    return LOSSES[kind](p, beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma).mean()


def chosen_nll(p: PairLogps) -> Tensor:
    """RPO's NLL term (Pang et al. 2024), as TRL's ``"sft"`` loss: minus the chosen answers' token
    log-probs summed over the batch, divided by the batch's chosen tokens (a token mean, not a mean of
    per-answer means). A scalar."""
    return -p.chosen.sum() / p.chosen_len.sum().clamp(min=1)


def rpo_loss(
    kind: str, p: PairLogps, beta: float, sft_weight: float = 0.0, label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> Tensor:  # fmt: skip
    """``preference_loss`` + ``sft_weight`` x ``chosen_nll`` (iterative RPO with ``sft_weight`` > 0)."""
    loss = preference_loss(kind, p, beta, label_smoothing, simpo_gamma)
    return loss + sft_weight * chosen_nll(p) if sft_weight > 0 else loss


@torch.no_grad()
def reference_logps(
    model, pairs: Sequence[PairTokens], pad_id: int, batch_pairs: int = 32, row_tokens: int = 1024,
    packed: bool = True, desc: str = "reference log-probs",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(chosen, rejected) log-probs (N,) of every pair under ``model`` as it is now, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for i in tqdm(range(0, len(pairs), batch_pairs), desc=desc, leave=False, disable=len(pairs) < 256):
        batch = make_batch(pairs[i : i + batch_pairs], pad_id, packed, row_tokens).to(device)
        c, r = pair_logps(model, batch)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def pair_metrics(
    logps: tuple[Tensor, Tensor],
    ref: tuple[Tensor, Tensor] | None,
    lengths: tuple[Tensor, Tensor],
    beta: float,
) -> dict[str, float]:
    """Held-out pair statistics: implicit-reward margin / accuracy (policy vs reference log-ratios), and the
    policy's own log-prob margin / accuracy (chosen more likely than rejected, summed and per token)."""
    c, r = logps
    lc, lr = (x.clamp(min=1).float() for x in lengths)
    out = {
        "pairs": len(c),
        "logp_margin": float((c - r).mean()),
        "logp_accuracy": float((c > r).float().mean()),
        "logp_per_token_accuracy": float((c / lc > r / lr).float().mean()),
    }
    if ref is not None:
        rc, rr = ref
        margin = beta * ((c - rc) - (r - rr))
        out["reward_margin"] = float(margin.mean())
        out["reward_accuracy"] = float((margin > 0).float().mean())
        out["reward_chosen"] = float((beta * (c - rc)).mean())
        out["reward_rejected"] = float((beta * (r - rr)).mean())
    return out


# ----------------------------------------------------------------------------------------------------------
# The packed trainer


@dataclass(frozen=True)
class PackedSettings:
    """What the packed loop needs (mapped from the recipe's sections by align/dpo.py)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0  # + weight x mean token NLL of the chosen answers (RPO)
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1
    max_steps: int = 100
    max_minutes: float | None = None
    log_every: int = 5
    row_tokens: int = 1024
    packed: bool = True  # False: the padded layout (for comparisons)
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0


def _lr_at(step: int, s: PackedSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def _optimizer(model, s: PackedSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr, betas=tuple(s.betas), eps=s.eps,
    )  # fmt: skip


def train_packed(
    model, pairs: Sequence[PairTokens], pad_id: int, s: PackedSettings, run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """DPO-family training of our GLM on tokenised pairs, packed rows, reference log-probs precomputed once.

    Writes ``metrics.jsonl`` in ``run_dir`` (when given); returns {steps, seconds, tokens_per_s, history,
    stopped_early, stop_reason}."""
    if not pairs:
        raise ValueError("train_packed: no training pairs")
    if s.loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {s.loss!r}; one of {', '.join(LOSSES)}")
    device = next(model.parameters()).device
    reference_free = s.loss in REFERENCE_FREE
    ref = None
    if not reference_free:  # pi_ref = the policy before its first update
        ref = reference_logps(model, pairs, pad_id, 4 * s.batch_size, s.row_tokens, s.packed)
    model.train()
    opt = _optimizer(model, s)
    rng = random.Random(s.seed)
    order: list[int] = []
    history, window = [], []
    metrics = MetricsLog(run_dir / METRICS) if run_dir else None
    limit = TimeLimit(s.max_minutes)
    started, tokens = limit.started, 0
    step, stopped_early = 0, False
    bar = tqdm(total=s.max_steps, desc=f"{'packed' if s.packed else 'padded'} {s.loss}", leave=False)
    try:
        while step < s.max_steps:
            if limit.reached():
                log(f"{limit.reason} after {step} of {s.max_steps} steps")
                stopped_early = True
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, s)
            opt.zero_grad(set_to_none=True)
            for _ in range(s.grad_accum):
                idx = []
                while len(idx) < s.batch_size:
                    if not order:
                        order = list(range(len(pairs)))
                        rng.shuffle(order)
                    idx.append(order.pop())
                batch = make_batch([pairs[i] for i in idx], pad_id, s.packed, s.row_tokens).to(device)
                c, r = pair_logps(model, batch)
                lengths = batch.lengths.to(device).float()
                p = PairLogps(
                    c, r,
                    None if ref is None else ref[0][idx].to(device),
                    None if ref is None else ref[1][idx].to(device),
                    lengths[0::2], lengths[1::2],
                )  # fmt: skip
                loss = rpo_loss(s.loss, p, s.beta, s.sft_weight, s.label_smoothing, s.simpo_gamma)
                (loss / s.grad_accum).backward()
                tokens += batch.real_tokens
                with torch.no_grad():
                    rc, rr = implicit_rewards(p, s.beta, reference_free)
                    window.append(
                        {
                            "loss": float(loss),
                            "rewards/chosen": float(rc.mean()),
                            "rewards/rejected": float(rr.mean()),
                            "rewards/margins": float((rc - rr).mean()),
                            "rewards/accuracies": float((rc > rr).float().mean()),
                            "logps/chosen": float(c.mean()),
                            "logps/rejected": float(r.mean()),
                        }
                    )
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            if step % s.log_every == 0 or step == s.max_steps:
                row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                elapsed = time.time() - started
                row.update(step=step, lr=_lr_at(step - 1, s), tokens_per_s=tokens / max(elapsed, 1e-9))
                window.clear()
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}")
                if metrics:
                    metrics.write(row)
    finally:
        bar.close()
    elapsed = time.time() - started
    model.eval()
    return {
        "steps": step,
        "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "history": history,
        "stopped_early": stopped_early,
        "stop_reason": limit.reason if stopped_early else None,
    }
