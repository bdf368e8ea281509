"""Arena ratings (annotation/ratings.py): hand-computed cases, an independent likelihood fit with scipy, the
intervals' coverage over repeated draws, style control, fragility / votes-to-separate / next_pair on cases
with known answers, the store and FastChat readers, and the CLI's exit codes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from glmwb.annotation import ratings as R
from glmwb.annotation.ratings import (
    Battle,
    RatingsError,
    adjacent_separations,
    battles_from_store,
    fit_bt,
    markdown_counts,
    next_pair,
    online_elo,
    rank_fragility,
    read_battles,
    votes_to_separate,
    win_rate_matrix,
)
from glmwb.annotation.store import NewItem, NewResponse

K = 400.0 / math.log(10.0)  # rating points per logit


def many(model_a: str, model_b: str, winner: str, n: int, **kw) -> list[Battle]:
    return [Battle(model_a, model_b, winner, **kw) for _ in range(n)]


def simulate(theta, n, rng, nu=0.0, gamma=0.0, bothbad=0.0, names=None):
    """Davidson battles among len(theta) models (uniform pairs, random sides); nu = 0: plain BT."""
    m = len(theta)
    names = names or [f"m{i}" for i in range(m)]
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    d = np.asarray(theta)[a] - np.asarray(theta)[b] + gamma
    z = np.exp(d / 2) + np.exp(-d / 2) + nu
    pw, pt = np.exp(d / 2) / z, nu / z
    u = rng.random(n)
    tie = np.where(rng.random(n) < bothbad, "tie (bothbad)", "tie")
    win = np.where(u < pw, "model_a", np.where(u < pw + pt, tie, "model_b"))
    return [Battle(names[i], names[j], w) for i, j, w in zip(a, b, win, strict=True)]


def centred(lb, names):
    r = np.array([lb.row(n).rating for n in names])
    return r - r.mean()


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases.
# ---------------------------------------------------------------------------------------------------------


def test_two_models_plain_bt_is_the_log_odds():
    battles = many("x", "y", "model_a", 3) + many("y", "x", "model_b", 0) + many("x", "y", "model_b", 1)
    lb = fit_bt(battles, ties="none", position_bias=False, bootstrap=0, prior=0.0)
    gap = lb.row("x").rating - lb.row("y").rating
    assert gap == pytest.approx(400 * math.log10(3), abs=1e-5)  # 190.85 points: 3-to-1 odds
    assert lb.row("x").rating + lb.row("y").rating == pytest.approx(2000.0)  # the ratings average 1000
    # the model-based standard error of the log-odds of a binomial: 1 / sqrt(n p (1 - p))
    state = lb._state
    var_gap = state.cov_model[0, 0] + state.cov_model[1, 1] - 2 * state.cov_model[0, 1]
    assert math.sqrt(var_gap) == pytest.approx(1 / math.sqrt(4 * 0.75 * 0.25), rel=1e-6)
    assert (lb.row("x").wins, lb.row("x").losses, lb.row("x").battles) == (3, 1, 4)


def test_davidson_and_rao_kupper_two_models_closed_form():
    # 3 wins, 1 loss, 2 ties. Davidson: e^d = W / L, nu = T / sqrt(W L). Rao-Kupper: s(d - eta) = W / N,
    # s(-d - eta) = L / N.
    battles = many("x", "y", "model_a", 3) + many("x", "y", "model_b", 1) + many("x", "y", "tie", 2)
    dav = fit_bt(battles, ties="davidson", position_bias=False, bootstrap=0, prior=0.0)
    assert dav.row("x").rating - dav.row("y").rating == pytest.approx(K * math.log(3), abs=1e-4)
    assert dav.tie_params["nu"] == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    rk = fit_bt(battles, ties="rao-kupper", position_bias=False, bootstrap=0, prior=0.0)
    d_minus_eta, minus_d_minus_eta = math.log(0.5 / 0.5), math.log((1 / 6) / (5 / 6))
    d = (d_minus_eta - minus_d_minus_eta) / 2
    assert rk.row("x").rating - rk.row("y").rating == pytest.approx(K * d, abs=1e-4)
    assert rk.tie_params["eta"] == pytest.approx(d - d_minus_eta, rel=1e-6)
    # ties as half a win: x scores 4 of 6 -> odds 2
    none = fit_bt(battles, ties="none", position_bias=False, bootstrap=0, prior=0.0)
    assert none.row("x").rating - none.row("y").rating == pytest.approx(K * math.log(2), abs=1e-4)


def test_position_bias_hand_case():
    # whoever is shown first wins 3 of 4: equal strengths, a first-position advantage of log 3
    battles = (
        many("x", "y", "model_a", 3) + many("x", "y", "model_b", 1)
        + many("y", "x", "model_a", 3) + many("y", "x", "model_b", 1)
    )  # fmt: skip
    lb = fit_bt(battles, ties="none", bootstrap=0, prior=0.0)
    assert lb.row("x").rating == pytest.approx(lb.row("y").rating, abs=1e-6)
    assert lb.position_bias.estimate == pytest.approx(400 * math.log10(3), abs=1e-4)


def test_bothbad_is_kept_apart():
    battles = (
        many("x", "y", "model_a", 5) + many("x", "y", "model_b", 3)
        + many("x", "y", "tie", 3) + many("x", "y", "tie (bothbad)", 1)
    )  # fmt: skip
    sep = fit_bt(battles, position_bias=False, bootstrap=0, prior=0.0)
    assert sep.tie_params["bothbad_share"] == pytest.approx(0.25)
    assert sep.row("x").bothbad == 1 and sep.row("x").ties == 3
    assert sep.row("x").bothbad_rate == pytest.approx(1 / 12)
    # the strengths see a tie either way; dropping "both bad" changes the data
    tie = fit_bt(battles, bothbad="tie", position_bias=False, bootstrap=0, prior=0.0)
    assert tie.row("x").rating == pytest.approx(sep.row("x").rating)
    assert tie.row("x").ties == 4 and tie.row("x").bothbad == 0
    drop = fit_bt(battles, bothbad="drop", position_bias=False, bootstrap=0, prior=0.0)
    assert drop.n_battles == 11 and drop.row("x").battles == 11
    assert drop.tie_params["nu"] == pytest.approx(3 / math.sqrt(15), rel=1e-6)


def test_rank_is_one_plus_the_models_wholly_above():
    lower = np.array([10.0, 5.0, 4.0, -3.0])
    upper = np.array([20.0, 12.0, 9.0, 4.5])
    assert R._ranks(lower, upper).tolist() == [1, 1, 2, 3]  # 4.5 < 5: both middle ones lie wholly above


def test_online_elo_hand_case():
    battles = [Battle("x", "y", "model_a"), Battle("x", "y", "tie")]
    # first: expected 0.5, x scores 1 -> 1002 / 998; then a tie at a 4-point lead: x expected e > 0.5
    e = 1 / (1 + 10 ** (-4 / 400))
    assert online_elo(battles) == pytest.approx({"x": 1002 + 4 * (0.5 - e), "y": 998 - 4 * (0.5 - e)})
    assert online_elo(battles[:1]) == pytest.approx({"x": 1002.0, "y": 998.0})


def test_win_rate_matrix_hand_case():
    battles = many("x", "y", "model_a", 3) + many("y", "x", "model_a", 1) + many("x", "y", "tie", 2)
    wr = win_rate_matrix(battles)
    assert wr.models == ["x", "y"]
    assert wr.rate[0, 1] == pytest.approx(0.75) and wr.rate[1, 0] == pytest.approx(0.25)
    assert np.isnan(wr.rate[0, 0]) and wr.count[0, 1] == 6
    half = win_rate_matrix(battles, ties="half")
    assert half.rate[0, 1] == pytest.approx(4 / 6)


def test_markdown_counts():
    text = "# Title\n\nSome **bold** and __also__.\n\n- one\n- two\n1. three\n## Sub\n"
    assert markdown_counts(text) == {"headers": 2, "lists": 3, "bold": 2}


# ---------------------------------------------------------------------------------------------------------
# Against an independent implementation: a direct scipy likelihood fit.
# ---------------------------------------------------------------------------------------------------------


def davidson_nll(params, a, b, y, m):
    """Davidson's negative log-likelihood written battle by battle (theta_0 fixed at 0; last: log nu)."""
    theta = np.concatenate([[0.0], params[: m - 1]])
    gamma, log_nu = params[m - 1], params[m]
    d = theta[a] - theta[b] + gamma
    log_z = np.logaddexp(np.logaddexp(d / 2, -d / 2), log_nu)
    ll = np.where(y == 0, d / 2, np.where(y == 1, -d / 2, log_nu)) - log_z
    return -ll.sum()


