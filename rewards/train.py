"""Reward-model training loop: pairs -> rewards at the terminator -> preference loss (Bradley-Terry, or a ties
model, with margins, annotator weights, centering, one loss per head) -> AdamW with warm-up + cosine,
gradient accumulation, clipping; held-out evaluation, resumable checkpoints, metrics JSONL and a plot.

Reused from ``pretrain/train.py``: the optimizer (decay on matrices only), the schedule, device / autocast
choice and RNG state. Batches are either right-padded (chosen and rejected of B pairs = 2B rows) or packed
padding-free (``packing: true``: the 2B sequences laid end to end in rows of ``pack_tokens`` with doc ids, so
attention stays within each sequence). Full fine-tuning, or LoRA through PEFT on the GLM's linear layers
(then only the adapters, the head and the tie parameter train; the saved folder has the adapters merged).

The run folder (pretrain/run_folder.py) holds:
    metrics.jsonl                one JSON line per logged step / evaluation
    training.png                 loss (train and held-out), held-out accuracy, the tie parameter
    checkpoints/step_000123/     reward folder + trainer_state.pt (optimizer, RNG, data order, step)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from glmwb.pretrain import run_folder
from glmwb.pretrain.model import IGNORE_INDEX, causal_lm_loss
from glmwb.pretrain.optim import OptimConfig, lr_at, make_optimizer
from glmwb.pretrain.run_folder import Budget, Curve, Panel, rng_state, set_rng_state
from glmwb.pretrain.settings import LoRAConfig
from glmwb.pretrain.strategy import SingleDevice
from glmwb.pretrain.train import autocast_dtype, resolve_device, seed_everything
from glmwb.rewards.config import RewardLossConfig, RewardTrainConfig
from glmwb.rewards.data import EncodedPair
from glmwb.rewards.evaluate import pairwise_metrics
from glmwb.rewards.losses import TIE_PARAM_TRANSFORMS, centering_loss, label_mask, multi_head_loss
from glmwb.rewards.model import RewardModel, packed_batch, padded_batch, score_sequences, verifier_features

# ----------------------------------------------------------------------------------------------------------
# LoRA


def apply_lora(model: RewardModel, cfg: LoRAConfig) -> RewardModel:
    """Inject PEFT LoRA adapters into the backbone's target linears; freeze the rest of the backbone."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )
    inject_adapter_in_model(lora, model.backbone)
    for name, p in model.backbone.named_parameters():
        p.requires_grad = "lora_" in name
    model.score.weight.requires_grad = True
    return model


def plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with any PEFT LoRA layers merged (W + scale B A) under their plain names."""
    sd = module.state_dict()
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return sd
    lora = {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    if not lora:
        return sd
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, param = name.split(".base_layer.")
            if param == "weight" and not lora[owner].merged:
                for adapter in lora[owner].active_adapters:
                    t = t + lora[owner].get_delta_weight(adapter).to(t.dtype)
            name = f"{owner}.{param}"
        out[name] = t.detach()
    return out


# ----------------------------------------------------------------------------------------------------------
# Data order


class PairSampler:
    """Shuffled passes over the pairs (a new permutation each epoch, from the seed); resumable."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(self.batch_size - len(out), self.n - self.pos)
            out += self._perm[self.pos : self.pos + take].tolist()
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


# ----------------------------------------------------------------------------------------------------------
# One micro-batch


