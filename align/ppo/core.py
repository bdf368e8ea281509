"""PPO's math as pure functions on padded (B, N) tensors: masked statistics, KL estimators, per-token rewards,
GAE, the clipped policy and value losses, and the KL controllers.

Conventions (every function): B responses, N response positions (right padding), ``mask`` (B, N) is 1 on the
tokens the policy generated (the terminator included) and 0 on padding. Token t of a response is action a_t
taken in state s_t = prompt + response[:t]; ``values[:, t]`` estimates V(s_t).

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (KL-penalised reward
and the adaptive controller), Schulman 2020 "Approximating KL divergence" (the k1 / k2 / k3 estimators).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """mean of x where mask is 1 (over everything, or along ``dim``); 0 where the mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the masked entries (Bessel-corrected unless ``unbiased=False``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (mean added back when ``shift_mean=False``); 0 on padding.

    A batch with fewer than two masked entries has no spread to divide by: it is returned centred only."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    if mask.sum() < 2:
        var = torch.ones_like(var)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens: 1 = the critic predicts the returns, 0 = no better than
    their mean, < 0 = worse than that. NaN when the returns do not vary."""
    var_r = masked_var(returns, mask)
    if float(var_r) <= 1e-12:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_r)


class RunningMoments:
    """Running mean / std of a stream of scalars (Chan et al.'s parallel update), for reward normalisation.

    ``update(x)`` folds a batch in and returns the batch's (mean, std); ``all_reduce`` (optional) sums the
    batch's count / sum / sum of squares across ranks so every rank keeps the same statistics.
    """

    def __init__(self, all_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8
        self.all_reduce = all_reduce

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> tuple[float, float]:
        x = x.detach().double().flatten()
        stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
        if self.all_reduce is not None:
            stats = self.all_reduce(stats)
        n, s, ss = (float(v) for v in stats)
        if n == 0:
            return self.mean, self.std
        batch_mean = s / n
        batch_var = max(ss / n - batch_mean**2, 0.0)  # population variance of the batch
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return batch_mean, math.sqrt(batch_var * n / max(n - 1, 1))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


# ----------------------------------------------------------------------------------------------------------
# KL between the policy and the reference, per token


def leave_one_out(scores: Tensor, group_size: int) -> Tensor:
    """Each score minus the mean of the other scores of its group (consecutive runs of ``group_size``: the
    samples of one prompt), the RLOO baseline: r_i - (sum_j r_j - r_i) / (k - 1)."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(
            f"leave_one_out: {scores.numel()} scores do not split into groups of {group_size} (need >= 2 each)"
        )
    g = scores.reshape(-1, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(scores.shape)


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi(a) - log pi_ref(a): unbiased for KL(pi || ref) under samples from pi, but negative per token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2: >= 0, low variance, biased (its gradient is that of KL)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(a) / pi(a): unbiased and >= 0 per token (Schulman 2020)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)  # keeps exp() finite for absurd ratios
    return log_ratio.exp() - 1 - log_ratio


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|log pi(a) - log pi_ref(a)|: >= 0, penalises drift in both directions."""
    return (logprobs - ref_logprobs).abs()


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "mse": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """The chosen estimator per token (B, N), 0 on padding."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * mask


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last masked position per row (B,); 0 for an empty row."""
    N = mask.shape[1]
    positions = torch.arange(N, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Ziegler et al.'s per-token reward: r_t = -beta * kl_t, plus the sequence score at the last token.

    scores (B,), kl (B, N) per-token KL (0 on padding), mask (B, N). The score sits on the response's last
    token: the terminator when the policy ended its turn, else the last token it was allowed to write.
    """
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    has_tokens = mask.sum(1) > 0
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype) * has_tokens
    return rewards


# ----------------------------------------------------------------------------------------------------------
# Generalised advantage estimation


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Advantages and returns (B, N) by GAE (Schulman et al. 2016), computed right to left:

        delta_t = r_t + gamma * V(s_{t+1}) * m_{t+1} - V(s_t)
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        R_t     = A_t + V(s_t)                          (the critic's regression target)

    m_{t+1} = 0 after the last token of a response: the episode is over there (terminal state, value 0), so
    neither a padding position's value nor its advantage leaks into the real tokens. Padding positions get
    A = R = 0. rewards, values, mask: (B, N).
    """
    B, N = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_mask = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(N)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
        next_value, next_mask = values[:, t], mask[:, t]
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------
# Losses


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), a loss to minimise:

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        L     = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / normaliser

    ``normaliser`` defaults to the number of masked tokens (a token-level mean); a trainer that splits a
    minibatch into micro-batches passes the minibatch's token count so the micro-batch gradients add up to
    the minibatch's. Stats (detached): clipfrac (share of tokens where the clipped term is the larger),
    approx_kl (k3 estimate of KL(pi_old || pi) on these tokens), ratio mean / max.
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    denom = mask.sum().clamp(min=1) if normaliser is None else normaliser
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),  # k3 of KL(pi_old || pi)
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio * mask).max(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None,
    normaliser: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (the PPO2 baselines form):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L      = 1/2 sum_t m_t max((V - R)^2, (V_clip - R)^2) / normaliser

    With ``clip_range_value=None`` it is the plain squared error. Stats: vf_clipfrac, value mean, error mean.
    """
    error = (values - returns) ** 2
    if clip_range_value is not None:
        clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
        clipped_error = (clipped_values - returns) ** 2
        per_token = torch.maximum(error, clipped_error)
    else:
        clipped_error = error
        per_token = error
    denom = mask.sum().clamp(min=1) if normaliser is None else normaliser
    loss = 0.5 * (per_token * mask).sum() / denom
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((clipped_error > error).float(), mask),
            "value_mean": masked_mean(values, mask),
            "value_error": masked_mean(error, mask),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# KL controllers


class FixedKLController:
    """beta stays where it was set."""

    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019's proportional controller, moving beta so that the observed KL approaches ``target``:

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    n_steps is the number of samples in the batch that produced ``current_kl``; ``horizon`` sets how many
    samples the controller takes to correct a given error.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL controller: target ({target}) and horizon ({horizon}) must be > 0")
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


def make_kl_controller(
    kind: str, coef: float, target: float | None = None, horizon: float = 10_000
) -> FixedKLController | AdaptiveKLController:
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None:
            raise ValueError("kl.target is needed by the adaptive controller")
        return AdaptiveKLController(coef, target, horizon)
    raise ValueError(f"kl.controller must be 'fixed' or 'adaptive', got {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# Small diagnostics


def pearson(x: Tensor, y: Tensor) -> float:
    """Correlation of two (B,) vectors; NaN when either does not vary (reward-length correlation)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 1e-12 else float("nan")
