"""The pretraining corpus: encyclopedic paragraphs, worked sums and conversions, and imperfect chats.

``make_corpus(world, num_docs, seed)`` (``World.corpus``): each document is English or Chinese with
probability 1/2 and is
  - 35 % an encyclopedic paragraph: one entity's attributes in shuffled sentences and varied phrasing
    (city pages also list residents; one in ten is a country page listing its cities),
  - 15 % worked arithmetic (3-6 equations), 8 % worked unit conversions (2-4, with the factor),
  - 42 % a chat in GLM-4 markup, ``[gMASK]<sop>[<|system|>\\n...]<|user|>\\n{q}<|assistant|>\\n{a}``
    with 1-3 turns (no newline after content; documents are joined with ``<|endoftext|>`` later, by the
    data pipeline). Chats use train instances and phrasings only, and their answers are deliberately not
    all good (``CHAT_MIX``: 75 % correct, 12 % verbose, 8 % wrong language, 5 % wrong value), so that the
    base model has habits that SFT, DPO and PPO can measurably remove.
``make_corpus(world, 20000)`` is about 2.0 M characters (about 1 M tokens for a 4k BPE) and takes about
half a second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from glmwb.pretrain.world.phrasings import FILLER, INTRO, SYSTEM
from glmwb.pretrain.world.responses import other_language_answer
from glmwb.pretrain.world.seeding import seeded_rng, weighted_choice
from glmwb.pretrain.world.tables import CONVERSIONS, LANGS, UNITS, unit_name

if TYPE_CHECKING:
    from glmwb.pretrain.world.model import World

# How good the corpus's chat answers are: kind -> probability (``World.chat_mix`` defaults to it).
CHAT_MIX = {"correct": 0.75, "verbose": 0.12, "wrong_language": 0.08, "wrong": 0.05}


CORPUS_MIX = {"entity": 0.35, "arithmetic": 0.15, "conversion": 0.08, "chat": 0.42}


def make_corpus(
    world: World, num_docs: int = 20000, seed: int = 0, mix: dict[str, float] | None = None
) -> list[str]:
    """Pretraining documents (see the module docstring for the mix; ``mix``: other weights of the same
    kinds, e.g. a curriculum's later, task-shaped stage); deterministic in (world, seed, mix)."""
    rng = seeded_rng(world.seed, "corpus", seed)
    kinds = dict(mix) if mix is not None else CORPUS_MIX
    make = {"entity": _entity_doc, "arithmetic": _arith_doc, "conversion": _conv_doc, "chat": _chat_doc}
    return [make[weighted_choice(rng, kinds)](world, rng, rng.choice(LANGS)) for _ in range(num_docs)]


def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """GLM-4 chat markup: ``[gMASK]<sop>`` once, then ``<|role|>\\n{content}`` per turn, no final newline."""
    return "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)


def _join(names: Sequence[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(names[:-1]) + "和" + names[-1] if len(names) > 1 else names[0]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _entity_doc(world: World, rng: random.Random, lang: str) -> str:
    countries = world.of_kind["country"]
    if rng.random() < 0.1:  # a country page
        country = rng.choice(countries)
        cities = [c.name(lang) for c in world.cities_of[country.name_en]]
        if lang == "en":
            return (
                f"{country.name_en} is a country. Its cities are {_join(cities, lang)}."
                if cities
                else f"{country.name_en} is a country."
            )
        return (
            f"{country.name_zh}是一个国家，它的城市有{_join(cities, lang)}。"
            if cities
            else f"{country.name_zh}是一个国家。"
        )
    e = rng.choice(world.described)
    items = rng.sample(world.facts_about[e.name_en], len(world.facts_about[e.name_en]))
    country = world.by_name[e.attrs["country"]].name(lang) if e.kind == "city" else ""
    sentences = [rng.choice(INTRO[e.kind][lang]).format(n=e.name(lang), country=country)]
    sentences += [world.fill(rng.choice(world.phrasings(it)["say"][lang][:2]), it, lang) for it in items]
    if e.kind == "city":
        residents = [x.name(lang) for x in world.residents[e.name_en]]
        if residents:
            picked = rng.sample(residents, min(3, len(residents)))
            sentences.append(
                f"{_join(picked, lang)} live in {e.name_en}."
                if lang == "en"
                else f"住在{e.name_zh}的有{_join(picked, lang)}。"
            )
    return (" " if lang == "en" else "").join(sentences)


def _arith_doc(world: World, rng: random.Random, lang: str) -> str:
    items = world.items["arithmetic"]
    head = rng.choice(
        ["Arithmetic practice:", "Some sums:", "Worked examples:"]
        if lang == "en"
        else ["算术练习：", "做几道算术题：", "例题："]
    )
    lines = []
    for _ in range(rng.randint(3, 6)):
        it = rng.choice(items)
        template = rng.choice(
            ["{a} {sym} {b} = {v}.", "{a} {word} {b} equals {v}."]
            if lang == "en"
            else ["{a}{word}{b}等于{v}。", "{a}{word}{b}得{v}。"]
        )
        lines.append(world.fill(template, it, lang))
    return head + "\n" + "\n".join(lines)


def _conv_doc(world: World, rng: random.Random, lang: str) -> str:
    lines = []
    for _ in range(rng.randint(2, 4)):
        it = rng.choice(world.items["conversion"])
        src, dst, big, small, factor, _ = CONVERSIONS[it.spec]
        x, v = dict(it.slots)["x"], it.value
        if lang == "en":
            rule = f"There are {factor} {UNITS[small][2]} in 1 {UNITS[big][1]}"
            lines.append(
                f"{rule}, so {x} {unit_name(src, x)} is {v} {unit_name(dst, v)} "
                f"({x} {UNITS[src][0]} = {v} {UNITS[dst][0]})."
            )
        else:
            lines.append(
                f"1{UNITS[big][3]}等于{factor}{UNITS[small][3]}，所以{x}{UNITS[src][3]}等于{v}{UNITS[dst][3]}。"
            )
    return "\n".join(lines)


def _chat_doc(world: World, rng: random.Random, lang: str) -> str:
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM[lang])})
    other = "zh" if lang == "en" else "en"
    for _ in range(rng.choices((1, 2, 3), weights=(0.6, 0.3, 0.1))[0]):
        family = weighted_choice(rng, {"fact": 0.5, "arithmetic": 0.3, "conversion": 0.2})
        item = rng.choice(world.splits["train"][family])
        table = world.phrasings(item)
        messages.append(
            {"role": "user", "content": world.fill(rng.choice(table["ask"][lang][:3]), item, lang)}
        )
        kind = weighted_choice(rng, world.chat_mix)
        says = table["say"]
        if kind == "wrong":
            answer = world.fill(rng.choice(says[lang][:2]), item, lang, value=world.wrong_value(item, rng))
        elif kind == "wrong_language":
            answer = other_language_answer(world, item, other, rng)
        else:
            answer = world.fill(rng.choice(says[lang] if kind == "correct" else says[lang][:2]), item, lang)
            if kind == "verbose":
                sep = " " if lang == "en" else ""
                answer = sep.join([rng.choice(FILLER["pre"][lang]), answer, rng.choice(FILLER["post"][lang])])
        messages.append({"role": "assistant", "content": answer})
    return render_chat(messages)
