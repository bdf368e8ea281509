"""Each loss against values computed by hand; the tie models reduce to Bradley-Terry at their boundary."""

from __future__ import annotations

import math

import pytest
import torch

from glmwb.rewards.losses import (
    TIE_MODELS,
    bradley_terry_loss,
    bradley_terry_tie_loss,
    centering_loss,
    davidson_loss,
    label_mask,
    multi_head_loss,
    outcome_probs,
    rao_kupper_loss,
)

C = torch.tensor([2.0, 0.5, -1.0])
R = torch.tensor([1.0, 0.5, 1.0])  # d = [1, 0, -2]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand() -> None:
    per = [-math.log(_sig(1)), -math.log(0.5), -math.log(_sig(-2))]  # 0.31326, 0.69315, 2.12693
    assert bradley_terry_loss(C, R, reduction="none").tolist() == pytest.approx(per, abs=1e-6)
    assert float(bradley_terry_loss(C, R)) == pytest.approx(sum(per) / 3, abs=1e-6)
    assert float(bradley_terry_loss(C, R)) == pytest.approx((0.3132617 + 0.6931472 + 2.1269280) / 3, abs=1e-6)


def test_margin_and_weights_by_hand() -> None:
    m = torch.tensor([0.5, 1.0, 0.0])
    per = [-math.log(_sig(0.5)), -math.log(_sig(-1.0)), -math.log(_sig(-2))]
    assert bradley_terry_loss(C, R, margin=m, reduction="none").tolist() == pytest.approx(per, abs=1e-6)
    w = torch.tensor([1.0, 0.0, 3.0])  # weighted mean: (1 * l0 + 3 * l2) / 4
    assert float(bradley_terry_loss(C, R, margin=m, weight=w)) == pytest.approx(
        (per[0] + 3 * per[2]) / 4, abs=1e-6
    )
    assert float(bradley_terry_loss(C, R, weight=torch.zeros(3))) == 0.0  # all weights 0: 0, not NaN


def test_davidson_by_hand() -> None:
    tie = torch.tensor([False, True, False])
    nu = 0.5
    # l = log(e^{d/2} + e^{-d/2} + nu) - (d/2 or log nu)
    z = [math.exp(d / 2) + math.exp(-d / 2) + nu for d in (1, 0, -2)]
    per = [math.log(z[0]) - 0.5, math.log(z[1]) - math.log(nu), math.log(z[2]) + 1.0]
    assert davidson_loss(C, R, tie, nu, reduction="none").tolist() == pytest.approx(per, abs=1e-6)
    assert per[1] == pytest.approx(math.log(2.5 / 0.5))  # tie at d=0: Z = 1 + 1 + 0.5


def test_rao_kupper_by_hand() -> None:
    tie = torch.tensor([False, True, True])
    theta = 2.0
    p_win = 1 / (1 + theta * math.exp(-1))  # pi_c / (pi_c + theta pi_r) at d = 1
    p_tie = [(theta**2 - 1) / (1 + theta**2 + 2 * theta * math.cosh(d)) for d in (0, -2)]
    per = [-math.log(p_win), -math.log(p_tie[0]), -math.log(p_tie[1])]
    assert rao_kupper_loss(C, R, tie, theta, reduction="none").tolist() == pytest.approx(per, abs=1e-6)
    assert p_tie[0] == pytest.approx(3 / 9)


def test_centering_by_hand() -> None:
    assert float(centering_loss(C, R)) == pytest.approx((9 + 1 + 0) / 3)


@pytest.mark.parametrize("model", ["davidson", "rao_kupper"])
def test_outcome_probabilities_sum_to_one(model: str) -> None:
    d = torch.linspace(-30, 30, 61)
    win, tie, lose = outcome_probs(d, model, 1.7)
    assert torch.allclose(win + tie + lose, torch.ones_like(d), atol=1e-6)
    assert torch.all(tie[30] >= tie)  # ties are likeliest when the rewards are equal
    assert torch.all(win[1:] >= win[:-1])