def bt_nll(params, a, b, y, m):
    theta = np.concatenate([[0.0], params[: m - 1]])
    d = theta[a] - theta[b] + params[m - 1]
    return -np.where(y == 0, log_expit(d), log_expit(-d)).sum()


def arrays(battles, names):
    idx = {n: i for i, n in enumerate(names)}
    a = np.array([idx[x.model_a] for x in battles])
    b = np.array([idx[x.model_b] for x in battles])
    y = np.array([{"model_a": 0, "model_b": 1}.get(x.winner, 2) for x in battles])
    return a, b, y


def test_matches_a_direct_scipy_fit_and_recovers_the_order():
    rng = np.random.default_rng(7)
    theta = np.array([1.2, 0.7, 0.3, 0.0, -0.4, -0.9])
    names = [f"m{i}" for i in range(6)]
    battles = simulate(theta, 6000, rng, nu=0.6, gamma=0.1)
    lb = fit_bt(battles, bootstrap=0, prior=0.0)
    a, b, y = arrays(battles, names)
    res = minimize(davidson_nll, np.zeros(7), args=(a, b, y, 6), method="BFGS", options={"gtol": 1e-8})
    ref = np.concatenate([[0.0], res.x[:5]])
    ours = np.array([lb.row(n).rating for n in names]) / K
    assert np.allclose(ours - ours[0], ref, atol=2e-4)
    assert lb.tie_params["nu"] == pytest.approx(math.exp(res.x[6]), rel=1e-3)
    assert lb.position_bias.estimate / K == pytest.approx(res.x[5], abs=2e-4)
    assert lb.models == names  # the true order


