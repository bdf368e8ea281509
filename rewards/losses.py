"""Reward-model losses as pure functions of the two rewards of each judged pair.

Shapes: B pairs. ``chosen`` / ``rejected`` are the rewards r_c, r_r of the two responses (B,); ``tie`` (B,) bool
marks pairs judged equal (then "chosen" / "rejected" are just the two responses in display order);
``margin`` (B,) is a required reward gap for strict pairs; ``weight`` (B,) >= 0 multiplies each pair's loss
(e.g. the annotator's reliability). Every loss returns the weighted mean sum_i w_i l_i / sum_i w_i (a scalar),
or the per-pair losses l_i (B,) with ``reduction="none"``. Everything is computed in fp32, in log space.

d = r_c - r_r throughout. The three preference models (``TIE_MODELS``) share one signature:

=================  ==========================================  =========================================
model              P(chosen beats rejected)                    P(tie)
=================  ==========================================  =========================================
Bradley-Terry      sigma(d)                                    0 (tie pairs are dropped: weight 0)
Davidson           e^{d/2} / (e^{d/2} + e^{-d/2} + nu)         nu / (e^{d/2} + e^{-d/2} + nu)
Rao-Kupper         sigma(d - a),  a = log theta >= 0           (theta^2 - 1) / (1 + theta^2 + 2 theta cosh d)
=================  ==========================================  =========================================

Both tie models are Bradley-Terry at their boundary (nu = 0, theta = 1): tests check it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(losses: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """sum(w l) / sum(w) (0 when every weight is 0), or the per-pair losses."""
    if weight is not None:
        losses = losses * weight
    if reduction == "none":
        return losses
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    total = weight.sum() if weight is not None else torch.tensor(float(losses.numel()), device=losses.device)
    return losses.sum() / total.clamp(min=torch.finfo(losses.dtype).tiny)


def _prepare(chosen: Tensor, rejected: Tensor, margin: Tensor | None, weight: Tensor | None):
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    d = chosen.float() - rejected.float()  # (B,)
    if margin is not None:
        margin = margin.float()
    if weight is not None:
        weight = weight.float()
    return d, margin, weight


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Bradley-Terry negative log-likelihood: l = -log sigma(r_c - r_r - m).

    Bradley & Terry (1952), "Rank analysis of incomplete block designs"; as a reward-model loss in
    Ouyang et al. (2022, InstructGPT, eq. 1); the margin m (e.g. from a rating gap) as in Touvron et al.
    (2023, Llama 2, eq. 2). chosen, rejected, margin, weight: (B,). Returns a scalar (or (B,)).
    """
    d, margin, weight = _prepare(chosen, rejected, margin, weight)
    if margin is not None:
        d = d - margin
    return _reduce(-F.logsigmoid(d), weight, reduction)


