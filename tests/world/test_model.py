"""The world itself: determinism by seed, entities and names, the train / held-out and dev / test splits."""

from __future__ import annotations

import json
import re

import pytest

from glmwb.pretrain.world import Prompt, World, make_world
from glmwb.pretrain.world.tables import CITY_SUFFIXES, FAMILIES, SYLLABLES, UNITS, VOCAB

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_determinism_by_seed(world: World) -> None:
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
    assert World.from_dict(json.loads(json.dumps(world.to_dict()))).to_dict() == world.to_dict()
    # a prompt names its question instance; one from another world is refused by name
    p = world.prompts("train", 1, seed=0)[0]
    assert world.item_of(p).key == p.key and world.item_of(p).family == p.family
    foreign = next(q for q in make_world(seed=1).prompts("train", 50) if q.family == "fact")
    with pytest.raises(KeyError, match="not from this world"):
        world.item_of(foreign)


def test_entities_are_bilingual_and_names_cannot_be_answers(world: World) -> None:
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
    name_chars = {z for _, z in SYLLABLES} | {z for _, z in CITY_SUFFIXES} | {"亚", "兽"}
    forbidden = set("零〇一二两三四五六七八九十百千万加减乘以等于") | set(
        "".join(u[3] for u in UNITS.values())
    )
    forbidden |= {ch for table in VOCAB.values() for _, zh, _ in table.values() for ch in zh}
    assert not name_chars & forbidden
    with pytest.raises(ValueError):
        make_world(num_entities=5)


def test_train_and_heldout_are_disjoint(world: World, train: list[Prompt], heldout: list[Prompt]) -> None:
    train_keys = {(p.family, p.key) for p in train}
    heldout_keys = {(p.family, p.key) for p in heldout}
    assert train_keys and heldout_keys and not train_keys & heldout_keys
    # The full pools, not only these samples, are disjoint; every family has held-out instances.
    for family in FAMILIES:
        pool_train = {it.key for it in world.splits["train"][family]}
        pool_heldout = {it.key for it in world.splits["heldout"][family]}
        assert pool_heldout and not pool_train & pool_heldout
        assert 0.1 < len(pool_heldout) / (len(pool_train) + len(pool_heldout)) < 0.3
    assert {p.family for p in heldout} == set(FAMILIES) and {p.lang for p in heldout} == {"en", "zh"}
    assert all(not p.id.endswith("/t3") for p in train)  # the fourth phrasing is held out
    assert any(p.id.endswith("/t3") for p in heldout)
    assert len({p.id for p in train}) == len(train)  # distinct prompts
    with pytest.raises(ValueError, match="distinct"):
        make_world(seed=0, num_entities=12, max_operand=3).prompts("heldout", 10_000)


def test_dev_and_test_halve_heldout(world: World) -> None:
    for family in FAMILIES:
        dev = {it.key for it in world.splits["dev"][family]}
        test = {it.key for it in world.splits["test"][family]}
        assert dev and test and not dev & test
        assert dev | test == {it.key for it in world.splits["heldout"][family]}
    dev_prompts, test_prompts = world.prompts("dev", 300, seed=0), world.prompts("test", 300, seed=0)
    assert not {p.key for p in dev_prompts} & {p.key for p in test_prompts}
    assert all(not p.id.endswith("/t3") for p in dev_prompts)  # the fourth phrasing: evaluation only
    assert any(p.id.endswith("/t3") for p in test_prompts)
    with pytest.raises(ValueError, match="'dev', 'test'"):
        world.prompts("validation", 10)
    # RL prompts may ask dev instances all four ways; the instances stay dev's, the default stream unchanged
    dev4 = world.prompts("dev", 300, seed=0, phrasings=4)
    dev_pool = {it.key for f in FAMILIES for it in world.splits["dev"][f]}
    assert any(p.id.endswith("/t3") for p in dev4) and {p.key for p in dev4} <= dev_pool
    assert not {p.key for p in dev4} & {p.key for p in test_prompts}
    assert [p.id for p in world.prompts("dev", 300, seed=0, phrasings=3)] == [p.id for p in dev_prompts]
    assert all(p.id.endswith("/t0") for p in world.prompts("dev", 20, seed=0, phrasings=1))
    with pytest.raises(ValueError, match="phrasings must be 1 to 4"):
        world.prompts("dev", 10, phrasings=5)