def test_tie_models_reduce_to_plain_bt_without_ties():
    rng = np.random.default_rng(3)
    names = [f"m{i}" for i in range(5)]
    battles = simulate(np.linspace(1, -1, 5), 3000, rng)
    assert not any(x.winner.startswith("tie") for x in battles)
    a, b, y = arrays(battles, names)
    ref = minimize(bt_nll, np.zeros(5), args=(a, b, y, 5), method="BFGS", options={"gtol": 1e-8}).x
    ref = np.concatenate([[0.0], ref[:4]]) * K
    for ties in ("davidson", "rao-kupper", "none"):
        lb = fit_bt(battles, ties=ties, bootstrap=0, prior=0.0)
        ours = np.array([lb.row(n).rating for n in names])
        assert np.allclose(ours - ours[0], ref, atol=0.05), ties
        assert "nu" not in lb.tie_params and "eta" not in lb.tie_params


def test_derivatives_match_finite_differences():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(1, 9))
    y = np.array([0, 1, 2] * 3)
    for model in ("davidson", "rao-kupper"):
        tau = np.array([-0.7])
        l0, l_d, l_t, l_dd, l_dt, l_tt = R._outcome_terms(model, y, d, tau)
        h = 1e-6
        ld_num = (R._outcome_terms(model, y, d + h, tau)[0] - R._outcome_terms(model, y, d - h, tau)[0]) / (
            2 * h
        )
        lt_num = (R._outcome_terms(model, y, d, tau + h)[0] - R._outcome_terms(model, y, d, tau - h)[0]) / (
            2 * h
        )
        assert np.allclose(l_d, ld_num, atol=1e-6) and np.allclose(l_t, lt_num, atol=1e-6)
        ldd = (R._outcome_terms(model, y, d + h, tau)[1] - R._outcome_terms(model, y, d - h, tau)[1]) / (
            2 * h
        )
        ldt = (R._outcome_terms(model, y, d, tau + h)[1] - R._outcome_terms(model, y, d, tau - h)[1]) / (
            2 * h
        )
        ltt = (R._outcome_terms(model, y, d, tau + h)[2] - R._outcome_terms(model, y, d, tau - h)[2]) / (
            2 * h
        )
        assert np.allclose(l_dd, ldd, atol=1e-5) and np.allclose(l_dt, ldt, atol=1e-5)
        assert np.allclose(l_tt, ltt, atol=1e-5)


