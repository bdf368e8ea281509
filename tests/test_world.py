"""The embedded default world: determinism, the train / held-out split, the checker, simulated annotators."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter

import pytest

from glmwb.pretrain import world as W
from glmwb.pretrain.world import (
    KINDS,
    LABELS,
    PreferenceRule,
    Prompt,
    SimulatedAnnotator,
    agreement_ceiling,
    check,
    detect_language,
    find_numbers,
    make_world,
    preference_pairs,
)

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def world() -> W.World:
    return make_world(seed=0)


@pytest.fixture(scope="module")
def train(world: W.World) -> list[Prompt]:
    return world.prompts("train", 600, seed=0)


@pytest.fixture(scope="module")
def heldout(world: W.World) -> list[Prompt]:
    return world.prompts("heldout", 300, seed=0)


def _number_prompt(world: W.World, lang: str = "en", gold: str = "42") -> Prompt:
    return Prompt(
        id=f"test/{lang}",
        messages=[{"role": "user", "content": "What is 40 + 2?"}],
        lang=lang,
        family="arithmetic",
        gold=gold,
        reference="40 + 2 = 42." if lang == "en" else "40加2等于42。",
        key="add:40:2",
        answer_type="number",
        world_key=(world.seed, world.num_entities),
    )


# -- the world itself ----------------------------------------------------------------------------------------


def test_determinism_by_seed(world: W.World) -> None:
    again = make_world(seed=0)
    assert again.to_dict() == world.to_dict()
    assert again.corpus(300, seed=1) == world.corpus(300, seed=1)
    assert [p.to_dict() for p in again.prompts("train", 50, seed=3)] == [
        p.to_dict() for p in world.prompts("train", 50, seed=3)
    ]
    p = world.prompts("heldout", 1)[0]
    assert again.responses(p, seed=5) == world.responses(p, seed=5)

    other = make_world(seed=1)
    assert [e.name_en for e in other.entities] != [e.name_en for e in world.entities]
    assert other.corpus(300, seed=1) != world.corpus(300, seed=1)
    assert world.corpus(300, seed=2) != world.corpus(300, seed=1)
    assert [p.id for p in other.prompts("train", 50)] != [p.id for p in world.prompts("train", 50)]
    json.dumps(world.to_dict(), ensure_ascii=False)  # JSON-able
    assert W.World.from_dict(json.loads(json.dumps(world.to_dict()))).to_dict() == world.to_dict()


def test_entities_are_bilingual_and_names_cannot_be_answers(world: W.World) -> None:
    kinds = {e.kind for e in world.entities}
    assert kinds == {"country", "city", "person", "creature"}
    assert len([e for e in world.entities if e.kind != "country"]) == 96
    assert (
        len({e.name_en for e in world.entities})
        == len({e.name_zh for e in world.entities})
        == len(world.entities)
    )
    assert all(CJK.fullmatch(ch) for e in world.entities for ch in e.name_zh)
    # No name character is a numeral, operator, unit or part of an answer word.
    name_chars = {z for _, z in W.SYLLABLES} | {z for _, z in W.CITY_SUFFIXES} | {"亚", "兽"}
    forbidden = set("零〇一二两三四五六七八九十百千万加减乘以等于") | set(
        "".join(u[3] for u in W.UNITS.values())
    )
    forbidden |= {ch for table in W.VOCAB.values() for _, zh, _ in table.values() for ch in zh}
    assert not name_chars & forbidden
    with pytest.raises(ValueError):
        make_world(num_entities=5)


def test_train_and_heldout_are_disjoint(world: W.World, train: list[Prompt], heldout: list[Prompt]) -> None:
    train_keys = {(p.family, p.key) for p in train}
    heldout_keys = {(p.family, p.key) for p in heldout}
    assert train_keys and heldout_keys and not train_keys & heldout_keys
    # The full pools, not only these samples, are disjoint; every family has held-out instances.
    for family in W.FAMILIES:
        pool_train = {it.key for it in world._split["train"][family]}
        pool_heldout = {it.key for it in world._split["heldout"][family]}
        assert pool_heldout and not pool_train & pool_heldout
        assert 0.1 < len(pool_heldout) / (len(pool_train) + len(pool_heldout)) < 0.3
    assert {p.family for p in heldout} == set(W.FAMILIES) and {p.lang for p in heldout} == {"en", "zh"}
    assert all(not p.id.endswith("/t3") for p in train)  # the fourth phrasing is held out
    assert any(p.id.endswith("/t3") for p in heldout)
    assert len({p.id for p in train}) == len(train)  # distinct prompts
    with pytest.raises(ValueError, match="distinct"):
        make_world(seed=0, num_entities=12, max_operand=3).prompts("heldout", 10_000)


def test_dev_and_test_halve_heldout(world: W.World) -> None:
    for family in W.FAMILIES:
        dev = {it.key for it in world._split["dev"][family]}
        test = {it.key for it in world._split["test"][family]}
        assert dev and test and not dev & test
        assert dev | test == {it.key for it in world._split["heldout"][family]}
    dev_prompts, test_prompts = world.prompts("dev", 300, seed=0), world.prompts("test", 300, seed=0)
    assert not {p.key for p in dev_prompts} & {p.key for p in test_prompts}
    assert all(not p.id.endswith("/t3") for p in dev_prompts)  # the fourth phrasing: evaluation only
    assert any(p.id.endswith("/t3") for p in test_prompts)
    with pytest.raises(ValueError, match="'dev', 'test'"):
        world.prompts("validation", 10)
    # RL prompts may ask dev instances all four ways; the instances stay dev's, the default stream unchanged
    dev4 = world.prompts("dev", 300, seed=0, phrasings=4)
    dev_pool = {it.key for f in W.FAMILIES for it in world._split["dev"][f]}
    assert any(p.id.endswith("/t3") for p in dev4) and {p.key for p in dev4} <= dev_pool
    assert not {p.key for p in dev4} & {p.key for p in test_prompts}
    assert [p.id for p in world.prompts("dev", 300, seed=0, phrasings=3)] == [p.id for p in dev_prompts]
    assert all(p.id.endswith("/t0") for p in world.prompts("dev", 20, seed=0, phrasings=1))
    with pytest.raises(ValueError, match="phrasings must be 1 to 4"):
        world.prompts("dev", 10, phrasings=5)


def test_on_topic_answers_the_question_asked(world: W.World, train: list[Prompt]) -> None:
    for p in train[:200]:
        responses = world.responses(p, seed=1)
        kinds = {r.kind: world.on_topic(p, r.text) for r in responses}
        # right or wrong, in any language, an answer about the asked subject is on topic; a fact answer
        # must name its subject ("Blue." is not grounded)
        for r in responses[:4]:
            if p.family == "fact":
                subject = world._by_name[p.key.split(":")[1]]
                named = subject.name_zh in r.text or subject.name_en in r.text
                assert kinds[r.kind] == named, (p.id, r.kind)
            else:
                assert kinds[r.kind], (p.id, r.kind)
        assert not kinds["refusal"] and not kinds["off_topic"]
    fact = next(p for p in train if p.family == "fact" and p.key.endswith(":colour") and p.lang == "en")
    subject, other = (
        fact.key.split(":")[1],
        next(e.name_en for e in world.entities if e.kind == "person" and e.name_en != fact.key.split(":")[1]),
    )
    assert world.on_topic(fact, f"{subject} likes red.") and world.on_topic(
        fact, f"{subject} likes {fact.gold}."
    )
    assert not world.on_topic(fact, f"{other} likes {fact.gold}.")  # right value, wrong subject
    assert not world.on_topic(fact, f"{subject} is 67 years old.")  # no answer of the asked type
    assert not world.on_topic(fact, f"{fact.gold[:1].upper()}{fact.gold[1:]}.")  # the subject unnamed
    add = next(p for p in train if p.key.startswith("add:") and p.lang == "en")
    a, b = (int(x) for x in add.key.split(":")[1:])
    assert world.on_topic(add, f"{a} + {b} = {a + b}.") and world.on_topic(add, f"{a} + {b} = {a + b + 1}.")
    assert not world.on_topic(add, f"{a + 1} + {b} = {a + b + 1}.")  # restates another question
    assert (
        W.on_topic(add, f"The answer is {a + b}.") == world.on_topic(add, f"The answer is {a + b}.") is True
    )


def test_corpus_chats_never_ask_heldout_questions(world: W.World, heldout: list[Prompt]) -> None:
    docs = world.corpus(3000, seed=0)
    asked = set(
        re.findall(r"<\|user\|>\n(.*?)<\|assistant\|>", "".join(d for d in docs if d.startswith("[gMASK]")))
    )
    assert len(asked) > 500
    assert not asked & {p.messages[-1]["content"] for p in heldout}
    train = world.prompts("train", 2000, seed=1)
    assert asked & {p.messages[-1]["content"] for p in train}  # ...while train questions do occur


def test_corpus_size_speed_languages_and_format(world: W.World) -> None:
    start = time.perf_counter()
    docs = world.corpus(20000, seed=0)
    seconds = time.perf_counter() - start
    chars = sum(map(len, docs))
    assert seconds < 5.0, seconds
    assert 1_000_000 <= chars <= 3_000_000, chars
    cjk_docs = sum(bool(CJK.search(d)) for d in docs)
    assert 0.45 < cjk_docs / len(docs) < 0.55
    for d in docs[:2000]:
        # A document is English or Chinese, not a mixture (a chat's wrong-language answers aside).
        text = "".join(re.findall(r"<\|user\|>\n([^<]*)", d)) if d.startswith("[gMASK]") else d
        cjk, latin = len(CJK.findall(text)), len(re.findall(r"[A-Za-z]", text))
        assert (cjk == 0) or (cjk > latin), d
    chats = [d for d in docs if "<|assistant|>" in d]
    assert 0.3 < len(chats) / len(docs) < 0.55
    for d in chats[:500]:
        assert d.startswith("[gMASK]<sop>") and d.count("[gMASK]") == 1
        assert re.fullmatch(
            r"\[gMASK\]<sop>(<\|system\|>\n[^\n<]+)?(<\|user\|>\n[^<]+<\|assistant\|>\n[^<]+)+", d
        ), d
        assert not d.endswith("\n") and "<|endoftext|>" not in d


# -- responses and the checker ----------------------------------------------------------------------------


def test_responses_check_as_labelled(world: W.World, train: list[Prompt], heldout: list[Prompt]) -> None:
    for p in train[:300] + heldout[:100]:
        responses = world.responses(p, seed=7)
        assert [r.kind for r in responses] == list(KINDS)
        checks = {r.kind: world.check(p, r.text) for r in responses}
        assert (
            checks["correct"].correct and checks["correct"].right_language and checks["correct"].score == 1.0
        )
        assert (
            checks["verbose"].correct
            and checks["verbose"].right_language
            and checks["verbose"].concision <= 0.6
        )
        assert not checks["wrong"].correct and checks["wrong"].right_language
        assert checks["wrong_language"].correct and not checks["wrong_language"].right_language
        assert not checks["refusal"].correct and not checks["off_topic"].correct
        assert (
            checks["correct"].score
            > checks["verbose"].score
            > checks["wrong_language"].score
            > checks["wrong"].score
        )
        assert all(0.0 <= c.score <= 1.0 for c in checks.values())
        assert world.check(p, p.reference).score == 1.0
        assert check(p, responses[0].text) == checks["correct"]  # the world-free checker agrees


@pytest.mark.parametrize(
    ("text", "correct", "right_language"),
    [
        ("答案是42。", True, False),
        ("The answer is 42.", True, True),
        ("40 + 2 = 42", True, True),
        ("42", True, True),
        ("The answer is ４２.", True, True),
        ("I think it is 41, no wait, 42.", True, True),
        ("42, or maybe 43.", False, True),
        ("40 + 2 = 420", False, True),
        ("It is 42.0", True, True),
        ("答案是四十二。", True, False),
        ("这是一个好问题，答案是42，希望这一点对你有帮助。", True, False),
        ("", False, True),
        ("I don't know.", False, True),
    ],
)
def test_checker_parses_numbers_in_both_languages(
    world: W.World, text: str, correct: bool, right_language: bool
) -> None:
    c = world.check(_number_prompt(world, "en"), text)
    assert (c.correct, c.right_language) == (correct, right_language)
    zh = world.check(_number_prompt(world, "zh"), text)
    assert zh.correct == correct


def test_find_numbers() -> None:
    assert [v for _, v, _ in find_numbers("1,200 m and -3 and 7-5 and 2.5")] == [1200, -3, 7, 5, 2.5]
    assert [v for _, v, _ in find_numbers("一百零五，三十四，十二，两千，三万")] == [105, 34, 12, 2000, 30000]
    assert [v for _, v, _ in find_numbers("5千米等于5000米，十分感谢，一个")] == [5, 5000]


def test_checker_parses_words_in_both_languages(world: W.World, train: list[Prompt]) -> None:
    colour = next(p for p in train if p.answer_type == "colour" and p.lang == "en")
    en, zh, _ = W.VOCAB["colour"][colour.gold]
    other_en, other_zh, _ = next(v for k, v in W.VOCAB["colour"].items() if k != colour.gold)
    assert world.check(colour, f"{en.upper()}!").correct
    assert (
        world.check(colour, f"它喜欢{zh}。").correct
        and not world.check(colour, f"它喜欢{zh}。").right_language
    )
    assert not world.check(colour, f"Not {en}, it is {other_en}.").correct  # the final answer counts
    assert world.check(colour, f"Not {other_en}: {en}.").correct
    assert not world.check(colour, f"{other_zh}").correct
    city = next(p for p in train if p.answer_type == "city" and p.lang == "zh")
    entity = world._by_name[world._item(city).value]
    assert world.check(city, f"住在{entity.name_zh}。").correct and world.check(city, entity.name_en).correct
    assert not world.check(city, entity.name_en.lower() + "x").correct  # whole words only


def test_detect_language() -> None:
    assert detect_language("佐文喜欢红色。") == "zh"
    assert detect_language("Zorven likes red.") == "en"
    assert detect_language("[gMASK]<sop><|user|>\n你好<|assistant|>\n你好") == "zh"
    assert detect_language("42.") is None


# -- simulated annotators ----------------------------------------------------------------------------------


def test_annotator_without_noise_follows_the_rule(world: W.World, train: list[Prompt]) -> None:
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
def test_measured_agreement_matches_ceiling(world: W.World, train: list[Prompt], noise: float) -> None:
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


def test_preference_pairs(world: W.World, train: list[Prompt]) -> None:
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
        u_chosen = rule.utility(W.Check(bool(ch["correctness"]), bool(ch["language"]), 0, 0, ch["concision"]))
        u_rejected = rule.utility(
            W.Check(bool(rj["correctness"]), bool(rj["language"]), 0, 0, rj["concision"])
        )
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


def test_annotators_say_how_much_better(world: W.World, train: list[Prompt]) -> None:
    """Strength follows the utility gap: filler a slight loss, the other language a clear one, a wrong value a
    strong one; asking for it changes no label; the records' margin is the level's."""
    from glmwb.annotation.records import STRENGTH_MARGINS

    judge = W.SimulatedAnnotator(noise=0.0, seed=1)
    expected = {"verbose": "slight", "wrong_language": "clear", "wrong": "strong", "terse_other": "strong"}
    for prompt in train[:40]:
        forms = world.contrast_responses(prompt, seed=3)
        for kind, level in expected.items():
            assert judge.judge_with_strength(prompt, forms["correct"].text, forms[kind].text) == ("A", level)
            assert judge.judge_with_strength(prompt, forms[kind].text, forms["correct"].text) == ("B", level)
        assert judge.judge_with_strength(prompt, forms["wrong"].text, forms["verbose_wrong"].text)[1] is None
    noisy = W.SimulatedAnnotator(noise=0.5, seed=2)
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


def test_contrastive_pairs_differ_in_one_thing(world: W.World, train: list[Prompt]) -> None:
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


def test_contrast_kinds_choose_the_minimal_pairs(world: W.World, train: list[Prompt]) -> None:
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
    world: W.World, train: list[Prompt]
) -> None:
    checked = 0
    for prompt in train[:60]:
        r = world.contrast_responses(prompt, seed=5)
        correct, wrong = r["correct"].text, r["wrong"].text
        # filler and the other language wrap the wrong value exactly as they wrap the right one
        assert r["verbose_wrong"].text == r["verbose"].text.replace(correct, wrong)
        assert correct in r["verbose"].text and wrong in r["verbose_wrong"].text
        checks = {k: world.check(prompt, v.text) for k, v in r.items()}
        assert [k for k, c in checks.items() if c.correct] == [
            "correct",
            "verbose",
            "wrong_language",
            "terse",
        ]
        # the bare value, right and wrong: as concise as it gets, right language (numbers have none)
        assert r["terse"].text.rstrip(".。").lower() in correct.lower()
        assert r["terse_wrong"].text.rstrip(".。").lower() in wrong.lower()
        assert checks["terse"].score == 1.0 and checks["terse_wrong"].right_language
        # another subject's own true sentence: wrong here, and never a held-out fact
        other = r["other_subject"].text
        assert other != correct and not checks["other_subject"].correct
        if prompt.family == "fact":
            spec = world._item(prompt).spec
            about = [
                it
                for it in world._items["fact"]
                if it.spec == spec and world._by_name[dict(it.slots)["n"]].name(prompt.lang) in other
            ]
            assert about and not any(world.is_heldout(it) for it in about), (other, about)
            assert any(world._fill("{v}", it, prompt.lang) in other for it in about)  # its own value
        # a true sentence about the same subject that answers another question, and that value alone: wrong
        assert not checks["other_attribute"].correct and not checks["terse_other"].correct
        item = world._item(prompt)
        other_items = [
            it for it in world._items[prompt.family] if it.slots == item.slots and it.spec != item.spec
        ]
        if prompt.family == "fact" and any(not world.is_heldout(it) for it in other_items):
            name = world._by_name[dict(item.slots)["n"]].name(prompt.lang)
            assert name in r["other_attribute"].text and r["other_attribute"].text != correct
            told = [
                it for it in other_items if world._fill("{v}", it, prompt.lang) in r["other_attribute"].text
            ]
            assert told and not any(world.is_heldout(it) for it in told), r["other_attribute"].text
            assert r["terse_other"].text.rstrip(".。").lower() in r["other_attribute"].text.lower()
            checked += 1
        assert (
            not checks["wrong_language"].right_language and not checks["wrong_language_wrong"].right_language
        )
        assert checks["wrong_language"].answer != checks["wrong_language_wrong"].answer
    assert checked > 10  # most facts' subjects have another training-split fact
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
    every = W.contrast_pairs(["all"])
    assert len(every) == len(set(every)) == 55 and ("correct", "other_subject") in every
    shown = preference_pairs(
        world, train[:600], 3, noise=0.0, seed=2, contrastive=1.0, contrast_kinds=["all"]
    )
    assert len({frozenset(r["provenance"]["kinds"]) for r in shown}) == 55


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_writes_files(tmp_path, capsys) -> None:
    argv = f"--out {tmp_path} --seed 3 --num-docs 300 --num-train 60 --num-heldout 20".split()
    assert W.main(argv) == 0
    corpus = [
        json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(corpus) == 300 and all(set(d) == {"text"} for d in corpus)
    assert corpus[0]["text"] == make_world(3).corpus(300, seed=3)[0]
    for split, n in (("train", 60), ("heldout", 20)):
        rows = (tmp_path / f"prompts_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        prompts = [Prompt.from_dict(json.loads(line)) for line in rows]
        assert len(prompts) == n and prompts == make_world(3).prompts(split, n, seed=3)
    out = capsys.readouterr().out
    assert "corpus: 300 docs" in out and "prompts_heldout: 20" in out and "fact/zh" in out
