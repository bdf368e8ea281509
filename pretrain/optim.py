"""The optimizer and its schedule, shared by every trainer: AdamW with decoupled weight decay on matrices
only, linear warm-up then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from glmwb.pretrain.ranges import Fraction, NonNegFloat, NonNegInt, PositiveFloat, Range


@dataclass(frozen=True)
class OptimConfig:
    lr: PositiveFloat = 3e-3
    min_lr_ratio: Fraction = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: NonNegInt = 50
    weight_decay: NonNegFloat = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    betas: tuple[Annotated[float, Range(0, 1, hi_open=True)], ...] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 disables


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)
