"""PPO's math against hand-computed values: GAE (masks, terminal steps), clipped losses, KL estimators and
controllers, whitening, running moments, per-token rewards."""

from __future__ import annotations

import math

import pytest
import torch

from glmwb.align.ppo import core


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# GAE


def test_gae_with_gamma_and_lambda_one_is_return_minus_value() -> None:
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = (sum of rewards from t) - V_t = 1 - V_t; returns = 1 everywhere
    assert torch.allclose(adv, t([[0.5, 0.6, 0.7]]))
    assert torch.allclose(ret, t([[1.0, 1.0, 1.0]]))


def test_gae_by_hand_with_discount_and_padding_that_must_not_leak() -> None:
    # the padded position holds junk (reward 7, value 9): the episode ends at t = 2 (terminal, V = 0)
    rewards, values = t([[0.1, -0.2, 1.0, 7.0]]), t([[0.5, 0.4, 0.3, 9.0]])
    mask = t([[1, 1, 1, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: delta = 1.0 - 0.3 = 0.7                         A2 = 0.7
    # t=1: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33           A1 = -0.33 + 0.45 * 0.7 = -0.015
    # t=0: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04            A0 = -0.04 + 0.45 * -0.015 = -0.04675
    expected = t([[-0.04675, -0.015, 0.7, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, t([[0.45325, 0.385, 1.0, 0.0]]), atol=1e-12)


def test_gae_rows_are_independent_and_an_empty_row_is_zero() -> None:
    rewards = t([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    values = t([[1.0, 1.0, 1.0], [0.5, 3.0, 3.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    adv, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv[0], t([1.0, 1.0, -1.0]))  # 2 - 1, 2 - 1, 0 - 1
    assert torch.allclose(adv[1], t([0.5, 0.0, 0.0]))  # a one-token episode: r - V
    assert torch.equal(adv[2], t([0.0, 0.0, 0.0])) and torch.equal(ret[2], t([0.0, 0.0, 0.0]))
    single, _ = core.gae(rewards[1:2], values[1:2], mask[1:2], 1.0, 1.0)
    assert torch.allclose(single, adv[1:2])


def test_gae_lambda_zero_is_one_step_td() -> None:
    rewards, values, mask = t([[0.3, 0.0, 1.0]]), t([[0.2, 0.6, 0.1]]), t([[1, 1, 1]])
    adv, _ = core.gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert torch.allclose(adv, t([[0.3 + 0.5 * 0.6 - 0.2, 0.0 + 0.5 * 0.1 - 0.6, 1.0 - 0.1]]))


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    kl = t([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    r = core.token_rewards(t([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(r, t([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0.0, 0.0, 0.0]]))
    assert core.last_token_index(mask).tolist() == [2, 0]


# ----------------------------------------------------------------------------------------------------------
# Losses


def test_policy_loss_by_hand() -> None:
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1 (clip 0.2); a 5th, padded token is absurd
    new = t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), 30.0]])
    old = torch.zeros_like(new)
    adv = t([[1.0, 1.0, -1.0, -1.0, 1e6]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = core.policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5,
    # max(0.5, 0.8) = 0.8 (clipped), max(1.5, 1.2) = 1.5
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)]
    assert float(stats["approx_kl"]) == pytest.approx(sum(k3) / 4)


def test_policy_loss_gradient_is_zero_where_clipped() -> None:
    new = t([[math.log(1.5), math.log(0.9)]]).requires_grad_()
    loss, _ = core.policy_loss(new, torch.zeros(1, 2, dtype=torch.float64), t([[1.0, 1.0]]), t([[1, 1]]), 0.2)
    loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlogp (-A r / 2) = -r / 2
    assert new.grad[0, 0] == 0 and float(new.grad[0, 1]) == pytest.approx(-0.9 / 2)


def test_normaliser_makes_micro_batches_add_up_to_the_minibatch() -> None:
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(4, 5, generator=g) * 0.3, torch.randn(4, 5, generator=g) * 0.3
    adv = torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    full, _ = core.policy_loss(new, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(core.policy_loss(new[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], 0.2, n)[0]
                for i in (0, 2))  # fmt: skip
    assert torch.allclose(full, parts)


def test_value_loss_by_hand() -> None:
    values, old, returns = t([[2.0, 0.0, 0.0]]), t([[1.0, 0.0, 1.0]]), t([[1.0, 1.0, 0.0]])
    mask = t([[1, 1, 1]])
    loss, stats = core.value_loss(values, old, returns, mask, clip_range_value=0.5)
    # token 0: (2-1)^2 = 1 vs clipped 1.5 -> 0.25: 1;  token 1: 1 vs 1: 1;
    # token 2: (0-0)^2 = 0 vs clipped old + clip(-1) = 0.5 -> 0.25: 0.25 (the clipped one counts)
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 0.25) / 3)
    assert float(stats["vf_clipfrac"]) == pytest.approx(1 / 3)
    plain, _ = core.value_loss(values, old, returns, mask, clip_range_value=None)
    assert float(plain) == pytest.approx(0.5 * (1 + 1 + 0) / 3)


# ----------------------------------------------------------------------------------------------------------
# Whitening, moments, explained variance


def test_masked_whiten_ignores_padding() -> None:
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = core.masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(vals.std()) == pytest.approx(1.0, abs=1e-6)  # unbiased, as masked_var
    assert torch.equal(w[~mask.bool()], torch.zeros(3, dtype=torch.float64))
    ref = (torch.tensor([1.0, 2, 3, 4, 5]) - 3) / torch.tensor([1.0, 2, 3, 4, 5]).std()
    assert torch.allclose(vals.float(), ref, atol=1e-5)
    kept = core.masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert float(kept.mean()) == pytest.approx(3.0)


def test_running_moments_match_the_concatenated_data() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 17, 1, 40)]
    rm = core.RunningMoments()
    for b in batches:
        rm.update(b)
    everything = torch.cat(batches).double()
    assert rm.mean == pytest.approx(float(everything.mean()), rel=1e-9)
    assert rm.var == pytest.approx(float(everything.var(unbiased=False)), rel=1e-6)


def test_leave_one_out_baseline_by_hand_and_blind_to_a_per_prompt_offset() -> None:
    scores = t([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    loo = core.leave_one_out(scores, 4)
    # 1 - (2 + 3 + 4) / 3 = -2, 2 - 8/3, 3 - 7/3, 4 - 2; a group of equal scores has nothing to prefer
    assert torch.allclose(loo, t([-2.0, -2 / 3, 2 / 3, 2.0, 0.0, 0.0, 0.0, 0.0]))
    offset = t([100.0] * 4 + [-7.0] * 4)  # what a Bradley-Terry RM never pinned down: a constant per prompt
    assert torch.allclose(core.leave_one_out(scores + offset, 4), loo)
    assert torch.allclose(core.leave_one_out(t([3.0, 5.0]), 2), t([-2.0, 2.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        core.leave_one_out(scores, 3)
    with pytest.raises(ValueError, match="groups of 1"):
        core.leave_one_out(scores, 1)


def test_explained_variance() -> None:
    ret = t([[1.0, 2.0, 3.0, 4.0]])
    mask = t([[1, 1, 1, 1]])
    assert core.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    assert core.explained_variance(-ret, ret, mask) < 0


# ----------------------------------------------------------------------------------------------------------
# KL


def test_kl_estimators_are_unbiased_or_nonnegative_as_documented() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=g), -1).double()
    q = torch.softmax(torch.randn(50, generator=g), -1).double()
    true_kl = float((p * (p / q).log()).sum())
    a = torch.multinomial(p, 400_000, replacement=True, generator=g)
    lp, lq = p.log()[a], q.log()[a]
    assert float(core.kl_k1(lp, lq).mean()) == pytest.approx(true_kl, rel=0.03)
    assert float(core.kl_k3(lp, lq).mean()) == pytest.approx(true_kl, rel=0.03)
    assert bool((core.kl_k3(lp, lq) >= 0).all()) and bool((core.kl_abs(lp, lq) >= 0).all())
    assert bool((core.kl_k1(lp, lq) < 0).any())  # k1 is negative on some tokens
    with pytest.raises(ValueError, match="unknown KL estimator"):
        core.per_token_kl(lp, lq, torch.ones_like(lp), "k9")


def test_adaptive_controller_moves_toward_the_target_and_fixed_stays() -> None:
    ctl = core.AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(current_kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.0256) * (1 - 0.2 * 0.0256))
    # closed loop: a "policy" whose KL falls as beta rises (KL = 0.6 / beta); the controller finds beta = 0.1
    ctl = core.AdaptiveKLController(init_coef=0.02, target=6.0, horizon=1_000)
    history = []
    for _ in range(400):
        kl = 0.6 / ctl.value
        history.append(abs(kl - 6.0))
        ctl.update(kl, n_steps=64)
    assert history[-1] < 0.05 * history[0] and ctl.value == pytest.approx(0.1, rel=0.02)
    fixed = core.FixedKLController(0.05)
    for kl in (0.0, 100.0, 6.0):
        fixed.update(kl, 64)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        core.make_kl_controller("adaptive", 0.1, None)


def test_pearson() -> None:
    x = t([1.0, 2.0, 3.0, 4.0])
    assert core.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert core.pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(core.pearson(x, torch.ones(4)))