def pair_rewards(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_id: int,
    packing: bool,
    pack_tokens: int,
    device,
    lm_loss: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rewards (B, K) of the chosen and of the rejected responses of B pairs, in one forward; with
    ``lm_loss`` also the next-token loss on the chosen responses (padded batches; the frozen lm_head)."""
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    if packing:
        batch = packed_batch(sequences, pad_id, max(pack_tokens, max(map(len, sequences))))
    else:
        batch = padded_batch(sequences, pad_id)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if not lm_loss:
        rewards = model(**batch)  # (2B, K)
        return rewards[: len(pairs)], rewards[len(pairs) :], None
    if packing:
        raise ValueError("loss.lm_coef needs padded batches (train.packing: false)")
    rewards, h = model(**batch, return_hidden=True)  # (2B, K), (2B, T, D)
    B = len(pairs)
    ids = batch["input_ids"][:B]  # (B, T) the chosen sequences
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T)
    start = torch.tensor([p.chosen_start for p in pairs], device=ids.device)[:, None]  # (B, 1)
    labels = torch.where((pos >= start) & batch["attention_mask"][:B].bool(), ids, IGNORE_INDEX)  # (B, T)
    lm_head = getattr(model, "module", model).backbone.lm_head
    return rewards[:B], rewards[B:], causal_lm_loss(lm_head(h[:B]), labels)


def pair_tensors(pairs: Sequence[EncodedPair], device) -> dict[str, Tensor]:
    return {
        "labels": torch.tensor([p.labels for p in pairs], dtype=torch.long, device=device),  # (B, K)
        "weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device),  # (B,)
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=device),  # (B,)
        "tie": torch.tensor([p.tie for p in pairs], dtype=torch.bool, device=device),  # (B,)
    }


class TieParameter(nn.Module):
    """The tie model's parameter per head, stored unconstrained (``raw``) and mapped to nu >= 0 / theta > 1."""

    def __init__(self, tie_model: str, init: float, num_heads: int, learn: bool) -> None:
        super().__init__()
        transform, inverse = TIE_PARAM_TRANSFORMS[tie_model]
        self.tie_model, self.transform = tie_model, transform
        raw = torch.full((num_heads,), inverse(init), dtype=torch.float32)
        self.raw = nn.Parameter(raw, requires_grad=learn and tie_model != "drop")

    def forward(self) -> Tensor:
        return self.transform(self.raw)  # (K,)


def evaluate_pairs(
    model: RewardModel, pairs: Sequence[EncodedPair], pad_id: int, tie_model: str, tie_params: Sequence[float]
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """Held-out metrics of the first head (and accuracy per attribute head); the rewards (N, K) both sides."""
    rewards = score_sequences(model, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id)
    chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
    tie = torch.tensor([p.tie for p in pairs], dtype=torch.bool)
    metrics = pairwise_metrics(chosen[:, 0], rejected[:, 0], tie, tie_model, tie_params[0])
    labels = torch.tensor([p.labels for p in pairs], dtype=torch.long)
    for k, head in enumerate(model.heads[1:], 1):
        strict = (labels[:, k] == 1) | (labels[:, k] == -1)
        if strict.any():
            d = (chosen[strict, k] - rejected[strict, k]) * labels[strict, k]
            metrics[f"accuracy/{head}"] = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
    return metrics, chosen, rejected


def reward_statistics(model, pairs: Sequence[EncodedPair], pad_id: int, seed: int, n: int = 256) -> None:
    """Set ``model.info.reward_mean`` / ``reward_std`` (per head) over the responses of (a seeded sample of
    ``n``) training pairs: what PPO and the scoring API normalise with."""
    sample = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))[:n]]
    rewards = score_sequences(
        model, [p.chosen_ids for p in sample] + [p.rejected_ids for p in sample], pad_id
    )
    model.info.reward_mean, model.info.reward_std = rewards.mean(0).tolist(), rewards.std(0).tolist()