def test_intervals_cover_the_true_values_at_about_the_stated_rate():
    """Over 120 draws of 1,500 battles among 5 models, the robust 95 % intervals cover the true (centred)
    ratings 95 % of the time up to sampling error; the bootstrap ones (40 draws x 200 rounds) too."""
    theta = np.array([0.8, 0.4, 0.0, -0.3, -0.9])
    names = [f"m{i}" for i in range(5)]
    truth = (theta - theta.mean()) * K + 1000
    rng = np.random.default_rng(11)
    hits = []
    boot_hits = []
    for draw in range(120):
        battles = simulate(theta, 1500, rng, nu=0.5)
        lb = fit_bt(battles, bootstrap=200 if draw < 40 else 0, seed=draw)
        for n, t in zip(names, truth, strict=True):
            row = lb.row(n)
            hits.append(row.robust.lower <= t <= row.robust.upper)
            if row.bootstrap is not None:
                boot_hits.append(row.bootstrap.lower <= t <= row.bootstrap.upper)
    # 600 intervals (correlated within a draw): 0.95 +- about 0.03
    assert 0.91 <= np.mean(hits) <= 0.985, np.mean(hits)
    assert 0.89 <= np.mean(boot_hits) <= 0.99, np.mean(boot_hits)


def test_bootstrap_and_robust_intervals_agree_on_a_large_sample():
    rng = np.random.default_rng(5)
    battles = simulate(np.linspace(1, -1, 8), 20000, rng, nu=0.4, bothbad=0.3)
    lb = fit_bt(battles, bootstrap=300)
    for r in lb.rows:
        assert r.bootstrap.upper - r.bootstrap.lower == pytest.approx(
            r.robust.upper - r.robust.lower, rel=0.2
        )


def test_weights_count_as_copies():
    rng = np.random.default_rng(2)
    battles = simulate(np.linspace(1, -1, 4), 800, rng, nu=0.3)
    doubled = battles + [b for b in battles if b.model_a == "m0"]
    weighted = [
        Battle(b.model_a, b.model_b, b.winner, weight=2.0 if b.model_a == "m0" else 1.0) for b in battles
    ]
    one = fit_bt(doubled, bootstrap=0)
    two = fit_bt(weighted, bootstrap=0)
    for n in one.models:
        assert one.row(n).rating == pytest.approx(two.row(n).rating, abs=1e-6)
    unweighted = fit_bt(weighted, bootstrap=0, weighted=False)
    assert unweighted.row("m0").rating != pytest.approx(two.row("m0").rating, abs=1e-3)


def test_category_filter():
    rng = np.random.default_rng(4)
    code = [Battle(b.model_a, b.model_b, b.winner, category="code") for b in simulate([1, 0, -1], 900, rng)]
    chat = [Battle(b.model_a, b.model_b, b.winner, category="chat") for b in simulate([-1, 0, 1], 900, rng)]
    lb = fit_bt(code + chat, category="code", bootstrap=0)
    assert lb.models == ["m0", "m1", "m2"] and lb.n_battles == 900 and lb.category == "code"
    assert fit_bt(code + chat, category="chat", bootstrap=0).models == ["m2", "m1", "m0"]
    with pytest.raises(RatingsError, match="category 'math'"):
        fit_bt(code + chat, category="math")