def test_tie_models_reduce_to_bradley_terry_without_ties() -> None:
    torch.manual_seed(0)
    c, r = torch.randn(64) * 3, torch.randn(64) * 3
    no_ties = torch.zeros(64, dtype=torch.bool)
    bt = bradley_terry_loss(c, r, reduction="none")
    # exactly at the boundary: nu = 0, theta = 1
    assert torch.allclose(davidson_loss(c, r, no_ties, 0.0, reduction="none"), bt, atol=1e-6)
    assert torch.allclose(rao_kupper_loss(c, r, no_ties, 1.0, reduction="none"), bt, atol=1e-6)
    assert torch.allclose(bradley_terry_tie_loss(c, r, no_ties, reduction="none"), bt)
    # and in the limit nu -> 0, theta -> 1
    for eps in (1e-2, 1e-4, 1e-6):
        assert float((davidson_loss(c, r, no_ties, eps, reduction="none") - bt).abs().max()) < 2 * eps
        assert float((rao_kupper_loss(c, r, no_ties, 1 + eps, reduction="none") - bt).abs().max()) < 2 * eps
    # with no ties in the data, the tie parameter's likelihood is best at the boundary: fitting it drives
    # nu to 0 / theta to 1, i.e. back to Bradley-Terry
    for model, start in (("davidson", 1.0), ("rao_kupper", 2.0)):
        p = torch.tensor(start, requires_grad=True)
        TIE_MODELS[model](c, r, no_ties, p).backward()
        assert float(p.grad) > 0


def test_drop_ignores_ties_and_margins_only_touch_strict_pairs() -> None:
    tie = torch.tensor([False, True, False])
    expected = bradley_terry_loss(C[[0, 2]], R[[0, 2]])
    assert float(bradley_terry_tie_loss(C, R, tie)) == pytest.approx(float(expected))
    m = torch.tensor([0.0, 5.0, 0.0])  # a margin on a tie pair changes nothing
    for model in ("davidson", "rao_kupper"):
        a = TIE_MODELS[model](C, R, tie, 1.5, margin=m, reduction="none")
        b = TIE_MODELS[model](C, R, tie, 1.5, reduction="none")
        assert torch.allclose(a, b)


def test_extreme_gaps_are_finite_with_finite_gradients() -> None:
    c = torch.tensor([1e4, -1e4, 0.0, 50.0], requires_grad=True)
    r = torch.zeros(4)
    tie = torch.tensor([False, False, True, True])
    for model, p in (("davidson", 0.7), ("rao_kupper", 1.3), ("drop", 0.0)):
        loss = TIE_MODELS[model](c, r, tie, p)
        (g,) = torch.autograd.grad(loss, c)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), model


def test_multi_head_by_hand() -> None:
    chosen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    rejected = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # head 0: pair 0 strict (+1), pair 1 tie; head 1: pair 0 "rejected better" (-1), pair 1 unlabelled
    labels = torch.tensor([[1, -1], [0, -100]])
    nu = torch.tensor([1.0, 1.0])
    total, per = multi_head_loss(chosen, rejected, labels, "davidson", nu)
    head0 = (davidson_loss(torch.tensor([1.0, 0.0]), torch.zeros(2), torch.tensor([False, True]), 1.0)).item()
    head1 = davidson_loss(
        torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([False]), 1.0
    ).item()  # flipped
    assert per.tolist() == pytest.approx([head0, head1], abs=1e-6)
    assert float(total) == pytest.approx(head0 + head1, abs=1e-6)
    assert label_mask(labels, "drop").tolist() == [[True, True], [False, False]]
    _, per_drop = multi_head_loss(chosen, rejected, labels, "drop", nu)
    assert per_drop[0].item() == pytest.approx(-math.log(_sig(1.0)), abs=1e-6)  # the tie is dropped
    # a normaliser from the whole optimiser step replaces the batch's own weight sums
    _, per_norm = multi_head_loss(
        chosen, rejected, labels, "davidson", nu, normalizer=torch.tensor([4.0, 2.0])
    )
    assert per_norm.tolist() == pytest.approx([head0 * 2 / 4, head1 / 2], abs=1e-6)
