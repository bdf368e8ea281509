"""Checking answers: numbers and answer words in both languages, language detection, and whether an answer is
on topic."""

from __future__ import annotations

import pytest

from glmwb.pretrain.world import Prompt, World, on_topic
from glmwb.pretrain.world.checking import detect_language, find_numbers
from glmwb.pretrain.world.tables import VOCAB


def _number_prompt(world: World, lang: str = "en", gold: str = "42") -> Prompt:
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
    world: World, text: str, correct: bool, right_language: bool
) -> None:
    c = world.check(_number_prompt(world, "en"), text)
    assert (c.correct, c.right_language) == (correct, right_language)
    zh = world.check(_number_prompt(world, "zh"), text)
    assert zh.correct == correct


def test_find_numbers() -> None:
    assert [v for _, v, _ in find_numbers("1,200 m and -3 and 7-5 and 2.5")] == [1200, -3, 7, 5, 2.5]
    assert [v for _, v, _ in find_numbers("一百零五，三十四，十二，两千，三万")] == [105, 34, 12, 2000, 30000]
    assert [v for _, v, _ in find_numbers("5千米等于5000米，十分感谢，一个")] == [5, 5000]


def test_checker_parses_words_in_both_languages(world: World, train: list[Prompt]) -> None:
    colour = next(p for p in train if p.answer_type == "colour" and p.lang == "en")
    en, zh, _ = VOCAB["colour"][colour.gold]
    other_en, other_zh, _ = next(v for k, v in VOCAB["colour"].items() if k != colour.gold)
    assert world.check(colour, f"{en.upper()}!").correct
    assert (
        world.check(colour, f"它喜欢{zh}。").correct
        and not world.check(colour, f"它喜欢{zh}。").right_language
    )
    assert not world.check(colour, f"Not {en}, it is {other_en}.").correct  # the final answer counts
    assert world.check(colour, f"Not {other_en}: {en}.").correct
    assert not world.check(colour, f"{other_zh}").correct
    city = next(p for p in train if p.answer_type == "city" and p.lang == "zh")
    entity = world.by_name[world.item_of(city).value]
    assert world.check(city, f"住在{entity.name_zh}。").correct and world.check(city, entity.name_en).correct
    assert not world.check(city, entity.name_en.lower() + "x").correct  # whole words only


def test_detect_language() -> None:
    assert detect_language("佐文喜欢红色。") == "zh"
    assert detect_language("Zorven likes red.") == "en"
    assert detect_language("[gMASK]<sop><|user|>\n你好<|assistant|>\n你好") == "zh"
    assert detect_language("42.") is None


def test_on_topic_answers_the_question_asked(world: World, train: list[Prompt]) -> None:
    for p in train[:200]:
        responses = world.responses(p, seed=1)
        kinds = {r.kind: world.on_topic(p, r.text) for r in responses}
        # right or wrong, in any language, an answer about the asked subject is on topic; a fact answer
        # must name its subject ("Blue." is not grounded)
        for r in responses[:4]:
            if p.family == "fact":
                subject = world.by_name[p.key.split(":")[1]]
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
    assert on_topic(add, f"The answer is {a + b}.") == world.on_topic(add, f"The answer is {a + b}.") is True