def _full_batch_loss_inputs(
    pairs: Sequence[EncodedPair], loss_cfg: RewardLossConfig
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The pairs' tensors (CPU), their weights (float64) and the per-head normaliser (K,) of the loss over all of
    them at once, as the fits on cached features use it."""
    t = pair_tensors(pairs, "cpu")
    weight = (
        t["weight"].double() if loss_cfg.weights != "none" else torch.ones(len(pairs), dtype=torch.float64)
    )
    norm = (weight[:, None] * label_mask(t["labels"], loss_cfg.tie_model)).sum(0).clamp_min(1e-9)  # (K,)
    return t, weight, norm


def prefit_verifier(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_id: int,
    loss_cfg: RewardLossConfig,
    tie: TieParameter,
    max_iter: int = 100,
    offset: tuple[Tensor, Tensor] | None = None,
    features: Tensor | None = None,
) -> dict[str, Any]:
    """Fit the likelihood-feature weights W (and the tie parameter) alone, by the training loss on ``pairs``,
    before the joint training; the backbone and the head are not touched. ``offset``: rewards (n, K) of the
    chosen and rejected responses that W·φ adds to (the trained head's, for ``train.value_first``); none: 0.
    ``features``: the pairs' φ (2n, F), chosen then rejected, when the caller has them already.

    The verifier is frozen, so its features are computed once and the fit is a small convex problem (full
    batch, L-BFGS). Started from W = 0 instead, the head learns the surface features that stand in for a
    value check in the first steps (filler and the other language come with right values in the world) and
    keeps them after W has caught up (docs/rewards.md, "Likelihood features"). Returns the fit's summary."""
    n = len(pairs)
    if features is None:
        features = verifier_features(
            model, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id
        )
    phi_c, phi_r = features[:n].double().cpu(), features[n:].double().cpu()  # (n, F)
    t, weight, norm = _full_batch_loss_inputs(pairs, loss_cfg)
    margin = t["margin"].double() * loss_cfg.margin_scale if loss_cfg.use_margin else None
    off_c, off_r = (o.double().cpu() for o in offset) if offset is not None else (0.0, 0.0)
    W = torch.zeros_like(model.verifier_weight, dtype=torch.float64, device="cpu").requires_grad_(True)
    raw = tie.raw.detach().double().cpu().clone().requires_grad_(tie.raw.requires_grad)
    params = [W] + ([raw] if raw.requires_grad else [])
    opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss_at() -> Tensor:
        y, tie_param = t["labels"], tie.transform(raw)
        loss, _ = multi_head_loss(
            off_c + phi_c @ W.T, off_r + phi_r @ W.T, y, loss_cfg.tie_model, tie_param, margin, weight, norm
        )
        return loss

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_at()
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(loss_at())
    opt.step(closure)
    with torch.no_grad():
        after = float(loss_at())
        d = off_c - off_r + (phi_c - phi_r) @ W.T  # (n, K)
        y = t["labels"][:, 0]
        strict = (y == 1) | (y == -1)
        acc = float(((d[strict, 0] * y[strict]) > 0).double().mean()) if strict.any() else math.nan
    if not math.isfinite(after):
        raise ValueError("train.verifier_prefit_pairs: the feature-weight fit diverged (non-finite loss)")
    model.verifier_weight.data.copy_(W.detach().to(model.verifier_weight))
    tie.raw.data.copy_(raw.detach().to(tie.raw))
    return {"pairs": n, "loss_before": before, "loss_after": after, "train_accuracy": acc,
            "weight": W.detach().tolist()}  # fmt: skip


def best_value_scale(
    head_gap: Tensor, value_gap: Tensor, strict: Tensor, scales: Sequence[float]
) -> tuple[float, dict[float, float]]:
    """``train.value_scales``: the k whose reward head + k · value ranks the most strict pairs right, and each
    k's accuracy. head_gap, value_gap (N,): the chosen-minus-rejected rewards of the head and of the fitted
    feature weights; strict (N,) bool: the pairs that count (not ties). Equal accuracies: the k nearest 1
    (the fit's own weights)."""
    accuracy = {float(k): float(((head_gap + k * value_gap)[strict] > 0).double().mean()) for k in scales}
    best = max(accuracy, key=lambda k: (accuracy[k], -abs(k - 1.0)))
    return best, accuracy


def fit_value_first(
    model: RewardModel,
    value_pairs: Sequence[EncodedPair],
    form_pairs: Sequence[EncodedPair],
    pad_id: int,
    loss_cfg: RewardLossConfig,
    tie: TieParameter,
    scales: Sequence[float],
) -> dict[str, Any]:
    """``train.value_first``'s second fit. The head has learnt the answers' form from ``form_pairs`` (both
    answers equally right); now the likelihood-feature weights W are fitted on ``value_pairs`` with the head's
    rewards as a fixed offset, and scaled by the k in ``scales`` whose reward head + k·W·φ ranks the most strict
    training pairs (both kinds) right — the annotators rank the value first, so the likelihood fit, which
    spreads the label noise over both terms, tends to weigh the value check too little. Returns a summary."""
    pairs = list(value_pairs) + list(form_pairs)
    n = len(value_pairs)
    with torch.no_grad():
        model.verifier_weight.zero_()
        _, head_c, head_r = evaluate_pairs(model, pairs, pad_id, loss_cfg.tie_model, tie().tolist())
        head_c, head_r = head_c.float().cpu(), head_r.float().cpu()
    phi = verifier_features(
        model, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id
    ).cpu()  # (2N, F): the chosen responses, then the rejected
    value_phi = torch.cat([phi[:n], phi[len(pairs) : len(pairs) + n]])
    fit = prefit_verifier(
        model, value_pairs, pad_id, loss_cfg, tie, offset=(head_c[:n], head_r[:n]), features=value_phi
    )
    W = model.verifier_weight.detach().double().cpu()  # (K, F)
    value_c, value_r = (phi[: len(pairs)].double() @ W.T), (phi[len(pairs) :].double() @ W.T)  # (N, K)
    value_gap, head_gap = (value_c - value_r)[:, 0], (head_c - head_r)[:, 0].double()  # (N,)
    strict = torch.tensor([p.labels[0] == 1 and not p.tie for p in pairs])
    best, accuracy = best_value_scale(head_gap, value_gap, strict, scales)
    # then one temperature for the whole reward, with the tie parameter, by the training loss: it changes no
    # ranking, but gives the ties and the calibration back what the scale took (a reward k times too steep is
    # overconfident; with the tie parameter fixed, the temperature alone would flatten the strict pairs too)
    from scipy.optimize import minimize

    rc, rr = head_c.double() + best * value_c, head_r.double() + best * value_r
    t, weight, norm = _full_batch_loss_inputs(pairs, loss_cfg)
    raw0 = tie.raw.detach().double().cpu()
    learn_tie = bool(tie.raw.requires_grad)

    def loss_at(x) -> float:
        tau = math.exp(float(x[0]))
        raw = torch.as_tensor(x[1:], dtype=torch.float64) if learn_tie else raw0
        loss, _ = multi_head_loss(
            tau * rc, tau * rr, t["labels"], loss_cfg.tie_model, tie.transform(raw), None, weight, norm
        )
        return float(loss)

    start = [0.0, *(raw0.tolist() if learn_tie else [])]
    x = minimize(loss_at, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7}).x
    tau = math.exp(float(x[0]))
    with torch.no_grad():
        if learn_tie:
            tie.raw.copy_(torch.as_tensor(x[1:], dtype=tie.raw.dtype))
        model.verifier_weight.mul_(best * tau)
        for p in model.score.parameters():
            p.mul_(tau)
    return {"value_pairs": n, "form_pairs": len(pairs) - n, "fit": fit, "train_accuracy_by_scale": accuracy,
            "scale": best, "temperature": tau, "loss_before_temperature": loss_at(start),
            "loss_after_temperature": loss_at(x), "tie_params": tie().tolist(),
            "weight": model.verifier_weight.detach().tolist()}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and plots


def own_lr_group(optimizer: torch.optim.Optimizer, param: nn.Parameter, lr_scale: float) -> None:
    """Move ``param`` into a group of its own: no weight decay, lr = the schedule's lr x ``lr_scale``."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]
    optimizer.add_param_group({"params": [param], "weight_decay": 0.0, "lr_scale": lr_scale})


def save_checkpoint(run_dir: Path, model: RewardModel, tokenizer, state: dict, keep: int, lora: bool) -> Path:
    """``checkpoints/step_N``: the reward folder (LoRA merged) + trainer_state.pt (via the run folder)."""
    if lora:  # the adapters themselves (the folder has them merged): what resume needs to go on training
        state = {
            **state,
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        }
    return run_folder.save_checkpoint(
        run_dir, state["step"], lambda folder: save_reward_folder(model, folder, tokenizer), state, keep
    )


def save_reward_folder(model: RewardModel, folder: str | Path, tokenizer=None) -> Path:
    """Save as a ``GlmForSequenceClassification`` folder; LoRA adapters are merged into the weights."""
    if not any(".lora_" in n for n, _ in model.named_parameters()):
        return model.save(folder, tokenizer)
    from glmwb.pretrain.model import GLM

    with torch.device("meta"):
        plain = GLM(model.config)
    plain.lm_head = None
    weights = {k: v for k, v in plain_state_dict(model.backbone).items() if not k.startswith("lm_head.")}
    plain.load_state_dict(weights, assign=True)
    merged = RewardModel(plain, model.heads, model.info)
    merged.score.weight = model.score.weight
    if model.verifier is not None:
        merged.attach_verifier(model.verifier, model.verifier_weight.detach())
    return merged.save(folder, tokenizer)


TRAINING_PANELS = (
    Panel(
        "preference loss",
        "loss (nats / pair)",
        (
            Curve("loss", "train", where=(("kind", "train"),)),
            Curve("loss", "held-out", where=(("kind", "eval"),), markers=True),
        ),
    ),
    Panel(
        "held-out pairwise accuracy",
        "fraction of pairs ranked right",
        (
            Curve("accuracy", "accuracy (strict pairs)", where=(("kind", "eval"),), markers=True),
            Curve("three_way_accuracy", "3-way accuracy (ties)", where=(("kind", "eval"),), markers=True),
        ),
    ),
    Panel("tie parameter", "tie parameter (first head)", (Curve("tie_param", "learned"),)),
)


def plot_training(metrics_path: Path, out_png: Path, title: str = "reward model") -> Path | None:
    """Loss (train and held-out), held-out accuracy and the tie parameter per step."""
    rows = [{**r, "tie_param": r["tie_param"][0]} if isinstance(r.get("tie_param"), list) else r
            for r in run_folder.read_metrics(metrics_path)]  # fmt: skip
    return run_folder.plot_curves(rows, out_png, TRAINING_PANELS, title)


# ----------------------------------------------------------------------------------------------------------
# The loop


def train_reward_model(
    model: RewardModel,
    tokenizer,
    train_pairs: Sequence[EncodedPair],
    eval_pairs: Sequence[EncodedPair],
    loss_cfg: RewardLossConfig,
    optim_cfg: OptimConfig,
    train_cfg: RewardTrainConfig,
    run_dir: str | Path,
    pad_id: int,
    seed: int = 0,
    lora: bool = False,
    strategy: SingleDevice | None = None,
    log: Callable[[str], None] = print,
    value_pairs: Sequence[EncodedPair] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``train_pairs``; evaluate on ``eval_pairs``; returns a summary (before / after
    metrics, steps, pairs/s). The model's ``info`` gets the tie parameters and the reward mean / std.
    ``value_pairs`` (``train.value_first``): the likelihood-feature weights stay at 0 while the backbone and
    head learn from ``train_pairs`` (pairs of equally right answers), and are fitted on these pairs after
    (``fit_value_first``)."""
    strategy = strategy or SingleDevice()
    _check_inputs(model, train_pairs, value_pairs, strategy)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    r = _build(model, loss_cfg, optim_cfg, train_cfg, strategy, seed)
    r.tokenizer, r.train_pairs, r.eval_pairs, r.value_pairs = tokenizer, train_pairs, eval_pairs, value_pairs
    r.run_dir, r.pad_id, r.seed, r.lora, r.log = run_dir, pad_id, seed, lora, log

    r.max_steps = train_cfg.max_steps
    if train_cfg.epochs is not None:
        r.max_steps = math.ceil(train_cfg.epochs * len(train_pairs) / r.pairs_per_step)
    r.sampler = PairSampler(len(train_pairs), train_cfg.batch_size, seed)
    r.metrics = run_folder.MetricsLog(run_dir / run_folder.METRICS, enabled=strategy.is_main)
    step = _resume(run_dir, train_cfg.resume, strategy, r.core, r.tie, r.optimizer, r.sampler, r.device, log)
    if step == 0:
        r.metrics.reset()
    summary: dict[str, Any] = {"start_step": step, "max_steps": r.max_steps, "train_pairs": len(train_pairs)}
    if step == 0:
        _before_training(r, summary)
    limit = run_folder.TimeLimit(train_cfg.max_minutes)
    step, stopped_early = _train_loop(r, step, limit, summary)
    elapsed = time.time() - limit.started
    budget = Budget("reward", r.max_steps, step, stopped_early, limit.reason if stopped_early else None)
    if value_pairs is not None:
        _value_fit(r, step, summary)
    _finish(r, budget)
    summary.update(
        steps=step,
        seconds=elapsed,
        pairs_per_s=(step - summary["start_step"]) * r.pairs_per_step / max(1e-9, elapsed),
        stopped_early=stopped_early,
        device=str(r.device),
        tie_params=r.core.info.tie_params,
        budget=budget.to_dict(),
    )
    return summary


class _Run:
    """What the steps of ``train_reward_model`` share: the prepared model and optimizer, the strategy, the
    configs and the data (plain attributes, set by ``_build`` and the entry point)."""

    model: nn.Module  # what the strategy prepared (a DeepSpeed engine, or the model itself)
    core: RewardModel  # the model inside it
    tie: TieParameter
    optimizer: Any
    strategy: SingleDevice
    device: torch.device
    amp_dtype: torch.dtype | None
    loss_cfg: RewardLossConfig
    optim_cfg: OptimConfig
    train_cfg: RewardTrainConfig
    micro_per_step: int
    pairs_per_step: int
    max_steps: int
    sampler: PairSampler
    metrics: run_folder.MetricsLog
    tokenizer: Any
    train_pairs: Sequence[EncodedPair]
    eval_pairs: Sequence[EncodedPair]
    value_pairs: Sequence[EncodedPair] | None
    run_dir: Path
    pad_id: int
    seed: int
    lora: bool
    log: Callable[[str], None]

    def evaluate(self) -> dict[str, Any]:
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            m, _, _ = evaluate_pairs(
                self.core, self.eval_pairs, self.pad_id, self.loss_cfg.tie_model, self.tie().tolist()
            )
        return m


def _check_inputs(model: RewardModel, train_pairs, value_pairs, strategy: SingleDevice) -> None:
    if not train_pairs:
        raise ValueError("no training pairs (all dropped? see the data stats)")
    if value_pairs is not None and model.verifier is None:
        raise ValueError("train.value_first needs the likelihood features (model.verifier)")
    if value_pairs is not None:
        model.verifier_weight.data.zero_()
        model.verifier_weight.requires_grad_(False)
    if value_pairs is not None and strategy.world_size > 1:
        raise ValueError(
            "train.value_first runs in one process (its fit after training scores every training pair on one "
            "rank); launch without torch.distributed, or set train.value_first: null"
        )


def _build(
    model: RewardModel,
    loss_cfg: RewardLossConfig,
    optim_cfg: OptimConfig,
    train_cfg: RewardTrainConfig,
    strategy: SingleDevice,
    seed: int,
) -> _Run:
    """Device, seed, the tie parameter (a submodule of the model), the optimizer with its own learning rates
    for the tie parameter, the feature weights and the head, and the strategy's prepared model."""
    r = _Run()
    r.device = device = resolve_device(train_cfg.device)
    r.amp_dtype = autocast_dtype(train_cfg.dtype, device)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    seed_everything(seed)
    model.to(device)
    model.gradient_checkpointing = train_cfg.gradient_checkpointing
    tie = TieParameter(loss_cfg.tie_model, loss_cfg.tie_param, len(model.heads), loss_cfg.learn_tie_param)
    model.tie = tie = tie.to(device)  # a submodule, so the optimizer, strategy and checkpoints see it
    optimizer = make_optimizer(model, optim_cfg, device)
    if tie.raw.requires_grad:
        own_lr_group(optimizer, tie.raw, loss_cfg.tie_param_lr / optim_cfg.lr)
    if model.verifier_weight is not None and model.verifier_weight.requires_grad:
        # likelihood-feature weights: O(1) values on O(1) features, far from where the model's lr would get
        # them in a few hundred steps
        own_lr_group(optimizer, model.verifier_weight, train_cfg.verifier_lr / optim_cfg.lr)
    if train_cfg.head_lr is not None:  # the linear head on h_T at its own pace (same schedule, scaled)
        for p in model.score.parameters():
            if p.requires_grad:
                own_lr_group(optimizer, p, train_cfg.head_lr / optim_cfg.lr)
    r.model, r.optimizer = strategy.prepare(model, optimizer)
    r.core, r.tie, r.strategy = strategy.unwrap(r.model), tie, strategy
    r.loss_cfg, r.optim_cfg, r.train_cfg = loss_cfg, optim_cfg, train_cfg
    r.micro_per_step = train_cfg.grad_accum * strategy.world_size
    r.pairs_per_step = train_cfg.batch_size * r.micro_per_step
    return r


def _before_training(r: _Run, summary: dict[str, Any]) -> None:
    """At step 0: the feature weights' prefit (joint fit only) and the held-out evaluation before training."""
    core, train_pairs = r.core, r.train_pairs
    if core.verifier is not None and r.train_cfg.verifier_prefit_pairs > 0 and r.value_pairs is None:
        take = np.random.default_rng(r.seed).permutation(len(train_pairs))[
            : r.train_cfg.verifier_prefit_pairs
        ]
        summary["verifier_prefit"] = fit = prefit_verifier(
            core, [train_pairs[i] for i in sorted(take)], r.pad_id, r.loss_cfg, r.tie
        )
        names = ", ".join(f"{n} {w:+.3f}" for n, w in zip(core.verifier.names, fit["weight"][0], strict=True))
        r.log(
            f"verifier weights fitted on {fit['pairs']} train pairs (loss {fit['loss_before']:.3f} -> "
            f"{fit['loss_after']:.3f}, accuracy {fit['train_accuracy']:.3f}): {names}"
        )
    if r.eval_pairs:
        summary["eval_before"] = m0 = r.evaluate()
        r.metrics.write({"kind": "eval", "step": 0, **m0})
        r.log(
            f"held-out before training: accuracy {m0.get('accuracy', float('nan')):.3f}, loss {m0['loss']:.3f}"
        )


def _train_loop(r: _Run, step: int, limit: run_folder.TimeLimit, summary: dict[str, Any]) -> tuple[int, bool]:
    """Optimizer steps from ``step`` to ``max_steps`` (or the time limit): log, evaluate, checkpoint.
    Returns the last step and whether the time limit stopped the run early."""
    r.model.train()
    window_t, window_pairs = time.time(), 0
    bar = tqdm(total=r.max_steps, initial=step, desc="reward", unit="step", dynamic_ncols=True,
               disable=not r.strategy.is_main)  # fmt: skip
    stopped_early = False
    while step < r.max_steps:
        lr = lr_at(step, r.optim_cfg, r.max_steps)
        for group in r.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # every rank draws the same micro-batches and takes its own share of them
        micro = [[r.train_pairs[i] for i in r.sampler.next()] for _ in range(r.micro_per_step)]
        loss_sum = _step_backward(r, micro)
        grad_norm = r.strategy.step(r.model, r.optimizer, r.optim_cfg.grad_clip)
        step += 1
        window_pairs += r.pairs_per_step
        bar.update(1)
        if step % r.train_cfg.log_every == 0 or step == r.max_steps:
            now = time.time()
            pps = window_pairs / max(1e-9, now - window_t)
            window_t, window_pairs = now, 0
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", pairs_s=f"{pps:.1f}")
            r.metrics.write({"kind": "train", "step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                             "pairs_per_s": pps, "tie_param": r.tie().tolist()})  # fmt: skip
        out_of_time = limit.reached()
        if r.strategy.world_size > 1:  # every rank must stop at the same step
            out_of_time = bool(r.strategy.all_reduce(torch.tensor(float(out_of_time))) > 0)
        last = step == r.max_steps or out_of_time
        every = r.train_cfg.eval_every
        if r.eval_pairs and ((every and step % every == 0) or (last and r.value_pairs is None)):
            # eval_every 0: at the end (with value_pairs, after the value fit instead)
            summary["eval_after"] = m = r.evaluate()
            r.metrics.write({"kind": "eval", "step": step, **m})
            bar.write(
                f"step {step}: held-out accuracy {m.get('accuracy', float('nan')):.3f}, loss {m['loss']:.3f}"
            )
        if (r.train_cfg.save_every and step % r.train_cfg.save_every == 0) or last:
            _checkpoint(r, step)
        if out_of_time and step < r.max_steps:
            stopped_early = True
            bar.write(f"{limit.reason} at step {step} of {r.max_steps}; checkpoint saved")
            break
    bar.close()
    return step, stopped_early


def _step_backward(r: _Run, micro: list[list[EncodedPair]]) -> float:
    """The backward passes of one optimizer step: this rank's share of the micro-batches ``micro``, each
    normalised by the whole step's weight so that 1 x 8 == 8 x 1; returns the step's loss (all ranks)."""
    loss_cfg, strategy, device = r.loss_cfg, r.strategy, r.device
    step_tensors = [pair_tensors(m, device) for m in micro]
    # the whole step's normalisers (per head: the weight of the labels it learns from), so that each
    # micro-batch contributes its share and 1 x 8 == 8 x 1
    head_weight = sum(
        (t["weight"][:, None] * label_mask(t["labels"], loss_cfg.tie_model)).sum(0) for t in step_tensors
    )
    step_pairs = float(sum(len(m) for m in micro))
    loss_sum = 0.0
    for mine in range(strategy.rank, r.micro_per_step, strategy.world_size):
        pairs, t = micro[mine], step_tensors[mine]
        weight = t["weight"] if loss_cfg.weights != "none" else torch.ones_like(t["weight"])
        margin = t["margin"] * loss_cfg.margin_scale if loss_cfg.use_margin else None
        with torch.autocast(device.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
            chosen, rejected, lm_loss = pair_rewards(
                r.model, pairs, r.pad_id, r.train_cfg.packing, r.train_cfg.pack_tokens, device,
                loss_cfg.lm_coef > 0,
            )  # fmt: skip
        norm = (
            head_weight
            if loss_cfg.weights != "none"
            else sum(label_mask(s["labels"], loss_cfg.tie_model).sum(0) for s in step_tensors).float()
        )
        loss, _ = multi_head_loss(
            chosen, rejected, t["labels"], loss_cfg.tie_model, r.tie(), margin, weight, norm
        )
        share = len(pairs) / step_pairs
        if lm_loss is not None:
            loss = loss + loss_cfg.lm_coef * share * lm_loss
        if loss_cfg.centering > 0:
            loss = loss + loss_cfg.centering * share * centering_loss(chosen.flatten(), rejected.flatten())
        # this rank's share of the step's global mean; the strategy averages gradients over ranks
        strategy.backward(loss * strategy.world_size, r.model)
        loss_sum += float(loss.detach())
    return float(strategy.all_reduce(torch.tensor(loss_sum)))


def _checkpoint(r: _Run, step: int) -> None:
    r.core.info.tie_model, r.core.info.tie_params = r.loss_cfg.tie_model, r.tie().tolist()
    with r.strategy.gathered(r.model):  # collective under ZeRO-3: every rank enters, the main one writes
        if r.strategy.is_main:
            state = {
                "step": step,
                "optimizer": r.optimizer.state_dict(),
                "rng": rng_state(),
                "sampler": r.sampler.state_dict(),
                "tie_raw": r.tie.raw.detach().cpu(),
            }
            save_checkpoint(r.run_dir, r.core, r.tokenizer, state, r.train_cfg.keep_checkpoints, r.lora)


def _value_fit(r: _Run, step: int, summary: dict[str, Any]) -> None:
    """``train.value_first``, after the last step: the feature weights on the value pairs, their scale, the
    temperature; then the held-out evaluation."""
    summary["value_first"] = fit = fit_value_first(
        r.core, r.value_pairs, r.train_pairs, r.pad_id, r.loss_cfg, r.tie, r.train_cfg.value_scales
    )
    by_scale = ", ".join(f"x{k:g} {a:.3f}" for k, a in fit["train_accuracy_by_scale"].items())
    r.log(
        f"value weights fitted on {fit['value_pairs']} pairs after the head's {fit['form_pairs']} "
        f"(loss {fit['fit']['loss_before']:.3f} -> {fit['fit']['loss_after']:.3f}); training accuracy by "
        f"scale {by_scale}: x{fit['scale']:g}; then the whole reward x{fit['temperature']:.2f} and the tie parameter {fit['tie_params'][0]:.2f} (training loss "
        f"{fit['loss_before_temperature']:.3f} -> {fit['loss_after_temperature']:.3f}, no ranking changed)"
    )
    if r.eval_pairs:
        summary["eval_after"] = m = r.evaluate()
        r.metrics.write({"kind": "eval", "step": step, "after": "value_first", **m})
        r.log(
            f"held-out after the value fit: accuracy {m.get('accuracy', float('nan')):.3f}, loss {m['loss']:.3f}"
        )


def _finish(r: _Run, budget: Budget) -> None:
    """The training curves, the reward statistics over the training responses, the tie parameters in the
    model's info; the tie submodule leaves the model."""
    core = r.core
    if r.strategy.is_main:
        n_params = sum(p.numel() for p in core.backbone.parameters())
        what = f"GLM backbone of {n_params / 1e6:.2f}M parameters, heads {list(core.heads)}"
        title = run_folder.run_title("reward model", r.run_dir, what, budget)
        plot_training(r.metrics.path, r.run_dir / "training.png", title)
    reward_statistics(core, list(r.train_pairs) + list(r.value_pairs or []), r.pad_id, r.seed)
    core.info.tie_model, core.info.tie_params = r.loss_cfg.tie_model, r.tie().tolist()
    del core.tie


def _resume(
    run_dir: Path, resume: bool, strategy, core: RewardModel, tie, optimizer, sampler, device, log
) -> int:
    """Load the newest checkpoint of ``run_dir`` (weights or LoRA adapters, tie parameter, optimizer, data
    order, RNG) and cut metrics.jsonl back to its step; returns that step (0: nothing to resume)."""
    if not resume:
        return 0
    if strategy.world_size > 1:
        if run_folder.checkpoint_dirs(run_dir, with_state=True):
            raise ValueError(
                f"{run_dir} has checkpoints; resuming a multi-rank run is not supported (train.resume=false)"
            )
        return 0
    ckpt = run_folder.latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    state = run_folder.load_trainer_state(ckpt, map_location=device)
    if "trainable" in state:
        core.load_state_dict(state["trainable"], strict=False)
    else:
        loaded = RewardModel.from_pretrained(ckpt)
        core.backbone.load_state_dict(loaded.backbone.state_dict(), strict=core.backbone.lm_head is None)
        core.score.load_state_dict(loaded.score.state_dict())
        if core.verifier is not None:
            core.verifier_weight.data.copy_(loaded.verifier_weight.data)
    tie.raw.data.copy_(state["tie_raw"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    log(f"resumed from {ckpt} at step {state['step']}")
    run_folder.truncate_metrics(run_dir / run_folder.METRICS, state["step"])
    return state["step"]