def test_style_control_removes_a_planted_length_bias():
    """The weakest model writes the longest answers and voters favour length: without style control it
    climbs the board; with it the true order and strengths come back and the length coefficient is found."""
    rng = np.random.default_rng(9)
    theta = np.array([0.6, 0.3, 0.0, -0.3])
    mean_len = np.array([200.0, 200.0, 200.0, 900.0])
    beta = 2.5  # logits per unit of (len_a - len_b) / (len_a + len_b + 1)
    n, m = 8000, 4
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    la = rng.gamma(4.0, mean_len[a] / 4.0)
    lb_ = rng.gamma(4.0, mean_len[b] / 4.0)
    x = (la - lb_) / (la + lb_ + 1)
    p = expit(theta[a] - theta[b] + beta * x)
    win = np.where(rng.random(n) < p, "model_a", "model_b")
    md = {"headers": 0, "lists": 0, "bold": 0}
    battles = [
        Battle(f"m{i}", f"m{j}", w, tokens_a=ta, tokens_b=tb, markdown_a=md, markdown_b=md)
        for i, j, w, ta, tb in zip(a, b, win, la, lb_, strict=True)
    ]
    plain = fit_bt(battles, bootstrap=0)
    assert plain.models[0] == "m3"  # the verbose weak model looks best
    styled = fit_bt(battles, style_control=True, bootstrap=100)
    assert styled.models == ["m0", "m1", "m2", "m3"]
    names = ["m0", "m1", "m2", "m3"]
    truth = (theta - theta.mean()) * K
    assert np.allclose(centred(styled, names), truth, atol=45)  # within about 2 s.e.
    length = styled.style["length"]
    sd = np.std(x)
    assert length.lower > 0 and length.estimate == pytest.approx(K * beta * sd, rel=0.2)
    assert set(styled.style) == {"length"}  # markdown counts without variation are left out


def test_style_control_needs_token_counts():
    with pytest.raises(RatingsError, match="token counts"):
        fit_bt(many("x", "y", "model_a", 3) + many("x", "y", "model_b", 2), style_control=True)


def test_refusals():
    with pytest.raises(RatingsError, match="winner"):
        Battle("x", "y", "draw")
    with pytest.raises(RatingsError, match="itself"):
        Battle("x", "x", "tie")
    with pytest.raises(RatingsError, match="never met"):
        fit_bt(many("a", "b", "model_a", 2) + many("c", "d", "tie", 2))
    with pytest.raises(RatingsError, match="ties must be"):
        fit_bt(many("a", "b", "model_a", 2), ties="elo")


def test_an_unbeaten_model_gets_a_finite_rating():
    battles = many("x", "y", "model_a", 10) + many("y", "z", "model_a", 5) + many("z", "y", "model_a", 5)
    lb = fit_bt(battles, bootstrap=50)
    assert lb.models[0] == "x" and all(math.isfinite(r.rating) and math.isfinite(r.upper) for r in lb.rows)


# ---------------------------------------------------------------------------------------------------------
# Fragility, votes to separate, next pair.
# ---------------------------------------------------------------------------------------------------------


def test_fragility_matches_brute_force_on_two_models():
    battles = many("x", "y", "model_a", 40) + many("x", "y", "model_b", 12)
    lb = fit_bt(battles, ties="none", position_bias=False, bootstrap=0)
    assert [r.rank for r in lb.rows] == [1, 2]
    frag = rank_fragility(battles, lb)

    def ranks(wins, losses):
        sub = many("x", "y", "model_a", wins) + many("x", "y", "model_b", losses)
        fit = fit_bt(sub, ties="none", position_bias=False, bootstrap=0)
        return fit.row("x").rank, fit.row("y").rank

    table = {(dw, dl): ranks(40 - dw, 12 - dl) for dw in range(41) for dl in range(13) if dw + dl < 52}
    for i, name in enumerate(("x", "y")):
        best = min(dw + dl for (dw, dl), r in table.items() if r[i] != (1, 2)[i])
        assert frag[name].votes == best and lb.row(name).fragility == best
    # y moves up once the intervals overlap; x moves down only once y lies wholly above it
    assert frag["y"].new_rank == 1 and frag["x"].new_rank == 2 and frag["x"].votes > frag["y"].votes
    assert frag["y"].removed[0][:3] == ("x", "y", "model_a")  # x's wins are the ones to take away


def test_fragility_of_a_lone_leader_is_larger_than_of_a_close_pair():
    rng = np.random.default_rng(1)
    battles = simulate([2.0, 0.25, 0.0, -2.0], 4000, rng)
    lb = fit_bt(battles, bootstrap=0, position_bias=False)
    frag = rank_fragility(battles, lb)
    assert frag["m0"].votes > 2 * frag["m1"].votes
    for f in frag.values():  # every reported removal is checked by a refit
        assert f.votes == sum(c for *_, c in f.removed)


