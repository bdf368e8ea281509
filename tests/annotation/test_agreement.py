"""Agreement statistics against textbook values and against statsmodels / krippendorff on random data."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest

from glmwb.annotation.agreement import (
    agreement_report,
    cohens_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    label_table,
)

# Fleiss (1971), as in Wikipedia's "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# values 1-5 with gaps; nominal alpha = 0.743.
N = None
KRIPPENDORFF_DATA = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]


def test_fleiss_textbook_value():
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=1e-5)


def test_krippendorff_textbook_value():
    units = list(zip(*KRIPPENDORFF_DATA, strict=True))
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_cohen_textbook_values():
    # Wikipedia's "Cohen's kappa" examples: 50 proposals, yes/no.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    a = ["yes"] * 60 + ["no"] * 40
    b = ["yes"] * 45 + ["no"] * 15 + ["yes"] * 25 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.1304, abs=1e-4)


def test_perfect_and_undefined_agreement():
    assert cohens_kappa(["A", "B", "A"], ["A", "B", "A"]) == 1.0
    assert math.isnan(cohens_kappa(["A", "A"], ["A", "A"]))  # one category: kappa undefined
    assert krippendorff_alpha([["A", "A"], ["B", "B"]]) == 1.0
    assert math.isnan(krippendorff_alpha([["A"], ["B"]]))  # nothing pairable
    assert math.isnan(fleiss_kappa([[1, 0], [0, 1]]))


def _random_labels(seed: int, units: int, raters: int, categories: int, missing: float):
    rng = random.Random(seed)
    truth = [rng.randrange(categories) for _ in range(units)]
    data = []
    for _ in range(raters):
        row = []
        for t in truth:  # raters agree with the truth 70 % of the time
            v = t if rng.random() < 0.7 else rng.randrange(categories)
            row.append(None if rng.random() < missing else v)
        data.append(row)
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_statsmodels_and_krippendorff(seed):
    import krippendorff
    from statsmodels.stats.inter_rater import cohens_kappa as sm_cohen
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    full = _random_labels(seed, units=60, raters=5, categories=4, missing=0.0)
    units = list(zip(*full, strict=True))
    table = label_table(units, range(4))
    assert fleiss_kappa(table) == pytest.approx(sm_fleiss(np.array(table), method="fleiss"), abs=1e-12)

    a, b = full[0], full[1]
    confusion = np.zeros((4, 4))
    for x, y in zip(a, b, strict=True):
        confusion[x, y] += 1
    assert cohens_kappa(a, b) == pytest.approx(sm_cohen(confusion).kappa, abs=1e-12)

    sparse = _random_labels(seed + 10, units=80, raters=6, categories=4, missing=0.3)
    reference = krippendorff.alpha(
        reliability_data=np.array(sparse, dtype=float), level_of_measurement="nominal"
    )
    assert krippendorff_alpha(list(zip(*sparse, strict=True))) == pytest.approx(reference, abs=1e-12)


@dataclass
class V:
    item_id: int
    annotator: str
    choice: str
    gold_choice: str | None = None


def test_report_on_known_votes():
    votes = [
        V(1, "ann", "A"), V(1, "bob", "A"), V(1, "cat", "A"),
        V(2, "ann", "B"), V(2, "bob", "B"), V(2, "cat", "A"),
        V(3, "ann", "tie"), V(3, "bob", "tie"), V(3, "cat", "tie"),
        V(4, "ann", "both_bad"), V(4, "bob", "A"),
        V(5, "ann", "A"),  # a single vote: not pairable
        V(10, "ann", "A", "A"), V(11, "ann", "B", "A"), V(10, "bob", "A", "A"),  # gold items
    ]  # fmt: skip
    report = agreement_report(votes, min_common=2)
    assert report.votes == 15 and report.annotators == 3
    assert report.items == 5 and report.items_multi == 4
    units = [["A", "A", "A"], ["B", "B", "A"], ["tie", "tie", "tie"], ["both_bad", "A"]]
    assert report.krippendorff_alpha == pytest.approx(krippendorff_alpha(units))
    # pairwise agreement: item 1: 6/6 ordered pairs, item 2: 2/6, item 3: 6/6, item 4: 0/2 -> 14/20
    assert report.percent_agreement == pytest.approx(14 / 20)
    assert report.per_annotator["ann"]["gold_votes"] == 2
    assert report.per_annotator["ann"]["gold_accuracy"] == 0.5
    assert report.per_annotator["bob"]["gold_accuracy"] == 1.0
    assert math.isnan(report.per_annotator["cat"]["gold_accuracy"])
    # cat agrees with the others' majority on items 1 and 3, not on 2 -> 2/3
    assert report.per_annotator["cat"]["majority_agreement"] == pytest.approx(2 / 3)
    pair = next(p for p in report.cohen_pairs if (p["a"], p["b"]) == ("ann", "bob"))
    assert pair["items"] == 4 and pair["kappa"] == pytest.approx(
        cohens_kappa(["A", "B", "tie", "both_bad"], ["A", "B", "tie", "A"])
    )
    text = report.to_markdown()
    assert "Krippendorff" in text and "| ann |" in text
    assert report.to_dict()["per_annotator"]["cat"]["gold_accuracy"] is None  # NaN -> null in JSON


def _v(vote_id: int, item_id: int, who: str, choice: str):
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    at = datetime(2026, 12, 1) + timedelta(minutes=vote_id)
    return SimpleNamespace(vote_id=vote_id, item_id=item_id, annotator=who, choice=choice, gold_choice=None,
                           created_at=at)  # fmt: skip


def test_readings_and_why_a_statistic_is_not_available():
    from glmwb.annotation.agreement import reading

    assert [reading(x) for x in (-0.2, 0.1, 0.3, 0.5, 0.7, 0.9, float("nan"))] == [
        "poor (worse than chance)", "slight", "fair", "moderate", "substantial", "almost perfect", ""
    ]  # fmt: skip
    assert "| n/a | no votes yet |" in agreement_report([]).to_markdown()
    single = agreement_report([_v(1, 1, "x", "A"), _v(2, 2, "y", "B")])
    assert single.na_reason("krippendorff_alpha") == "no item has two votes yet"
    same = agreement_report([_v(1, 1, "x", "A"), _v(2, 1, "y", "A")])
    assert same.percent_agreement == 1.0 and same.na_reason("krippendorff_alpha").startswith("every vote has")
    assert same.na_reason("cohen_kappa_mean") == "no two annotators have 5 items in common yet"
    assert same.na_reason("percent_agreement") == ""
    split = agreement_report([_v(1, 1, "x", "A"), _v(2, 1, "y", "A"), _v(3, 2, "x", "A"), _v(4, 2, "y", "B")])
    text = split.to_markdown()
    assert f"| {split.fleiss_kappa:.3f} | {reading(split.fleiss_kappa)} |" in text


def test_agreement_curve_and_votes_over_time():
    from glmwb.annotation.agreement import agreement_curve, votes_over_time

    votes = [_v(4, 2, "y", "B"), _v(1, 1, "x", "A"), _v(2, 1, "y", "A"), _v(3, 2, "x", "A")]  # any order
    curve = agreement_curve(votes)
    assert [n for n, _, _ in curve] == [1, 2, 3, 4]
    assert math.isnan(curve[0][2]) and curve[1][2] == 1.0 and curve[2][2] == 1.0 and curve[3][2] == 0.5
    assert curve[3][1] == pytest.approx(agreement_report(votes).krippendorff_alpha)
    over = votes_over_time(votes)
    assert [n for _, n in over["x"]] == [1, 2] and [t.minute for t, _ in over["y"]] == [2, 4]
