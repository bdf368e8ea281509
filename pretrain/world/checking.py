"""Checking an answer: the final answer in a text, its correctness, language, concision and score.

``check(prompt, text)`` (``World.check``) finds the *final answer*: the last number in the text (Arabic
digits with optional sign, thousands commas and decimals, full-width digits, and Chinese numerals such as
三十四 once common words like 一个 / 十分 / 千米 are masked), or for word answers the last word of the
answer's type in either language (colour words, job words, city names, ...; case-insensitive, whole words).
Then

- ``correct``: that final answer equals the gold value (in either language: 红色 answers "red"),
- ``right_language``: the text's language (Chinese when CJK ideographs are at least half of its letters)
  is the prompt's; text with no letters at all (``"42"``) is neutral and counts as right,
- ``concision`` = min(1, budget / length) with budget = 1.5 x len(reference) + 10 characters
  (every concise answer fits it; the padded ones are at least twice as long),
- ``score`` = 0.6 x correct + 0.25 x right_language + 0.15 x concision, in [0, 1]. The weights make the
  order lexicographic: any correct answer (>= 0.6) beats any incorrect one (<= 0.4), and among correct ones
  the right language (>= 0.85) beats the wrong one (<= 0.75); length only decides the rest.

``on_topic(prompt, text)`` (``World.on_topic``) asks whether the answer addresses the question at all,
right or wrong.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmwb.pretrain.world.tables import CONVERSIONS

if TYPE_CHECKING:
    from glmwb.pretrain.world.model import World
    from glmwb.pretrain.world.prompts import Prompt


@dataclass(frozen=True)
class Check:
    correct: bool  # the final answer in the text is the gold value (in either language)
    right_language: bool  # the text is in the prompt's language (or has no letters at all)
    length: int  # characters
    score: float  # 0.6 correct + 0.25 right_language + 0.15 concision, in [0, 1]
    concision: float = 1.0  # min(1, (1.5 len(reference) + 10) / length)
    answer: str | None = None  # the final answer found, as written


# ---------------------------------------------------------------------------------------------------------
# Language.
# ---------------------------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_MARKUP = re.compile(r"\[gMASK\]|<sop>|<\|\w+\|>")


def detect_language(text: str) -> str | None:
    """The language of ``text``: "zh" when CJK ideographs are at least half of its letters, "en" when it
    has letters, None when it has none (``"42."``). Chat markup is ignored."""
    text = _MARKUP.sub("", text)
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if cjk + latin == 0:
        return None
    return "zh" if cjk >= latin else "en"


# ---------------------------------------------------------------------------------------------------------
# Numbers and answer words.
# ---------------------------------------------------------------------------------------------------------

_ARABIC = re.compile(r"(?<![0-9A-Za-z.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ZH_NUMERAL = re.compile(r"[零〇一二两三四五六七八九十百千万]+")
_ZH_DIGITS = {
    "零": 0,
    "〇": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_ZH_POWERS = {"十": 10, "百": 100, "千": 1000}
# Words that contain numeral characters but are not numbers (masked before scanning).
_ZH_NOT_NUMBERS = re.compile(
    "十分|一下|一些|一个|一起|一点|一样|一直|一定|一共|一切|一般|一旦|一会|之一|唯一|第一|统一|万一|千万|千米|千克|两者|一边"
)


def _zh_numeral_value(s: str) -> int:
    total, section, digit = 0, 0, 0
    for ch in s:
        if ch in _ZH_DIGITS:
            digit = _ZH_DIGITS[ch]
        elif ch in _ZH_POWERS:
            section += (digit or 1) * _ZH_POWERS[ch]
            digit = 0
        else:  # 万
            total += (section + digit or 1) * 10_000
            section, digit = 0, 0
    return total + section + digit


def find_numbers(text: str) -> list[tuple[int, float, str]]:
    """All numbers in ``text`` as (end position, value, as written), in order of position."""
    text = unicodedata.normalize("NFKC", text)  # full-width digits; NFKC keeps CJK characters
    found = [(m.end(), float(m.group().replace(",", "")), m.group()) for m in _ARABIC.finditer(text)]
    masked = _ZH_NOT_NUMBERS.sub(lambda m: " " * len(m.group()), text)
    found += [(m.end(), float(_zh_numeral_value(m.group())), m.group()) for m in _ZH_NUMERAL.finditer(masked)]
    return sorted(found)


def _format_number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


class AnswerVocabulary:
    """Surface forms (both languages) of every answer value of one type, for finding the final answer."""

    def __init__(self, surfaces: dict[str, str]) -> None:  # surface -> canonical id
        self.ids = {s.lower(): i for s, i in surfaces.items()}
        alternatives = []
        for s in sorted(surfaces, key=len, reverse=True):
            alternatives.append(
                re.escape(s) if _CJK.search(s) else rf"(?<![A-Za-z]){re.escape(s)}(?![A-Za-z])"
            )
        self.pattern = re.compile("|".join(alternatives), re.IGNORECASE)

    def last(self, text: str) -> tuple[str, str] | None:
        """(canonical id, as written) of the last value mentioned in ``text``."""
        matches = list(self.pattern.finditer(text))
        return (self.ids[matches[-1].group().lower()], matches[-1].group()) if matches else None


# ---------------------------------------------------------------------------------------------------------
# Checking an answer against a world.
# ---------------------------------------------------------------------------------------------------------


def final_answer(world: World, prompt: Prompt, text: str) -> tuple[str, str] | None:
    """(canonical value, as written) of the final answer in ``text``, or None when there is none."""
    if prompt.answer_type == "number":
        numbers = find_numbers(text)
        return (_format_number(numbers[-1][1]), numbers[-1][2]) if numbers else None
    return world.vocabularies[prompt.answer_type].last(text)


def check_answer(world: World, prompt: Prompt, text: str) -> Check:
    """Is ``text`` a correct, right-language, concise answer to ``prompt``? (See the module docstring.)"""
    found = final_answer(world, prompt, text)
    if prompt.answer_type == "number":
        correct = found is not None and float(found[0]) == float(prompt.gold)
    else:
        correct = (
            found is not None and found[0] == world.vocabularies[prompt.answer_type].ids[prompt.gold.lower()]
        )
    lang = detect_language(text)
    right_language = lang is None or lang == prompt.lang
    length = len(text.strip())
    concision = min(1.0, (1.5 * len(prompt.reference) + 10) / max(length, 1))
    score = 0.6 * correct + 0.25 * right_language + 0.15 * concision
    return Check(
        correct, right_language, length, round(score, 6), round(concision, 6), found[1] if found else None
    )


def answer_on_topic(world: World, prompt: Prompt, text: str) -> bool:
    """Does ``text`` answer the question asked, right or wrong? It must give a final answer of the asked
    type; a fact answer must name the asked subject and no other entity (but city / country answers); an
    arithmetic or conversion answer may restate only the question's own numbers (and the conversion
    factor) before its final one.
    "Fenti is 67 years old." and "Rosbel likes blue." to "What colour does Fenti like?" are off topic, and
    so is a bare "Blue." (it names no subject); "Fenti likes red." is on topic. A reward rule for answers
    that are grounded in the question (rewards.rules ``world_on_topic``), and a diagnosis: held-out
    answers of the quickstart's SFT policy are mostly wrong because they are off topic."""
    found = final_answer(world, prompt, text)
    if found is None:
        return False
    item = world.item_of(prompt)
    params = dict(item.slots)
    if item.family == "fact":  # the subject named, no other entity but answer-valued ones
        names = world.entity_names
        named = {names.ids[m.group().lower()] for m in names.pattern.finditer(text)}
        answers = {e.name_en for e in world.of_kind.get(item.answer_type, [])}
        return params["n"] in named and named <= {params["n"]} | answers
    allowed = {float(v) for k, v in params.items() if k in ("a", "b", "x")}
    if item.family == "conversion":
        allowed.add(float(CONVERSIONS[item.spec][4]))
        allowed.add(1.0)  # "1 km is 1000 m, so ..."
    return all(value in allowed for _, value, _ in find_numbers(text)[:-1])


# ---------------------------------------------------------------------------------------------------------
# For a prompt alone (read back from JSONL, say): its world is rebuilt from ``prompt.world_key``.
# ---------------------------------------------------------------------------------------------------------


def check(prompt: Prompt, text: str) -> Check:
    """``World.check`` for a prompt alone: its world is rebuilt (and cached) from ``prompt.world_key``."""
    return _world_of(prompt).check(prompt, text)


def on_topic(prompt: Prompt, text: str) -> bool:
    """``World.on_topic`` for a prompt alone (its world rebuilt and cached from ``prompt.world_key``)."""
    return _world_of(prompt).on_topic(prompt, text)


def _world_of(prompt: Prompt) -> World:
    # imported here: model builds its World from this module (AnswerVocabulary, check_answer)
    from glmwb.pretrain.world.model import cached_world

    return cached_world(*prompt.world_key)