def test_votes_to_separate_two_models_closed_form():
    # no ties, no position term: var(gap) = 1 / (n p (1 - p)); separated when gap >= z * sd(gap)
    battles = many("x", "y", "model_a", 12) + many("x", "y", "model_b", 8)
    lb = fit_bt(battles, ties="none", position_bias=False, bootstrap=0, prior=0.0)
    p, d = 0.6, math.log(1.5)
    for conf in (0.95, 0.8):
        z = R._z(conf)
        need = z * z / (d * d * p * (1 - p))
        # the current uncertainty is the robust one: here J = H (binomial), so 20 battles' worth
        expect = math.ceil(need - 20)
        for crit in ("rank", "difference"):
            sep = votes_to_separate(lb, "x", "y", confidence=conf, criterion=crit)
            assert abs(sep.votes - expect) <= 1, (conf, crit, sep)
    assert adjacent_separations(lb)[0].model_a == "x"


def test_votes_to_separate_is_zero_when_separated_and_none_without_a_gap():
    battles = many("x", "y", "model_a", 90) + many("x", "y", "model_b", 10)
    lb = fit_bt(battles, ties="none", position_bias=False, bootstrap=0)
    assert votes_to_separate(lb, "x", "y").votes == 0
    even = fit_bt(
        many("x", "y", "model_a", 5) + many("x", "y", "model_b", 5), bootstrap=0, position_bias=False
    )
    assert votes_to_separate(even, "x", "y").votes is None


def test_next_pair_prefers_new_models_then_the_most_uncertain_neighbours():
    rng = np.random.default_rng(0)
    # m0 / m1 close and rarely compared; every other pair well measured
    battles = simulate([1.0, 0.9, -0.5, -1.5], 6000, rng)
    battles = [b for b in battles if {b.model_a, b.model_b} != {"m0", "m1"}]
    battles += simulate([1.0, 0.9], 30, rng, names=["m0", "m1"])
    lb = fit_bt(battles, bootstrap=0)
    choice = next_pair(lb, ["m0", "m1", "m2", "m3"], np.random.default_rng(1), explore=0.2)
    best = max(choice.scores, key=choice.scores.get)
    assert best == ("m0", "m1")
    assert sum(choice.scores.values()) == pytest.approx(1.0)
    assert min(choice.scores.values()) >= 0.2 / 6 - 1e-12  # every pair keeps a chance
    assert choice.weight == pytest.approx(1 / (6 * choice.prob))
    fresh = next_pair(lb, ["m0", "m1", "m2", "m3", "new"], np.random.default_rng(2), explore=0.0)
    assert "new" in (fresh.model_a, fresh.model_b) and fresh.prob == pytest.approx(1 / 4)
    uniform = next_pair(None, ["a", "b", "c"], np.random.default_rng(0))
    assert uniform.prob == pytest.approx(1 / 3) and uniform.weight == pytest.approx(1.0)


def test_inverse_probability_weights_undo_a_skewed_pair_sampling():
    """Non-transitive preferences (a rock-paper-scissors part): the BT target depends on how often each
    pair is asked; weighting each battle by 1 / its sampling probability brings back the uniform answer."""
    rng = np.random.default_rng(8)
    p_win = {("a", "b"): 0.8, ("b", "c"): 0.8, ("c", "a"): 0.8}  # a > b > c > a

    def draw(pair_probs, n):
        pairs = list(pair_probs)
        probs = np.array([pair_probs[p] for p in pairs])
        out = []
        for t in rng.choice(len(pairs), n, p=probs):
            x, y = pairs[t]
            w = 1 / (len(pairs) * probs[t])
            winner = "model_a" if rng.random() < p_win[(x, y)] else "model_b"
            out.append(Battle(x, y, winner, weight=w, pair_prob=float(probs[t])))
        return out

    skewed = draw({("a", "b"): 0.6, ("b", "c"): 0.2, ("c", "a"): 0.2}, 30000)
    ipw = fit_bt(skewed, bootstrap=0, position_bias=False)
    raw = fit_bt(skewed, bootstrap=0, position_bias=False, weighted=False)
    # uniform sampling of a symmetric cycle: all three equal
    assert max(abs(r.rating - 1000) for r in ipw.rows) < 12
    assert max(abs(r.rating - 1000) for r in raw.rows) > 60


