"""Simulated annotators: the preference rule, noise and its agreement ceiling, strength, and the labelled
preference pairs (plain, minimal and counterfactual) they make from the embedded world."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from glmwb.annotation.annotators import (
    LABELS,
    PreferenceRule,
    SimulatedAnnotator,
    agreement_ceiling,
    contrast_pairs,
    preference_pairs,
)
from glmwb.pretrain.world import Prompt, World, make_world
from glmwb.pretrain.world.checking import Check


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(seed=0)


@pytest.fixture(scope="module")
def train(world: World) -> list[Prompt]:
    return world.prompts("train", 600, seed=0)


def test_annotator_without_noise_follows_the_rule(world: World, train: list[Prompt]) -> None:
    annotator = SimulatedAnnotator(PreferenceRule(), noise=0.0, seed=0)
    for p in train[:100]:
        r = {x.kind: x.text for x in world.responses(p, seed=1)}
        cases = [
            ("correct", "wrong", "A"),
            ("wrong", "correct", "B"),
            ("correct", "wrong_language", "A"),
            ("wrong_language", "verbose", "B"),
            ("correct", "verbose", "A"),
            ("verbose", "correct", "B"),
            ("wrong_language", "refusal", "A"),
            ("wrong", "refusal", "both_bad"),
            ("off_topic", "wrong", "both_bad"),
        ]
        for a, b, expected in cases:
            assert annotator.judge(p, r[a], r[b]) == expected, (p.id, a, b)
        assert annotator.judge(p, p.reference, r["correct"]) == "tie"  # both correct and concise
    lenient = SimulatedAnnotator(PreferenceRule(concision=0.0), noise=0.0)
    p = train[0]
    r = {x.kind: x.text for x in world.responses(p)}
    assert lenient.judge(p, r["correct"], r["verbose"]) == "tie"


@pytest.mark.parametrize("noise", [0.2, 0.5])
def test_measured_agreement_matches_ceiling(world: World, train: list[Prompt], noise: float) -> None:
    clean = PreferenceRule()
    agree = strict_total = strict_agree = total = 0
    for i, p in enumerate(train):
        responses = world.responses(p, seed=i)
        for j in range(10):
            a, b = responses[(i + j) % 6], responses[(i + 3 * j + 1) % 6]
            rule = clean.label(world.check(p, a.text), world.check(p, b.text))
            label = SimulatedAnnotator(noise=noise, seed=j).judge(p, a.text, b.text)
            assert label in LABELS
            total += 1
            agree += label == rule
            if rule in ("A", "B") and label in ("A", "B"):
                strict_total += 1
                strict_agree += label == rule
    for measured, n, kind in (
        (agree / total, total, "label"),
        (strict_agree / strict_total, strict_total, "pairwise"),
    ):
        expected = agreement_ceiling(noise, kind)
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(measured - expected) < 4 * sigma, (kind, measured, expected, n)
    assert agreement_ceiling(0.0) == agreement_ceiling(0.0, "pairwise") == 1.0
    assert agreement_ceiling(1.0) == 0.25 and agreement_ceiling(1.0, "pairwise") == 0.5


def test_preference_pairs(world: World, train: list[Prompt]) -> None:
    from glmwb.annotation.records import PreferenceRecord

    records = preference_pairs(world, train[:200], n_annotators=3, noise=0.0, seed=0, labels_per_pair=2)
    assert len(records) == 400
    assert records == preference_pairs(
        world, train[:200], n_annotators=3, noise=0.0, seed=0, labels_per_pair=2
    )
    labels = {r["provenance"]["label"] for r in records}
    assert {"A", "B", "tie", "both_bad"} <= labels
    rule = PreferenceRule()
    for i, r in enumerate(records):
        # the shared record type accepts it and gives the same dict back
        assert PreferenceRecord.from_dict(r, where=f"row {i}").to_dict() == r
        assert r["prompt"][-1]["role"] == "user" and isinstance(r["chosen"], str)
        prov = r["provenance"]
        assert r["tie"] == (prov["label"] in ("tie", "both_bad"))
        assert prov["source"] == "world" and len(prov["kinds"]) == 2 and prov["noise"] == 0.0
        ch, rj = prov["scores"]["chosen"], prov["scores"]["rejected"]
        assert set(ch) == {"correctness", "language", "concision"}
        for k in ch:  # attributes: the sign of the per-attribute difference
            assert r["attributes"][k] == (ch[k] > rj[k]) - (ch[k] < rj[k])
        u_chosen = rule.utility(Check(bool(ch["correctness"]), bool(ch["language"]), 0, 0, ch["concision"]))
        u_rejected = rule.utility(Check(bool(rj["correctness"]), bool(rj["language"]), 0, 0, rj["concision"]))
        if not r["tie"]:  # noise 0: the chosen answer is the better one by the rule
            assert u_chosen > u_rejected and prov["rule_choice"] == "chosen"
        else:
            assert prov["rule_choice"] == prov["label"]
    json.dumps(records, ensure_ascii=False)
    # per-annotator noise: a careless annotator disagrees with the rule more often
    mixed = preference_pairs(world, train, n_annotators=2, noise=[0.0, 0.8], seed=1)
    for name, lo, hi in (("sim-0", 1.0, 1.0), ("sim-1", 0.2, 0.6)):
        mine = [r for r in mixed if r["annotator"] == name]
        agree = sum(
            (r["provenance"]["rule_choice"] == "chosen")
            if not r["tie"]
            else r["provenance"]["rule_choice"] == r["provenance"]["label"]
            for r in mine
        )
        assert lo <= agree / len(mine) <= hi, (name, agree / len(mine))
    with pytest.raises(ValueError, match="noise has 1 values"):
        preference_pairs(world, train[:2], n_annotators=2, noise=[0.1])


def test_annotators_say_how_much_better(world: World, train: list[Prompt]) -> None:
    """Strength follows the utility gap: filler a slight loss, the other language a clear one, a wrong value a
    strong one; asking for it changes no label; the records' margin is the level's."""
    from glmwb.annotation.records import STRENGTH_MARGINS

    judge = SimulatedAnnotator(noise=0.0, seed=1)
    expected = {"verbose": "slight", "wrong_language": "clear", "wrong": "strong", "terse_other": "strong"}
    for prompt in train[:40]:
        forms = world.contrast_responses(prompt, seed=3)
        for kind, level in expected.items():
            assert judge.judge_with_strength(prompt, forms["correct"].text, forms[kind].text) == ("A", level)
            assert judge.judge_with_strength(prompt, forms[kind].text, forms["correct"].text) == ("B", level)
        assert judge.judge_with_strength(prompt, forms["wrong"].text, forms["verbose_wrong"].text)[1] is None
    noisy = SimulatedAnnotator(noise=0.5, seed=2)
    texts = [(p, *(r.text for r in world.responses(p, seed=5)[:2])) for p in train[:200]]
    judged = [noisy.judge_with_strength(*t) for t in texts]
    assert [noisy.judge(*t) for t in texts] == [label for label, _ in judged]
    assert all((level is None) == (label in ("tie", "both_bad")) for label, level in judged)
    kw = {"n_annotators": 3, "noise": 0.1, "seed": 4, "contrastive": 0.5}
    plain = preference_pairs(world, train[:300], **kw)
    graded = preference_pairs(world, train[:300], strength=True, **kw)
    assert [r["provenance"]["label"] for r in plain] == [r["provenance"]["label"] for r in graded]
    assert all(r["margin"] is None and "strength" not in r["provenance"] for r in plain)
    for r in graded:
        level = r["provenance"].get("strength")
        assert (level is None) == r["tie"]
        assert r["margin"] == (None if level is None else STRENGTH_MARGINS[level])
    assert {r["provenance"].get("strength") for r in graded} == {
        None,
        "negligible",
        "slight",
        "clear",
        "strong",
    }


def test_contrastive_pairs_differ_in_one_thing(world: World, train: list[Prompt]) -> None:
    plain = preference_pairs(world, train[:100], n_annotators=3, noise=0.0, seed=2)
    assert plain == preference_pairs(world, train[:100], n_annotators=3, noise=0.0, seed=2, contrastive=0.0)
    records = preference_pairs(world, train[:300], n_annotators=3, noise=0.0, seed=2, contrastive=1.0)
    kinds = Counter(tuple(sorted(r["provenance"]["kinds"])) for r in records)
    assert set(kinds) == {("correct", "wrong"), ("correct", "verbose")}
    assert kinds["correct", "wrong"] > kinds["correct", "verbose"] > 50  # about 2 : 1
    for r in records:
        short, other = sorted((r["chosen"], r["rejected"]), key=len)
        if "verbose" in r["provenance"]["kinds"]:
            assert short in other  # the same sentence, wrapped in filler
        else:  # the same sentence with another value: equal once the values are taken out
            a, b = (re.sub(r"\d+|[A-Za-z]+|[\u4e00-\u9fff]+", "#", x) for x in (r["chosen"], r["rejected"]))
            assert a.count("#") == b.count("#")
        assert (
            r["provenance"]["rule_choice"] == "chosen"
            and r["chosen"] == short
            or "wrong" in r["provenance"]["kinds"]
        )
    with pytest.raises(ValueError, match="contrastive"):
        preference_pairs(world, train[:2], contrastive=1.5)


def test_contrast_kinds_choose_the_minimal_pairs(world: World, train: list[Prompt]) -> None:
    kinds = ("correct>wrong", "correct>verbose", "verbose>wrong")
    records = preference_pairs(
        world, train[:300], 3, noise=0.0, seed=2, contrastive=1.0, contrast_kinds=kinds
    )
    seen = Counter(
        tuple(r["provenance"]["kinds"]) for r in records if r["provenance"]["rule_choice"] == "chosen"
    )
    # noise-free labels: the better answer of every minimal pair is chosen, each kind about a third of the time
    assert len(records) == 300 and set(seen) == {
        ("correct", "wrong"),
        ("correct", "verbose"),
        ("verbose", "wrong"),
    }
    assert min(seen.values()) > 70 and sum(seen.values()) == 300
    filler_over_wrong = [r for r in records if r["provenance"]["kinds"] == ["verbose", "wrong"]]
    assert all(r["provenance"]["scores"]["chosen"]["correctness"] == 1.0 for r in filler_over_wrong)
    for bad in ("correct>correct", "correct>refusal", "correct", "a>b>c", "verbose>verbose_right"):
        with pytest.raises(ValueError, match="contrast_kinds.*minimal-pair kinds"):
            preference_pairs(world, train[:2], contrastive=0.5, contrast_kinds=[bad])


def test_counterfactual_kinds_break_the_filler_and_language_shortcuts(
    world: World, train: list[Prompt]
) -> None:
    # the default minimal pairs stay the original two kinds
    old = preference_pairs(world, train[:50], 3, noise=0.0, seed=4, contrastive=1.0)
    assert {tuple(sorted(r["provenance"]["kinds"])) for r in old} == {
        ("correct", "wrong"),
        ("correct", "verbose"),
    }
    kinds = (
        "correct>verbose_wrong",
        "verbose>verbose_wrong",
        "wrong>verbose_wrong",
        "wrong_language>wrong_language_wrong",
    )
    records = preference_pairs(
        world, train[:400], 3, noise=0.0, seed=2, contrastive=1.0, contrast_kinds=kinds
    )
    by_kinds: dict[frozenset, Counter] = {}
    for r in records:
        by_kinds.setdefault(frozenset(r["provenance"]["kinds"]), Counter())[
            (
                r["provenance"]["kinds"][0]
                if r["provenance"]["rule_choice"] == "chosen"
                else r["provenance"]["rule_choice"]
            )
        ] += 1
    # noise-free labels: the right value wins whatever wraps it; two wrong answers are "both bad" (a tie)
    assert by_kinds == {
        frozenset({"correct", "verbose_wrong"}): Counter(
            correct=by_kinds[frozenset({"correct", "verbose_wrong"})]["correct"]
        ),
        frozenset({"verbose", "verbose_wrong"}): Counter(
            verbose=by_kinds[frozenset({"verbose", "verbose_wrong"})]["verbose"]
        ),
        frozenset({"wrong", "verbose_wrong"}): Counter(
            both_bad=by_kinds[frozenset({"wrong", "verbose_wrong"})]["both_bad"]
        ),
        frozenset({"wrong_language", "wrong_language_wrong"}): Counter(
            wrong_language=by_kinds[frozenset({"wrong_language", "wrong_language_wrong"})]["wrong_language"]
        ),
    }
    assert min(sum(c.values()) for c in by_kinds.values()) > 70
    assert all(r["tie"] for r in records if r["provenance"]["rule_choice"] == "both_bad")
    every = contrast_pairs(["all"])
    assert len(every) == len(set(every)) == 55 and ("correct", "other_subject") in every
    shown = preference_pairs(
        world, train[:600], 3, noise=0.0, seed=2, contrastive=1.0, contrast_kinds=["all"]
    )
    assert len({frozenset(r["provenance"]["kinds"]) for r in shown}) == 55