def bradley_terry_tie_loss(
    chosen: Tensor,
    rejected: Tensor,
    tie: Tensor,
    tie_param: Tensor | float = 0.0,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Bradley-Terry with tie pairs dropped (their weight set to 0); ``tie_param`` is unused.

    The baseline the tie models are compared with: it throws the tie labels away.
    """
    keep = ~tie.bool()
    weight = keep.float() if weight is None else weight.float() * keep
    return bradley_terry_loss(chosen, rejected, margin, weight, reduction)


def davidson_loss(
    chosen: Tensor,
    rejected: Tensor,
    tie: Tensor,
    tie_param: Tensor | float = 1.0,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Davidson's ties model: with pi = exp(r) and nu = ``tie_param`` >= 0,

        P(c > r) = pi_c / (pi_c + pi_r + nu sqrt(pi_c pi_r)) = e^{d/2} / Z,   P(tie) = nu / Z,
        Z = e^{d/2} + e^{-d/2} + nu,

    l = -log P(c > r) for a strict pair (d shifted by its margin), -log P(tie) for a tie.
    Davidson (1970), "On extending the Bradley-Terry model to accommodate ties in paired comparison
    experiments", JASA 65. At nu = 0 the strict loss is exactly Bradley-Terry (e^{d/2} / 2cosh(d/2) =
    sigma(d)). chosen, rejected, tie, margin, weight: (B,); tie_param: a scalar or (B,) tensor.
    """
    d, margin, weight = _prepare(chosen, rejected, margin, weight)
    tie = tie.bool()
    if margin is not None:
        d = d - torch.where(tie, 0.0, margin)
    nu = torch.as_tensor(tie_param, dtype=d.dtype, device=d.device).expand_as(d)
    log_nu = torch.log(nu)  # -inf at nu = 0: logsumexp handles it (and ties then cost +inf)
    log_z = torch.logsumexp(torch.stack([d / 2, -d / 2, log_nu]), dim=0)  # (B,)
    losses = log_z - torch.where(tie, log_nu, d / 2)
    return _reduce(losses, weight, reduction)


def rao_kupper_loss(
    chosen: Tensor,
    rejected: Tensor,
    tie: Tensor,
    tie_param: Tensor | float = 1.0,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Rao-Kupper's threshold ties model: with pi = exp(r), theta = ``tie_param`` >= 1, a = log theta,

        P(c > r) = pi_c / (pi_c + theta pi_r) = sigma(d - a),
        P(tie) = (theta^2 - 1) pi_c pi_r / ((pi_c + theta pi_r)(pi_r + theta pi_c))
               = (theta^2 - 1) / (1 + theta^2 + 2 theta cosh d),

    l = -log P(c > r) for a strict pair (d shifted by its margin), -log P(tie) for a tie.
    Rao & Kupper (1967), "Ties in paired-comparison experiments: a generalization of the Bradley-Terry
    model", JASA 62. A tie is likely when |d| < a; at theta = 1 the strict loss is Bradley-Terry.
    The tie term is log(expm1(2a)) - logsumexp(0, 2a, a + d, a - d), stable for any d.
    """
    d, margin, weight = _prepare(chosen, rejected, margin, weight)
    tie = tie.bool()
    if margin is not None:
        d = d - torch.where(tie, 0.0, margin)
    theta = torch.as_tensor(tie_param, dtype=d.dtype, device=d.device).expand_as(d)
    a = torch.log(theta)  # (B,) >= 0
    strict = -F.logsigmoid(d - a)
    log_denominator = torch.logsumexp(torch.stack([torch.zeros_like(d), 2 * a, a + d, a - d]), dim=0)
    tied = log_denominator - torch.log(torch.expm1(2 * a))
    return _reduce(torch.where(tie, tied, strict), weight, reduction)


def centering_loss(chosen: Tensor, rejected: Tensor, weight: Tensor | None = None) -> Tensor:
    """Reward centering: mean((r_c + r_r)^2), an auxiliary term that pulls rewards towards mean 0.

    Eisenstein et al. (2023), "Helping or herding? Reward model ensembles mitigate but do not eliminate
    reward hacking" (TRL's ``center_rewards_coefficient``). BT only sees differences, so without it the
    reward's offset drifts freely; PPO prefers rewards near 0. chosen, rejected, weight: (B,) -> scalar.
    """
    s = (chosen.float() + rejected.float()) ** 2
    return _reduce(s, None if weight is None else weight.float(), "mean")


# tie model name -> loss; every one takes (chosen, rejected, tie, tie_param, margin, weight, reduction)
TIE_MODELS: dict[str, Callable[..., Tensor]] = {
    "drop": bradley_terry_tie_loss,
    "davidson": davidson_loss,
    "rao_kupper": rao_kupper_loss,
}
# Where a learned tie parameter lives: tie_param = transform(raw), raw unconstrained; and the value that makes
# the model Bradley-Terry.
TIE_PARAM_TRANSFORMS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[float], float]]] = {
    # nu = exp(raw) > 0
    "davidson": (torch.exp, lambda nu: float(torch.log(torch.tensor(max(nu, 1e-8))))),
    # theta = 1 + softplus(raw) > 1 ; raw = log(expm1(theta - 1))
    "rao_kupper": (
        lambda raw: 1.0 + F.softplus(raw),
        lambda theta: float(torch.log(torch.expm1(torch.tensor(max(theta - 1.0, 1e-6))))),
    ),
    "drop": (lambda raw: torch.zeros_like(raw), lambda _: 0.0),
}


def outcome_probs(d: Tensor, tie_model: str, tie_param: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """(P(first wins), P(tie), P(second wins)) for reward gaps d = r_first - r_second, (N,) each."""
    d = d.float()
    if tie_model == "drop":
        p = torch.sigmoid(d)
        return p, torch.zeros_like(p), 1 - p
    tie = torch.zeros_like(d, dtype=torch.bool)
    loss = TIE_MODELS[tie_model]
    win = torch.exp(-loss(d, torch.zeros_like(d), tie, tie_param, reduction="none"))
    lose = torch.exp(-loss(-d, torch.zeros_like(d), tie, tie_param, reduction="none"))
    tied = torch.exp(-loss(d, torch.zeros_like(d), ~tie, tie_param, reduction="none"))
    return win, tied, lose


def label_mask(labels: Tensor, tie_model: str) -> Tensor:
    """(B, K) bool: which (pair, head) labels a loss uses: +1 / -1 always, 0 (tie) unless ties are dropped."""
    mask = (labels == 1) | (labels == -1)
    return mask if tie_model == "drop" else mask | (labels == 0)


def multi_head_loss(
    chosen: Tensor,
    rejected: Tensor,
    labels: Tensor,
    tie_model: str,
    tie_param: Tensor,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
    normalizer: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One preference loss per reward head, each on the pairs that have a label for it.

    chosen, rejected: (B, K) rewards of K heads; labels: (B, K) int, +1 = chosen better on that head,
    -1 = rejected better, 0 = tie, any other value (use -100) = no label; tie_param: (K,); margin and weight
    (B,) apply to every head (the margin only to the head's strict pairs in the chosen direction).
    Returns (sum over heads of each head's weighted mean, the per-head losses (K,)); a head with no labels
    in the batch contributes 0. ``normalizer`` (K,) replaces each head's sum of weights as the denominator
    (a trainer passes the totals of the whole optimizer step, so that gradient accumulation 1 x 8 = 8 x 1).
    Used for attribute heads (helpfulness, correctness, ...) next to the overall preference.
    """
    loss_fn = TIE_MODELS[tie_model]
    mask = label_mask(labels, tie_model)  # (B, K)
    per_head = []
    for k in range(chosen.shape[1]):
        y = labels[:, k]
        known = mask[:, k]
        flip = y == -1  # the rejected response is the better one on this attribute
        first = torch.where(flip, rejected[:, k], chosen[:, k])
        second = torch.where(flip, chosen[:, k], rejected[:, k])
        w = known.float() if weight is None else weight.float() * known
        m = None if margin is None else torch.where(flip, 0.0, margin.float())
        losses = loss_fn(first, second, y == 0, tie_param[k], m, None, "none")
        losses = torch.where(known, losses, 0.0)  # -log P(tie) at nu = 0 is inf: mask before weighting
        if normalizer is None:
            per_head.append(_reduce(losses, w, "mean"))
        else:
            per_head.append((losses * w).sum() / normalizer[k].clamp(min=torch.finfo(losses.dtype).tiny))
    per_head_t = torch.stack(per_head)
    return per_head_t.sum(), per_head_t