# ---------------------------------------------------------------------------------------------------------
# Readers and the CLI.
# ---------------------------------------------------------------------------------------------------------


def fastchat_rows():
    meta = {
        "sum_assistant_a_tokens": 120, "header_count_a": {"h1": 1, "h2": 2}, "list_count_a": {"ordered": 3,
        "unordered": 1}, "bold_count_a": {"**": 2, "__": 0}, "sum_assistant_b_tokens": 40,
        "header_count_b": {"h1": 0}, "list_count_b": {"ordered": 0}, "bold_count_b": {"**": 0},
    }  # fmt: skip
    rows = []
    for i in range(30):
        winner = ["model_a", "model_b", "tie", "tie (bothbad)", "model_a"][i % 5]
        pair = [("gpt", "llama"), ("llama", "glm"), ("glm", "gpt")][i % 3]
        rows.append({"model_a": pair[0], "model_b": pair[1], "winner": winner, "conv_metadata": meta,
                     "anony": i % 7 != 0, "tstamp": 1.7e9 + i, "judge": f"u{i % 4}", "question_id": f"q{i}"})  # fmt: skip
    return rows


def test_read_fastchat_jsonl_and_json(tmp_path):
    rows = fastchat_rows()
    jl = tmp_path / "battles.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    js = tmp_path / "battles.json"
    js.write_text(json.dumps(rows))
    a, b = read_battles(jl), read_battles(js)
    assert a == b and len(a) == 30
    assert a[0].tokens_a == 120 and a[0].markdown_a == {"headers": 3, "lists": 4, "bold": 2}
    assert a[0].markdown_b == {"headers": 0, "lists": 0, "bold": 0}
    assert len(read_battles(jl, anonymous_only=True)) == 30 - 5
    fit_bt(a, style_control=True, bootstrap=10)  # the covariates are usable


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_a": "x", "model_b": "y"}\n', "missing field 'winner'"),
        ('{"model_a": "x", "model_b": "y", "winner": "draw"}\n', "line 1: winner must be"),
        ('{"model_a": "x", "model_b": "y", "winner": "tie"}\n{oops\n', "line 2: not valid JSON"),
        ("", "no battles"),
        ('[{"model_a": "x", "model_b": "y", "winner": "tie", "conv_metadata": {"sum_assistant_a_tokens": -1}}]',
         "item 0, conv_metadata.sum_assistant_a_tokens"),
    ],
)  # fmt: skip
def test_bad_battle_files_name_the_row(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(RatingsError, match=message):
        read_battles(path)


def test_battles_from_store(sqlite_store):
    items = []
    for i in range(6):
        items.append(
            NewItem(
                prompt_uid=f"arena-{i}",
                prompt=[{"role": "user", "content": f"q{i}"}],
                responses=[NewResponse("## Plan\n- a\n- b", "glm-dpo"), NewResponse("short answer", "glm-sft")],
                meta={"arena": {"mode": "anonymous", "counted": i != 5, "weight": 1.5, "pair_prob": 0.2,
                                "category": "code", "tokens": {"A": 11, "B": 7}}},
                labels=[("judge-1", [0, 1, "tie", "both_bad", 0, 0][i])],
            )
        )  # fmt: skip
    items.append(  # a three-answer annotator item: not a battle
        NewItem(
            "other",
            [{"role": "user", "content": "x"}],
            [NewResponse(t, t) for t in ("m1", "m2", "m3")],
            labels=[("judge-1", 0)],
        )  # fmt: skip
    )
    sqlite_store.add_items(items, seed=3)
    battles = battles_from_store(sqlite_store)
    assert len(battles) == 5  # the uncounted vote and the three-answer item are left out
    info = {it.prompt_uid: it for it in sqlite_store.items().values()}
    for bt in battles:
        assert bt.category == "code" and bt.weight == 1.5 and bt.pair_prob == 0.2 and bt.judge == "judge-1"
        assert (bt.tokens_a, bt.tokens_b) == (11.0, 7.0)
    by_uid = {it.item_id: it for it in info.values()}
    votes = {v.uid: v for v in sqlite_store.votes()}
    for bt in battles:
        item = by_uid[votes[bt.id].item_id]
        letters = {r.letter: r.model for r in item.responses}
        assert (bt.model_a, bt.model_b) == (letters["A"], letters["B"])  # display order kept
        choice = votes[bt.id].choice
        expect = {"A": "model_a", "B": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}[choice]
        assert bt.winner == expect
        dpo_first = letters["A"] == "glm-dpo"
        assert bt.markdown_a == (
            {"headers": 1, "lists": 2, "bold": 0} if dpo_first else {"headers": 0, "lists": 0, "bold": 0}
        )
    assert len(battles_from_store(sqlite_store, include_uncounted=True)) == 6
    assert len(battles_from_store(sqlite_store, arena_only=True)) == 5
    assert battles_from_store(sqlite_store, category="chat") == []


def test_cli_leaderboard_from_votes_file(tmp_path, capsys):
    from glmwb.recipes.cli import main

    rng = np.random.default_rng(0)
    rows = [{"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner,
             "conv_metadata": {"sum_assistant_a_tokens": int(rng.integers(10, 500)),
                               "sum_assistant_b_tokens": int(rng.integers(10, 500))}}
            for b in simulate([0.5, 0.0, -0.5], 600, rng, nu=0.4)]  # fmt: skip
    path = tmp_path / "battles.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out, png = tmp_path / "lb.json", tmp_path / "lb.png"
    args = ["arena", "leaderboard", "--votes", str(path), "--style-control", "--bootstrap", "50"]
    assert main([*args, "--json", str(out), "--plot", str(png), "--fragility"]) == 0
    text = capsys.readouterr().out
    assert "m0" in text and "style length" in text and "fragility" in text
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["m0", "m1", "m2"] and "length" in data["style"]
    assert png.stat().st_size > 10_000


def test_cli_leaderboard_from_the_store(sqlite_url, capsys):
    from glmwb.annotation.store import Store
    from glmwb.recipes.cli import main

    with Store(sqlite_url) as store:
        store.add_items(
            NewItem(f"p{i}", [{"role": "user", "content": "q"}], [NewResponse("a", "x"), NewResponse("b", "y")],
                    labels=[("judge", [0, 0, 1, "tie"][i % 4])])
            for i in range(20)
        )  # fmt: skip
    assert main(["arena", "leaderboard", "--db", sqlite_url, "--bootstrap", "20"]) == 0
    assert "20 battles" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give one of --db URL or --votes FILE"),
        (["--votes", "/nonexistent/battles.jsonl"], "no such file"),
        (["--votes", "BAD"], "winner must be one of"),
        (["--votes", "GOOD", "--bootstrap", "-1"], "--bootstrap must be >= 0"),
        (["--votes", "ONE", "--bothbad", "drop"], "no battles to rate"),
        (["--votes", "SELF"], "cannot battle itself"),
        (["--votes", "GOOD", "--category", "math"], "no battles in category 'math'"),
        (["--votes", "GOOD", "--style-control"], "token counts"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    from glmwb.recipes.cli import main

    files = {
        "BAD": '{"model_a": "x", "model_b": "y", "winner": "x"}\n',
        "ONE": '{"model_a": "x", "model_b": "y", "winner": "tie (bothbad)"}\n',
        "SELF": '{"model_a": "x", "model_b": "x", "winner": "tie"}\n',
        "GOOD": '{"model_a": "x", "model_b": "y", "winner": "model_a"}\n{"model_a": "y", "model_b": "x", "winner": "tie"}\n',
    }  # fmt: skip
    resolved = []
    for a in args:
        if a in files:
            p = tmp_path / f"{a}.jsonl"
            p.write_text(files[a])
            a = str(p)
        resolved.append(a)
    assert main(["arena", "leaderboard", *resolved]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_unreadable_store_is_exit_2(tmp_path, capsys):
    from glmwb.recipes.cli import main

    bad = tmp_path / "not-a-db.db"
    bad.write_text("this is not sqlite")
    assert main(["arena", "leaderboard", "--db", str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
