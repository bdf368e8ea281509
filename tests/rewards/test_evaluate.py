"""Evaluation functions against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glmwb.annotation.records import PreferenceRecord
from glmwb.rewards.evaluate import (
    calibration,
    ensemble_disagreement,
    length_baseline,
    length_baseline_line,
    length_correlation,
    pairwise_metrics,
    plot_distributions,
    plot_reliability,
    spearman,
    world_agreement,
)


def test_pairwise_metrics_by_hand() -> None:
    chosen = torch.tensor([2.0, 1.0, 0.0, 0.5, 3.0])
    rejected = torch.tensor([1.0, 1.0, 1.0, 0.4, 0.0])
    tie = torch.tensor([False, False, False, True, True])
    m = pairwise_metrics(chosen, rejected, tie)
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # an exact score tie counts 1/2
    assert m["strict_pairs"] == 3 and m["tie_pairs"] == 2
    assert m["margin"] == pytest.approx(0.0) and m["strict_gap"] == pytest.approx(2 / 3)
    assert m["tie_gap"] == pytest.approx((0.1 + 3.0) / 2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert m["loss"] == pytest.approx(-(math.log(sig(1)) + math.log(0.5) + math.log(sig(-1))) / 3, abs=1e-6)
    d = pairwise_metrics(chosen, rejected, tie, "davidson", 2.0)
    # Davidson nu = 2: P(tie) = 2 / (e^{d/2} + e^{-d/2} + 2) beats P(win) = e^{d/2} / (...) while e^{d/2} < 2,
    # i.e. |d| < 2 ln 2 = 1.386: pairs 0-2 and 3 (|d| <= 1) are predicted ties, pair 4 (d = 3) a win
    assert d["three_way_accuracy"] == pytest.approx(1 / 5)  # only the tie pair 3 is right
    z = math.exp(0.05) + math.exp(-0.05) + 2
    assert d["mean_tie_prob_on_ties"] == pytest.approx(
        (2 / z + 2 / (math.exp(1.5) + math.exp(-1.5) + 2)) / 2, abs=1e-6
    )


def test_calibration_of_a_calibrated_model_is_good(tmp_path) -> None:
    rng = np.random.default_rng(0)
    d = torch.tensor(rng.normal(0, 2, 20000), dtype=torch.float32)
    # outcomes drawn from sigmoid(d): a perfectly calibrated RM; make "chosen" the winner of each draw
    wins = torch.rand(20000, generator=torch.Generator().manual_seed(0)) < torch.sigmoid(d)
    chosen, rejected = torch.where(wins, d, -d) / 2, torch.where(wins, -d, d) / 2
    cal = calibration(chosen, rejected, torch.zeros(20000, dtype=torch.bool), n_bins=10)
    assert cal["ece"] < 0.02 and cal["n"] == 20000
    bad = calibration(chosen * 5, rejected * 5, torch.zeros(20000, dtype=torch.bool))  # overconfident
    assert bad["ece"] > 0.1
    assert plot_reliability(cal, tmp_path / "r.png").stat().st_size > 5000
    path = plot_distributions(chosen, rejected, tmp_path / "d.png", {"a": chosen[:10], "b": rejected[:10]})
    assert path.stat().st_size > 5000


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    x = np.array([1, 2, 2, 3, 5, 5, 5, 8, 9, 0], dtype=float)
    y = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=float)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_length_correlation_flags_a_length_loving_rm() -> None:
    lengths_c, lengths_r = [10, 20, 30, 40], [40, 10, 15, 5]
    chosen = torch.tensor([1.0, 2.0, 3.0, 4.0])  # reward = length / 10
    rejected = torch.tensor([4.0, 1.0, 1.5, 0.5])
    m = length_correlation(chosen, rejected, lengths_c, lengths_r, torch.zeros(4, dtype=torch.bool))
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["gap_spearman"] == pytest.approx(1.0) and m["longer_wins"] == pytest.approx(3 / 4)


def test_length_baseline_and_length_balanced_accuracy_by_hand() -> None:
    # chars of chosen / rejected; pairs 0-1 differ by < 10 % (balanced), 2-4 do not; pair 5 is a tie
    chosen_len, rejected_len = [100, 50, 200, 30, 80, 10], [95, 52, 100, 60, 40, 99]
    chosen = torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0, 0.0])
    rejected = torch.tensor(
        [0.0, 0.0, 1.0, 1.0, 1.0, 5.0]
    )  # RM: right on 0 and 2, wrong on 1 and 3, tie on 4
    tie = torch.tensor([False] * 5 + [True])
    b = length_baseline(chosen, rejected, chosen_len, rejected_len, tie)
    assert b["strict_pairs"] == 5 and b["unit"] == "characters"
    assert b["longer_wins"] == pytest.approx(3 / 5)  # the chosen one is longer in pairs 0, 2, 4
    assert b["rm_accuracy"] == pytest.approx(2.5 / 5)
    bal = b["balanced"]
    assert (bal["pairs"], bal["accuracy"], bal["longer_wins"]) == (2, 0.5, 0.5)
    assert bal["se"] == pytest.approx(math.sqrt(0.25 / 2)) and bal["share"] == pytest.approx(2 / 5)
    line = length_baseline_line(b)
    assert line.startswith("longer answer wins 0.600 (the RM -0.100 over it)")
    assert (
        "length-balanced (answers within 10% in length, 2 pairs): RM 0.500 ± 0.354, longer wins 0.500" in line
    )


def test_ensemble_disagreement() -> None:
    torch.manual_seed(0)
    truth = torch.randn(200)
    noise = torch.randn(3, 200) * torch.linspace(0.01, 2.0, 200)  # later pairs: members disagree more
    chosen = truth.abs() + noise
    rejected = torch.zeros(3, 200)
    scale, shift = torch.tensor([[1.0], [3.0], [0.5]]), torch.tensor([[0.0], [5.0], [-2.0]])
    # members disagree on scale and offset (BT rewards have neither): standardised away before comparing
    m = ensemble_disagreement(chosen * scale + shift, rejected * scale + shift)
    assert m == pytest.approx(ensemble_disagreement(chosen, rejected))
    assert m["members"] == 3 and 0 < m["pairs_split"] < 1
    assert m["disagreement_error_spearman"] > 0  # disagreement flags the errors
    same = ensemble_disagreement(chosen[:1].repeat(3, 1), rejected)
    assert same["pairs_split"] == 0 and same["response_std"] < 1e-5


def test_world_agreement_against_the_ceiling() -> None:
    def rec(rule_choice: str, tie: bool = False, noise: float = 0.2) -> PreferenceRecord:
        return PreferenceRecord.from_dict({
            "prompt": "q", "chosen": "a", "rejected": "b", "tie": tie,
            "provenance": {"source": "world", "rule_choice": rule_choice, "noise": noise,
                           "kinds": ["correct", "wrong"], "family": "fact", "label": "A"},
        })  # fmt: skip

    records = [rec("chosen"), rec("chosen"), rec("rejected"), rec("tie", tie=True), rec("both_bad")]
    chosen = torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0])
    rejected = torch.zeros(5)
    m = world_agreement(records, chosen, rejected)
    assert m["pairs"] == 3  # only pairs where both the annotator and the rule are strict
    assert m["accuracy_vs_annotators"] == pytest.approx(2 / 3)
    assert m["accuracy_vs_rule"] == pytest.approx(1 / 3)  # the third pair's label went against the rule
    ceiling = (1 - 0.75 * 0.2) / (1 - 0.5 * 0.2)
    assert m["ceiling"] == pytest.approx(ceiling) and m["fraction_of_ceiling"] == pytest.approx(
        2 / 3 / ceiling
    )
    assert m["by_kinds"]["correct>wrong"]["pairs"] == 2
    # the 95 % Wilson interval of 2 right of 3, by hand, over the same ceiling
    z, n, p = 1.959964, 3, 2 / 3
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    assert m["accuracy_vs_annotators_ci95"] == pytest.approx([lo, hi], abs=1e-5)
    assert m["fraction_of_ceiling_ci95"] == pytest.approx([lo / ceiling, hi / ceiling], abs=1e-5)
    # 100x the pairs, same accuracy: about the normal interval's width, 2 z sqrt(p (1 - p) / 300)
    big = world_agreement(records[:3] * 100, chosen[:3].repeat(100), rejected[:3].repeat(100))
    b_lo, b_hi = big["accuracy_vs_annotators_ci95"]
    assert b_lo < 2 / 3 < b_hi and (b_hi - b_lo) == pytest.approx(
        2 * z * math.sqrt(p * (1 - p) / 300), rel=0.05
    )


# ----------------------------------------------------------------------------------------------------------
# The likelihood baseline: the causal LM's own Σ log p(response | prompt)


@pytest.fixture(scope="module")
def causal_lm_folder(tiny_tokenizer, tmp_path_factory):
    from glmwb.pretrain.hf import save_pretrained
    from tests.rewards.conftest import tiny_glm

    return save_pretrained(
        tiny_glm(tiny_tokenizer).eval(), tmp_path_factory.mktemp("lm"), tokenizer=tiny_tokenizer
    )


def _direct_response_logprob(folder, record, response: str) -> float:
    """Independent of the packed path: one padded forward over the whole text, full log-softmax."""
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.run import load_tokenizer
    from glmwb.pretrain.tokenizer import encode_response

    model, tok = load_pretrained(folder).eval(), load_tokenizer(str(folder))
    prompt = tok.apply_chat_template(
        [dict(m) for m in record.prompt], tokenize=True, return_dict=False, add_generation_prompt=True,
        sanitize_control_tokens=True,
    )  # fmt: skip
    ids = encode_response(tok, record.prompt, response)
    assert ids[: len(prompt)] == list(prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(
            model(x).logits.float()[0, :-1], -1
        )  # (T-1, V): position t predicts token t + 1
    return float(sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids))))


def test_likelihood_baseline_sums_the_response_logprobs(causal_lm_folder) -> None:
    from glmwb.rewards.evaluate import likelihood_baseline, response_logprobs
    from tests.rewards.conftest import planted_records

    records = planted_records(9, seed=3)
    chosen, rejected = response_logprobs(
        causal_lm_folder, records, batch_tokens=200
    )  # several packed batches
    for i in (0, 4, 8):
        assert chosen[i].item() == pytest.approx(
            _direct_response_logprob(causal_lm_folder, records[i], records[i].chosen), abs=1e-3
        )
        assert rejected[i].item() == pytest.approx(
            _direct_response_logprob(causal_lm_folder, records[i], records[i].rejected), abs=1e-3
        )
    # a pair whose two answers are the same text scores an exact tie (accuracy 1/2), and the report counts pairs
    same = [PreferenceRecord.from_dict({"prompt": "q", "chosen": "a b c", "rejected": "a b c"})]
    report = likelihood_baseline(causal_lm_folder, records + same)
    assert report["pairwise"]["pairs"] == 10
    c, r = response_logprobs(causal_lm_folder, same)
    assert c.item() == r.item()
    # a prompt longer than max_length loses tokens on the left; the response is still scored whole
    cut_c, _ = response_logprobs(causal_lm_folder, records[:1], max_length=len(records[0].chosen.split()) + 6)
    assert torch.isfinite(cut_c).all() and cut_c.item() != pytest.approx(chosen[0].item(), abs=1e-6)


def test_reward_stage_checks_the_likelihood_baseline_folder_before_training(
    reward_folder, causal_lm_folder
) -> None:
    from glmwb.pretrain.errors import ConfigError
    from glmwb.recipes.loader import build
    from glmwb.rewards.config import RewardRecipe
    from glmwb.rewards.run import _baseline_folder

    def recipe(init_from, baseline):
        model = {"init_from": init_from} if init_from else {"config": {"vocab_size": 64}}
        return build(RewardRecipe, {"model": model, "eval": {"likelihood_baseline": baseline}})

    assert _baseline_folder(recipe(str(causal_lm_folder), "init")) == str(causal_lm_folder)
    assert _baseline_folder(recipe(str(reward_folder), str(causal_lm_folder))) == str(causal_lm_folder)
    assert _baseline_folder(recipe(None, "init")) is None  # trained from scratch: nothing to compare with
    assert _baseline_folder(recipe(str(causal_lm_folder), None)) is None
    with pytest.raises(ConfigError, match="not a causal-LM GLM folder"):
        _baseline_folder(recipe(str(reward_folder), "init"))  # a reward folder has no LM head
    with pytest.raises(ConfigError, match="not a causal-LM GLM folder"):
        _baseline_folder(recipe(str(causal_lm_folder), "/nowhere"))
