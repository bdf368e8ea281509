"""The world itself: entities, question instances, the train / held-out split, and how values are written.

``make_world(seed, num_entities)`` draws ``num_entities`` entities (25 % cities, 30 % creatures, the rest
people) plus ``max(3, num_entities // 16)`` countries, with names and attributes from ``tables``. A
``World`` enumerates every question instance (``Item``) of every family, indexes them, and renders them in
either language; what it makes from them lives beside it: ``prompts``, ``responses``, ``corpus``, and the
answer checker ``checking``.

Train / held-out split
----------------------
An instance is held out when SHA-256 of ``"{seed}|{family}|{key}"`` falls in the first
``heldout_fraction`` (20 %) of the hash range, for both languages at once; so held-out prompts never share
(family, instance) with train prompts, in any language or phrasing. The last phrasing of every question
table is also held out: train prompts and the corpus's chats use the first three, held-out prompts all four.
Facts themselves are *not* held out (a fact the model never saw is unlearnable): every entity fact is in
the corpus's encyclopedic paragraphs in both languages, and every arithmetic / conversion instance may
appear in its worked-example prose. A held-out prompt therefore asks, in a chat and sometimes in a new
phrasing, for something the base model has only read as prose.

The held-out instances are split once more, by a second hash, into two halves: ``dev`` (prompts for
training stages that learn from their own samples (PPO: ``prompts.world.train_split``), asked in the first three
phrasings) and ``test`` (the evaluation, all four phrasings). A stage that trains on ``dev`` and is
evaluated on ``test`` learns *to answer from what it has read* on instances it is then never graded on.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from glmwb.pretrain.world.checking import (
    AnswerVocabulary,
    Check,
    answer_on_topic,
    check_answer,
    final_answer,
)
from glmwb.pretrain.world.corpus import CHAT_MIX, make_corpus
from glmwb.pretrain.world.phrasings import ARITH, CONV, FACTS
from glmwb.pretrain.world.prompts import Prompt, sample_prompts
from glmwb.pretrain.world.responses import Response, candidate_responses, contrast_candidates
from glmwb.pretrain.world.seeding import digest, seeded_rng
from glmwb.pretrain.world.tables import (
    ATTRIBUTES,
    CITY_SUFFIXES,
    CONVERSIONS,
    FAMILIES,
    OPS,
    SYLLABLES,
    UNITS,
    VOCAB,
    unit_name,
)


@dataclass(frozen=True)
class Entity:
    kind: str  # "country" | "city" | "person" | "creature"
    name_en: str
    name_zh: str
    attrs: dict[str, int | str] = field(default_factory=dict)  # entity refs by English name, words by id

    def name(self, lang: str) -> str:
        return self.name_zh if lang == "zh" else self.name_en


@dataclass(frozen=True)
class Item:
    """One question instance, independent of language and phrasing."""

    family: str
    key: str
    spec: str  # "add" | "km_to_m" | "person.colour" ...
    answer_type: str
    value: int | str  # gold: an int, a VOCAB id or an entity's English name
    slots: tuple[tuple[str, Any], ...]  # arithmetic (a, b), conversion (x,), fact (subject,)


@dataclass
class World:
    """A drawn world: its entities, every question instance of every family (indexed by key, subject, split),
    and how to write them; what it makes from them is in the sibling modules (``World.prompts``,
    ``.responses``, ``.contrast_responses``, ``.check``, ``.on_topic``, ``.corpus`` call them)."""

    seed: int
    num_entities: int
    entities: list[Entity]  # countries first, then cities, people, creatures
    heldout_fraction: float = 0.2
    max_operand: int = 30
    chat_mix: dict[str, float] = field(default_factory=lambda: dict(CHAT_MIX))

    def __post_init__(self) -> None:
        # Indexes the world's own modules (prompts, responses, corpus, checking) read.
        self.by_name = {e.name_en: e for e in self.entities}
        self.of_kind = {k: [e for e in self.entities if e.kind == k] for k in ("country", *ATTRIBUTES)}
        # answer type -> the surface forms of its values, for finding the final answer in a text
        self.vocabularies: dict[str, AnswerVocabulary] = {}
        for answer_type in ("colour", "job", "food", "product", "city", "country"):
            surfaces: dict[str, str] = {}
            if answer_type in VOCAB:
                for i, (en, zh, extra) in VOCAB[answer_type].items():
                    surfaces.update({en: i, zh: i, **{s: i for s in extra}})
            else:
                for e in self.of_kind[answer_type]:
                    surfaces.update({e.name_en: e.name_en, e.name_zh: e.name_en})
            self.vocabularies[answer_type] = AnswerVocabulary(surfaces)
        self.entity_names = AnswerVocabulary(
            {n: e.name_en for e in self.entities for n in (e.name_en, e.name_zh)}
        )
        self.items = {f: self._enumerate(f) for f in FAMILIES}
        self.item_by_key = {(it.family, it.key): it for items in self.items.values() for it in items}
        self.facts_about: dict[str, list[Item]] = {}
        for it in self.items["fact"]:
            self.facts_about.setdefault(dict(it.slots)["n"], []).append(it)
        self.residents = {
            c.name_en: [e for e in self.entities if e.attrs.get("home") == c.name_en]
            for c in self.of_kind["city"]
        }
        self.cities_of = {
            c.name_en: [x for x in self.of_kind["city"] if x.attrs["country"] == c.name_en]
            for c in self.of_kind["country"]
        }
        self.described = [e for e in self.entities if e.kind != "country"]
        # split -> family -> instances
        self.splits = {
            split: {
                f: [it for it in items if self.is_heldout(it) == (split == "heldout")]
                for f, items in self.items.items()
            }
            for split in ("train", "heldout")
        }
        # training-split items by spec (other subjects for contrast_responses: no held-out fact leaks)
        self.train_by_spec: dict[str, list[Item]] = {}
        # ... and by subject (entity, operands, quantity): its other training-split facts, for other_attribute
        self.train_by_slots: dict[tuple[str, tuple], list[Item]] = {}
        for items in self.splits["train"].values():
            for it in items:
                self.train_by_spec.setdefault(it.spec, []).append(it)
                self.train_by_slots.setdefault((it.family, it.slots), []).append(it)
        for part in ("dev", "test"):
            self.splits[part] = {
                f: [it for it in items if self.is_dev(it) == (part == "dev")]
                for f, items in self.splits["heldout"].items()
            }

    # -- question instances ------------------------------------------------------------------------------

    def _enumerate(self, family: str) -> list[Item]:
        items = []
        if family == "arithmetic":
            top = self.max_operand
            for a in range(1, top + 1):
                for b in range(1, top + 1):
                    items.append(Item(family, f"add:{a}:{b}", "add", "number", a + b, (("a", a), ("b", b))))
                    if b <= a:
                        items.append(
                            Item(family, f"sub:{a}:{b}", "sub", "number", a - b, (("a", a), ("b", b)))
                        )
            for a in range(2, 10):
                for b in range(2, 13):
                    items.append(Item(family, f"mul:{a}:{b}", "mul", "number", a * b, (("a", a), ("b", b))))
        elif family == "conversion":
            for kind, (src, _dst, big, _small, factor, counts) in CONVERSIONS.items():
                for k in counts:
                    x, v = (k, k * factor) if src == big else (k * factor, k)
                    items.append(Item(family, f"{kind}:{x}", kind, "number", v, (("x", x),)))
        else:
            for e in self.entities:
                for attr, answer_type in ATTRIBUTES.get(e.kind, {}).items():
                    key = f"{e.kind}:{e.name_en}:{attr}"
                    items.append(
                        Item(family, key, f"{e.kind}.{attr}", answer_type, e.attrs[attr], (("n", e.name_en),))
                    )
        return items

    def is_heldout(self, item: Item) -> bool:
        return digest(self.seed, item.family, item.key) / 2**64 < self.heldout_fraction

    def is_dev(self, item: Item) -> bool:
        """Which half of the held-out instances ``item`` would fall in: dev (True) or test (False)."""
        return digest(self.seed, "dev", item.family, item.key) / 2**64 < 0.5

    def item_of(self, prompt: Prompt) -> Item:
        """The question instance ``prompt`` asks."""
        try:
            return self.item_by_key[prompt.family, prompt.key]
        except KeyError:
            raise KeyError(f"prompt {prompt.id!r} is not from this world") from None

    # -- writing values and sentences --------------------------------------------------------------------

    def phrasings(self, item: Item) -> dict[str, dict[str, list[str]]]:
        """The "ask" and "say" templates of ``item``'s question spec (``phrasings``)."""
        return (
            ARITH
            if item.family == "arithmetic"
            else CONV
            if item.family == "conversion"
            else FACTS[item.spec]
        )

    def surface(self, answer_type: str, value: int | str, lang: str) -> str:
        """A value as written in ``lang``: "42", "red" / "红色", "Kelton" / "凯顿"."""
        if answer_type == "number":
            return str(value)
        if answer_type in VOCAB:
            return VOCAB[answer_type][value][0 if lang == "en" else 1]
        return self.by_name[value].name(lang)

    def fill(self, template: str, item: Item, lang: str, value: int | str | None = None) -> str:
        """``template`` with ``item``'s slots and ``value`` (by default its gold value) written in ``lang``."""
        value = item.value if value is None else value
        v = self.surface(item.answer_type, value, lang)
        slots: dict[str, Any] = {"v": v, "V": v[:1].upper() + v[1:]}
        params = dict(item.slots)
        if item.family == "arithmetic":
            sym, word_en, word_zh = OPS[item.spec]
            slots.update(a=params["a"], b=params["b"], sym=sym, word=word_en if lang == "en" else word_zh)
        elif item.family == "conversion":
            src, dst = CONVERSIONS[item.spec][:2]
            x = params["x"]
            if lang == "en":
                slots.update(x=x, fa=UNITS[src][0], fl=unit_name(src, x), ta=UNITS[dst][0], tl=UNITS[dst][2])
                slots["tv"] = unit_name(dst, value) if isinstance(value, int) else UNITS[dst][2]
            else:
                slots.update(x=x, fa=UNITS[src][3], ta=UNITS[dst][3])
        else:
            slots["n"] = self.by_name[params["n"]].name(lang)
        return template.format(**slots)

    def wrong_value(self, item: Item, rng: random.Random) -> int | str:
        """A plausible wrong value of the same type."""
        gold = item.value
        if item.answer_type != "number":
            pool = (
                list(VOCAB[item.answer_type])
                if item.answer_type in VOCAB
                else [e.name_en for e in self.of_kind[item.answer_type]]
            )
            return rng.choice([v for v in pool if v != gold])
        assert isinstance(gold, int)
        params = dict(item.slots)
        if item.spec in OPS:
            a, b = params["a"], params["b"]
            candidates = [
                gold + 1,
                gold - 1,
                gold + 2,
                gold - 10,
                gold + 10,
                a + b if item.spec != "add" else a * b,
            ]
        elif item.family == "conversion":
            candidates = [gold * 10, gold // 10 if gold % 10 == 0 else gold + 1, params["x"], gold * 100]
        elif item.spec == "creature.legs":
            candidates = [0, 2, 4, 6, 8]
        else:
            candidates = [gold + d for d in (-3, -2, -1, 1, 2, 3, 5)]
        candidates = [c for c in candidates if c != gold and c >= 0]
        return rng.choice(candidates)

    # -- what the world makes: prompts, candidate answers, checks, a corpus (each in its own module) -------

    def prompts(
        self, split: str = "train", n: int = 1000, seed: int = 0, phrasings: int | None = None
    ) -> list[Prompt]:
        """``n`` distinct prompts of ``split`` (``prompts.sample_prompts``)."""
        return sample_prompts(self, split, n, seed, phrasings)

    def responses(self, prompt: Prompt, seed: int = 0) -> list[Response]:
        """One candidate answer of each kind in ``KINDS`` (``responses.candidate_responses``)."""
        return candidate_responses(self, prompt, seed)

    def contrast_responses(self, prompt: Prompt, seed: int = 0) -> dict[str, Response]:
        """Minimal pairs: candidates that differ in one thing (``responses.contrast_candidates``)."""
        return contrast_candidates(self, prompt, seed)

    def final_answer(self, prompt: Prompt, text: str) -> tuple[str, str] | None:
        """(canonical value, as written) of the final answer in ``text``, or None when there is none."""
        return final_answer(self, prompt, text)

    def check(self, prompt: Prompt, text: str) -> Check:
        """Is ``text`` a correct, right-language, concise answer to ``prompt``? (``checking.check_answer``)"""
        return check_answer(self, prompt, text)

    def on_topic(self, prompt: Prompt, text: str) -> bool:
        """Does ``text`` answer the question asked, right or wrong? (``checking.answer_on_topic``)"""
        return answer_on_topic(self, prompt, text)

    def corpus(self, num_docs: int = 20000, seed: int = 0, mix: dict[str, float] | None = None) -> list[str]:
        """Pretraining documents; deterministic in (world, seed, mix) (``corpus.make_corpus``)."""
        return make_corpus(self, num_docs, seed, mix)

    # -- serialisation -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_entities": self.num_entities,
            "heldout_fraction": self.heldout_fraction,
            "max_operand": self.max_operand,
            "chat_mix": dict(self.chat_mix),
            "entities": [asdict(e) for e in self.entities],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        return cls(
            seed=d["seed"],
            num_entities=d["num_entities"],
            entities=[Entity(**e) for e in d["entities"]],
            heldout_fraction=d.get("heldout_fraction", 0.2),
            max_operand=d.get("max_operand", 30),
            chat_mix=d.get("chat_mix") or dict(CHAT_MIX),
        )


def make_world(
    seed: int = 0, num_entities: int = 96, heldout_fraction: float = 0.2, max_operand: int = 30
) -> World:
    """Draw a world: names and attributes depend only on (seed, num_entities)."""
    if not 12 <= num_entities <= 400:
        raise ValueError(f"num_entities must be in [12, 400], got {num_entities}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = seeded_rng(seed, num_entities, "entities")
    num_countries = max(3, num_entities // 16)
    num_cities = max(4, round(0.25 * num_entities))
    num_creatures = max(4, round(0.3 * num_entities))
    num_people = num_entities - num_cities - num_creatures

    bases = [(a[0] + b[0], a[1] + b[1]) for a in SYLLABLES for b in SYLLABLES if a != b]
    rng.shuffle(bases)
    taken: set[str] = set()
    reserved = {
        s.lower() for table in VOCAB.values() for en, _, extra in table.values() for s in (en, *extra)
    }

    def draw() -> tuple[str, str]:
        while True:
            en, zh = bases.pop()
            if en not in taken and en not in reserved:
                taken.add(en)
                return en.capitalize(), zh

    entities = []
    for _ in range(num_countries):
        en, zh = draw()
        entities.append(Entity("country", en + ("nia" if en[-1] in "aeiou" else "ia"), zh + "亚"))
    for _ in range(num_cities):
        en, zh = draw()
        suffix_en, suffix_zh = rng.choice(CITY_SUFFIXES)
        country = rng.choice(entities[:num_countries]).name_en
        attrs = {
            "country": country,
            "bridges": rng.randint(2, 30),
            "product": rng.choice(list(VOCAB["product"])),
        }
        entities.append(Entity("city", en + suffix_en, zh + suffix_zh, attrs))
    cities = [e.name_en for e in entities if e.kind == "city"]
    for _ in range(num_people):
        en, zh = draw()
        attrs = {
            "home": rng.choice(cities),
            "colour": rng.choice(list(VOCAB["colour"])),
            "job": rng.choice(list(VOCAB["job"])),
            "age": rng.randint(18, 80),
        }
        entities.append(Entity("person", en, zh, attrs))
    for _ in range(num_creatures):
        en, zh = draw()
        attrs = {
            "home": rng.choice(cities),
            "colour": rng.choice(list(VOCAB["colour"])),
            "food": rng.choice(list(VOCAB["food"])),
            "legs": rng.choice((0, 2, 4, 6, 8)),
        }
        entities.append(Entity("creature", en, zh + "兽", attrs))
    return World(seed, num_entities, entities, heldout_fraction=heldout_fraction, max_operand=max_operand)


@functools.lru_cache(maxsize=8)
def cached_world(seed: int, num_entities: int) -> World:
    """``make_world(seed, num_entities)``, kept for the next prompt of the same world (``Prompt.world_key``)."""
    return make_world(seed, num_entities)
