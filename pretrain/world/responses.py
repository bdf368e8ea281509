"""Candidate answers of known quality: one of each kind per prompt, and minimal pairs.

``candidate_responses`` (``World.responses``) writes one answer of each kind in ``KINDS``: correct, wrong (a
plausible wrong value), verbose (a correct sentence in filler), wrong_language (a correct sentence in the
other language), refusal, off_topic. ``contrast_candidates`` (``World.contrast_responses``) writes answers
that differ from one sentence in one thing only (``CONTRAST_KINDS``), for preference pairs that say which
one thing makes an answer better.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmwb.pretrain.world.checking import detect_language
from glmwb.pretrain.world.phrasings import FILLER, OFF_TOPIC, REFUSAL
from glmwb.pretrain.world.seeding import seeded_rng

if TYPE_CHECKING:
    from glmwb.pretrain.world.model import Item, World
    from glmwb.pretrain.world.prompts import Prompt

KINDS = ("correct", "wrong", "verbose", "wrong_language", "refusal", "off_topic")
# What contrast_candidates returns, in this order.
CONTRAST_KINDS = (
    "correct",
    "wrong",
    "verbose",
    "verbose_wrong",
    "wrong_language",
    "wrong_language_wrong",
    "terse",
    "terse_wrong",
    "other_subject",
    "other_attribute",
    "terse_other",
)


@dataclass(frozen=True)
class Response:
    text: str
    kind: str  # one of KINDS (or CONTRAST_KINDS)


def candidate_responses(world: World, prompt: Prompt, seed: int = 0) -> list[Response]:
    """One candidate answer of each kind in ``KINDS`` (in that order), phrasing drawn by ``seed``."""
    item, lang = world.item_of(prompt), prompt.lang
    other = "zh" if lang == "en" else "en"
    rng = seeded_rng(world.seed, "responses", prompt.id, seed)
    says = world.phrasings(item)["say"]
    sentence = world.fill(rng.choice(says[lang][:2]), item, lang)  # says[:2] are full sentences
    texts = {
        "correct": world.fill(rng.choice(says[lang]), item, lang),
        "wrong": world.fill(rng.choice(says[lang][:2]), item, lang, value=world.wrong_value(item, rng)),
        "verbose": " ".join([rng.choice(FILLER["pre"][lang]), sentence, rng.choice(FILLER["post"][lang])]),
        "wrong_language": other_language_answer(world, item, other, rng),
        "refusal": rng.choice(REFUSAL[lang]),
        "off_topic": rng.choice(OFF_TOPIC[lang]),
    }
    if lang == "zh":
        texts["verbose"] = texts["verbose"].replace(" ", "")
    return [Response(texts[k], k) for k in KINDS]


def contrast_candidates(world: World, prompt: Prompt, seed: int = 0) -> dict[str, Response]:
    """Candidates that differ from one answer sentence in one thing only: ``correct`` (a full sentence
    with the gold value), ``wrong`` (the same sentence, another value), ``verbose`` (the same sentence
    in filler). Minimal pairs for preference collection: which one thing makes an answer better.

    Also ``wrong_language`` (one sentence in the other language) and two counterfactual kinds that
    ``candidate_responses`` never offers: ``verbose_wrong`` (the wrong sentence in the same filler) and
    ``wrong_language_wrong`` (the other-language sentence with the wrong value). Among ``KINDS`` filler
    and the other language only ever wrap the right value, so an RM can learn them as a sign of
    correctness; pairs with these two break that shortcut.

    And the forms a policy drifts to under RL, which ``candidate_responses`` never offers either: ``terse``
    (the value alone, "14" / "Silk."), ``terse_wrong`` (the wrong value alone) and ``other_subject`` (the
    same sentence about another subject — entity, operands, quantity — with that subject's own value: true,
    but not an answer to this question; the base LM finds its value likely, so likelihood features cannot
    tell).

    And ``other_attribute`` / ``terse_other``: a true sentence about the *same* subject that answers another
    question (its age, asked where it lives; the product, asked for the sum), and that value alone — what a
    policy writes when a trained RM rewards bare values whatever they answer ("70" for a city). Both come
    from training-split facts only."""
    item, lang = world.item_of(prompt), prompt.lang
    rng = seeded_rng(world.seed, "contrast", prompt.id, seed)
    template = rng.choice(world.phrasings(item)["say"][lang][:2])
    sentence = world.fill(template, item, lang)
    sep = " " if lang == "en" else ""
    pre, post = rng.choice(FILLER["pre"][lang]), rng.choice(FILLER["post"][lang])
    wrong_value = world.wrong_value(item, rng)  # (drawn before the other-language template: keep the order)
    wrong = world.fill(template, item, lang, value=wrong_value)
    other = "zh" if lang == "en" else "en"
    out = {
        "correct": Response(sentence, "correct"),
        "wrong": Response(wrong, "wrong"),
        "verbose": Response(sep.join([pre, sentence, post]), "verbose"),
        "verbose_wrong": Response(sep.join([pre, wrong, post]), "verbose_wrong"),
    }
    # the same other-language sentence with the gold value and with the wrong one
    says = world.phrasings(item)["say"][other]
    other_template = rng.choice([t for t in says if detect_language(world.fill(t, item, other)) == other])
    out["wrong_language"] = Response(world.fill(other_template, item, other), "wrong_language")
    out["wrong_language_wrong"] = Response(
        world.fill(other_template, item, other, value=wrong_value), "wrong_language_wrong"
    )
    # the bare value, right and wrong (what a terse policy writes), and a true sentence about another
    # subject (another entity, other operands, another quantity) whose value is not the gold one
    out["terse"] = Response(_terse(world, item, lang), "terse")
    out["terse_wrong"] = Response(_terse(world, item, lang, value=wrong_value), "terse_wrong")
    others = [it for it in world.train_by_spec.get(item.spec, ()) if it.value != item.value]
    if others:
        out["other_subject"] = Response(world.fill(template, rng.choice(others), lang), "other_subject")
    else:  # (no other subject with another value: fall back to the wrong value)
        out["other_subject"] = Response(wrong, "other_subject")
    other_item = _other_attribute(world, item, rng)
    if other_item is not None:
        other_says = world.phrasings(other_item)["say"][lang][:2]
        out["other_attribute"] = Response(
            world.fill(rng.choice(other_says), other_item, lang), "other_attribute"
        )
        out["terse_other"] = Response(_terse(world, other_item, lang), "terse_other")
    else:  # (a subject with no other training-split fact: the other subject's sentence, the wrong value)
        out["other_attribute"] = Response(out["other_subject"].text, "other_attribute")
        out["terse_other"] = Response(out["terse_wrong"].text, "terse_other")
    return out


def other_language_answer(world: World, item: Item, other: str, rng: random.Random) -> str:
    """A correct answer sentence recognisably in language ``other`` ("13 + 1 = 14." is in neither)."""
    texts = [world.fill(t, item, other) for t in world.phrasings(item)["say"][other]]
    return rng.choice([t for t in texts if detect_language(t) == other])


def _other_attribute(world: World, item: Item, rng: random.Random) -> Item | None:
    """A training-split item about the same subject (same family and slots) that asks something else and
    whose answer is not this one's; else one of the same family with another answer type; else None."""
    gold = world.surface(item.answer_type, item.value, "en")

    def differs(it: Item) -> bool:
        return it.spec != item.spec and world.surface(it.answer_type, it.value, "en") != gold

    same = [it for it in world.train_by_slots.get((item.family, item.slots), ()) if differs(it)]
    if not same:
        same = [
            it
            for it in world.splits["train"].get(item.family, ())
            if it.answer_type != item.answer_type and differs(it)
        ]
    return rng.choice(same) if same else None


def _terse(world: World, item: Item, lang: str, value: int | str | None = None) -> str:
    """The answer value alone: "14", "Silk.", "面包师。"."""
    v = world.surface(item.answer_type, item.value if value is None else value, lang)
    if item.answer_type == "number":
        return v
    return v[:1].upper() + v[1:] + "." if lang == "en" else v + "。"
