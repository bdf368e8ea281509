"""The embedded default world: a small bilingual (English / Chinese) synthetic world with checkable answers.

Everything the default loop needs without data from elsewhere comes from here: a pretraining corpus, chat
prompts split into train / held-out, candidate answers of known quality, an answer checker, and simulated
annotators with a documented preference rule. Stdlib only, deterministic by seed (every random draw comes
from a ``random.Random`` seeded by a SHA-256 of its purpose, never from ``hash()`` or global state).

The world
---------
``make_world(seed, num_entities)`` draws ``num_entities`` entities (25 % cities, 30 % creatures, the rest
people) plus ``max(3, num_entities // 16)`` countries. Names are built from a table of 40 syllables, each
with an English spelling and one Chinese character (``zor``/佐 + ``ven``/文 -> Zorven / 佐文); cities
take a suffix (-ton/顿, -ford/福, -burg/堡), countries -ia/亚 and creatures' Chinese names 兽. The name
characters are disjoint from numerals, units and every answer word, so a name can never be mistaken for
an answer. Attributes (``ATTRIBUTES``):

====================  =======================================================================
city                  country (a country), bridges (2-30), product (tea/茶, salt/盐, ...)
person                home (a city), colour (red/红色, ...), job (baker/面包师, ...), age (18-80)
creature              home (a city), colour, food (fish/鱼, ...), legs (0, 2, 4, 6, 8)
====================  =======================================================================

Task families (``FAMILIES``), each a set of language-independent *question instances* with a key:
``arithmetic`` (``add:a:b`` / ``sub:a:b`` with 1 <= b <= a, operands up to ``max_operand``; ``mul:a:b``,
2-9 x 2-12), ``conversion`` (km<->m, kg<->g, hours<->minutes, integer results, key ``km_to_m:3``) and
``fact`` (``person:Zorven:colour``). Each instance is asked with one of four phrasings per language.

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
training stages that learn from their own samples (PPO: ``prompts.train_split``), asked in the first three
phrasings) and ``test`` (the evaluation, all four phrasings). A stage that trains on ``dev`` and is
evaluated on ``test`` learns *to answer from what it has read* on instances it is then never graded on.

The corpus
----------
``world.corpus(num_docs, seed)``: each document is English or Chinese with probability 1/2 and is
  - 35 % an encyclopedic paragraph: one entity's attributes in shuffled sentences and varied phrasing
    (city pages also list residents; one in ten is a country page listing its cities),
  - 15 % worked arithmetic (3-6 equations), 8 % worked unit conversions (2-4, with the factor),
  - 42 % a chat in GLM-4 markup, ``[gMASK]<sop>[<|system|>\\n...]<|user|>\\n{q}<|assistant|>\\n{a}``
    with 1-3 turns (no newline after content; documents are joined with ``<|endoftext|>`` later, by the
    data pipeline). Chats use train instances and phrasings only, and their answers are deliberately not
    all good (``chat_mix``: 75 % correct, 12 % verbose, 8 % wrong language, 5 % wrong value), so that the
    base model has habits that SFT, DPO and PPO can measurably remove.
``corpus(20000)`` is about 2.0 M characters (about 1 M tokens for a 4k BPE) and takes about half a second.

Checking an answer
------------------
``check(prompt, text)`` finds the *final answer*: the last number in the text (Arabic digits with optional
sign, thousands commas and decimals, full-width digits, and Chinese numerals such as 三十四 once common
words like 一个 / 十分 / 千米 are masked), or for word answers the last word of the answer's type in either
language (colour words, job words, city names, ...; case-insensitive, whole words). Then

- ``correct``: that final answer equals the gold value (in either language: 红色 answers "red"),
- ``right_language``: the text's language (Chinese when CJK ideographs are at least half of its letters)
  is the prompt's; text with no letters at all (``"42"``) is neutral and counts as right,
- ``concision`` = min(1, budget / length) with budget = 1.5 x len(reference) + 10 characters
  (every concise answer fits it; the padded ones are at least twice as long),
- ``score`` = 0.6 x correct + 0.25 x right_language + 0.15 x concision, in [0, 1]. The weights make the
  order lexicographic: any correct answer (>= 0.6) beats any incorrect one (<= 0.4), and among correct ones
  the right language (>= 0.85) beats the wrong one (<= 0.75); length only decides the rest.

Simulated annotators
--------------------
``SimulatedAnnotator(rule, noise, seed).judge(prompt, a, b)`` applies ``PreferenceRule`` (by default the
same weights as ``score``): "both_bad" when neither answer is correct; else "tie" when the utilities differ
by at most ``tie_tolerance`` (0.03); else the answer with the higher utility, "A" or "B". With probability
``noise`` the label is replaced by one drawn uniformly from the four labels (it may coincide with the
rule's). The draw is seeded by (annotator seed, prompt id, both texts), so re-asking gives the same label.
``agreement_ceiling(noise)`` is the expected agreement of such an annotator with the noise-free rule:
1 - 3p/4 over all labels, and (1 - 3p/4) / (1 - p/2) over the strict (A/B) labels when both the rule and
the annotator are strict, which is the best pairwise accuracy a reward model can have on held-out labels.
``judge_with_strength`` also says how much better a strict winner is, on ``annotation.records``' four-point
scale (negligible / slight / clear / strong) from the utility gap: a filler-padded loser is a slight loss, the
other language a clear one, a wrong value a strong one; a random (noisy) label gets a random strength.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmwb.annotation.records import STRENGTH_MARGINS, STRENGTHS

FAMILIES = ("arithmetic", "conversion", "fact")
LANGS = ("en", "zh")
SPLITS = ("train", "heldout", "dev", "test")  # dev and test: the two halves of heldout
KINDS = ("correct", "wrong", "verbose", "wrong_language", "refusal", "off_topic")
LABELS = ("A", "B", "tie", "both_bad")
# How good the corpus's chat answers are: kind -> probability (see the module docstring).
CHAT_MIX = {"correct": 0.75, "verbose": 0.12, "wrong_language": 0.08, "wrong": 0.05}

# ---------------------------------------------------------------------------------------------------------
# Tables: names, answer vocabularies, units, phrasings.
# ---------------------------------------------------------------------------------------------------------

# (English spelling, Chinese character). No character here is a numeral, unit, operator or answer word.
SYLLABLES = (
    ("ka", "卡"), ("lo", "洛"), ("ri", "瑞"), ("ta", "塔"), ("ven", "文"), ("zor", "佐"), ("bel", "贝"),
    ("dor", "多"), ("fen", "芬"), ("gar", "嘉"), ("hal", "哈"), ("is", "伊"), ("jun", "君"), ("kel", "凯"),
    ("lin", "林"), ("mar", "玛"), ("nor", "诺"), ("os", "奥"), ("pel", "佩"), ("quin", "坤"), ("ros", "罗"),
    ("sel", "塞"), ("tor", "托"), ("ul", "乌"), ("vin", "温"), ("wen", "雯"), ("xan", "桑"), ("yor", "约"),
    ("zen", "森"), ("bri", "布"), ("dra", "德"), ("el", "艾"), ("fa", "法"), ("gor", "戈"), ("han", "汉"),
    ("mo", "莫"), ("na", "娜"), ("pi", "皮"), ("su", "苏"), ("ti", "蒂"),
)  # fmt: skip
CITY_SUFFIXES = (("ton", "顿"), ("ford", "福"), ("burg", "堡"))

# Answer vocabularies: canonical id (the English word) -> (English, Chinese, extra surface forms).
VOCAB: dict[str, dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "colour": {
        w: (w, z, ())
        for w, z in [
            ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
            ("black", "黑色"), ("white", "白色"), ("purple", "紫色"), ("orange", "橙色"),
        ]
    },
    "job": {
        w: (w, z, ())
        for w, z in [
            ("baker", "面包师"), ("farmer", "农民"), ("teacher", "老师"), ("doctor", "医生"),
            ("painter", "画家"), ("sailor", "水手"), ("singer", "歌手"), ("builder", "建筑工"),
        ]
    },
    "food": {
        "fish": ("fish", "鱼", ()),
        "grass": ("grass", "草", ()),
        "berries": ("berries", "浆果", ("berry",)),
        "seeds": ("seeds", "种子", ("seed",)),
        "insects": ("insects", "昆虫", ("insect",)),
        "nuts": ("nuts", "坚果", ("nut",)),
        "honey": ("honey", "蜂蜜", ()),
        "mushrooms": ("mushrooms", "蘑菇", ("mushroom",)),
    },
    "product": {
        w: (w, z, ())
        for w, z in [
            ("tea", "茶"), ("salt", "盐"), ("glass", "玻璃"), ("silk", "丝绸"),
            ("cheese", "奶酪"), ("paper", "纸"), ("rope", "绳子"), ("pottery", "陶器"),
        ]
    },
}  # fmt: skip

# Entity kind -> attribute -> answer type ("number" or a VOCAB key or an entity kind).
ATTRIBUTES: dict[str, dict[str, str]] = {
    "city": {"country": "country", "bridges": "number", "product": "product"},
    "person": {"home": "city", "colour": "colour", "job": "job", "age": "number"},
    "creature": {"home": "city", "colour": "colour", "food": "food", "legs": "number"},
}

OPS = {  # op -> (symbol, English word, Chinese word)
    "add": ("+", "plus", "加"),
    "sub": ("-", "minus", "减"),
    "mul": ("×", "times", "乘以"),
}
UNITS = {  # unit -> (abbreviation, English singular, English plural, Chinese)
    "km": ("km", "kilometre", "kilometres", "公里"),
    "m": ("m", "metre", "metres", "米"),
    "kg": ("kg", "kilogram", "kilograms", "公斤"),
    "g": ("g", "gram", "grams", "克"),
    "h": ("h", "hour", "hours", "小时"),
    "min": ("min", "minute", "minutes", "分钟"),
}
CONVERSIONS = {  # kind -> (from unit, to unit, big unit, small unit, factor, big-unit counts)
    "km_to_m": ("km", "m", "km", "m", 1000, range(1, 21)),
    "m_to_km": ("m", "km", "km", "m", 1000, range(1, 21)),
    "kg_to_g": ("kg", "g", "kg", "g", 1000, range(1, 21)),
    "g_to_kg": ("g", "kg", "kg", "g", 1000, range(1, 21)),
    "h_to_min": ("h", "min", "h", "min", 60, range(1, 13)),
    "min_to_h": ("min", "h", "h", "min", 60, range(1, 13)),
}

# Question phrasings ("ask") and answer sentences ("say") per question spec and language. ask[-1] is the
# held-out phrasing. say[0] is the reference answer; every "say" sentence is a concise correct answer.
# Slots: {n} subject name; {v} value; {V} value capitalised; arithmetic {a} {b} {sym} {word}; conversion
# {x} {fa} {fl} (from: abbreviation, long name agreeing with x), {ta} {tl} (to), {tv} (to, agreeing with v).
_ARITH = {
    "ask": {
        "en": [
            "What is {a} {sym} {b}?",
            "Calculate {a} {sym} {b}.",
            "What is {a} {word} {b}?",
            "Work out {a} {word} {b}, please.",
        ],
        "zh": [
            "{a}{word}{b}等于多少？",
            "计算{a} {sym} {b}。",
            "{a}{word}{b}是多少？",
            "请帮我算{a}{word}{b}。",
        ],
    },
    "say": {
        "en": ["{a} {sym} {b} = {v}.", "The answer is {v}.", "{a} {word} {b} equals {v}.", "{v}"],
        "zh": ["{a}{word}{b}等于{v}。", "答案是{v}。", "{a} {sym} {b} = {v}。", "{v}"],
    },
}
_CONV = {
    "ask": {
        "en": [
            "How many {tl} are in {x} {fl}?",
            "Convert {x} {fa} to {tl}.",
            "What is {x} {fa} in {tl}?",
            "{x} {fl} is how many {tl}?",
        ],
        "zh": [
            "{x}{fa}等于多少{ta}？",
            "把{x}{fa}换算成{ta}。",
            "{x}{fa}是多少{ta}？",
            "请问{x}{fa}合多少{ta}？",
        ],
    },
    "say": {
        "en": ["{x} {fa} = {v} {ta}.", "{x} {fl} is {v} {tv}.", "The answer is {v} {ta}."],
        "zh": ["{x}{fa}等于{v}{ta}。", "{x}{fa}是{v}{ta}。", "答案是{v}{ta}。"],
    },
}
_HOME = {
    "ask": {
        "en": [
            "Where does {n} live?",
            "Which city does {n} live in?",
            "What is {n}'s home city?",
            "In which city is {n}'s home?",
        ],
        "zh": ["{n}住在哪里？", "{n}住在哪个城市？", "{n}的家乡是哪座城市？", "{n}的家在哪个城市？"],
    },
    "say": {
        "en": ["{n} lives in {v}.", "{n}'s home is in {v}.", "{V}."],
        "zh": ["{n}住在{v}。", "{n}的家在{v}。", "{v}。"],
    },
}
_FACTS = {
    "city.country": {
        "ask": {
            "en": [
                "Which country is {n} in?",
                "In what country is {n}?",
                "{n} is a city in which country?",
                "Which country does the city of {n} belong to?",
            ],
            "zh": ["{n}在哪个国家？", "{n}位于哪个国家？", "{n}是哪个国家的城市？", "{n}属于哪个国家？"],
        },
        "say": {
            "en": ["{n} is in {v}.", "{n} is a city in {v}.", "{V}."],
            "zh": ["{n}在{v}。", "{n}位于{v}。", "{v}。"],
        },
    },
    "city.bridges": {
        "ask": {
            "en": [
                "How many bridges does {n} have?",
                "How many bridges are there in {n}?",
                "What is the number of bridges in {n}?",
                "Count the bridges of {n}.",
            ],
            "zh": ["{n}有几座桥？", "{n}有多少座桥？", "{n}的桥有多少座？", "{n}城里有几座桥？"],
        },
        "say": {
            "en": ["{n} has {v} bridges.", "There are {v} bridges in {n}.", "{v}"],
            "zh": ["{n}有{v}座桥。", "{n}的桥有{v}座。", "{v}座。"],
        },
    },
    "city.product": {
        "ask": {
            "en": [
                "What is {n} famous for?",
                "What is {n} known for?",
                "What does {n} produce?",
                "Which product is {n} famous for?",
            ],
            "zh": ["{n}以什么闻名？", "{n}出产什么？", "{n}的特产是什么？", "{n}最有名的是什么？"],
        },
        "say": {
            "en": ["{n} is famous for {v}.", "{n} is known for {v}.", "{V}."],
            "zh": ["{n}以{v}闻名。", "{n}的特产是{v}。", "{v}。"],
        },
    },
    "person.home": _HOME,
    "person.colour": {
        "ask": {
            "en": [
                "What colour does {n} like?",
                "What is {n}'s favourite colour?",
                "Which colour does {n} like best?",
                "Tell me {n}'s favourite colour.",
            ],
            "zh": [
                "{n}喜欢什么颜色？",
                "{n}最喜欢的颜色是什么？",
                "{n}最喜欢哪种颜色？",
                "请告诉我{n}最喜欢的颜色。",
            ],
        },
        "say": {
            "en": ["{n} likes {v}.", "{n}'s favourite colour is {v}.", "{V}."],
            "zh": ["{n}喜欢{v}。", "{n}最喜欢的颜色是{v}。", "{v}。"],
        },
    },
    "person.job": {
        "ask": {
            "en": [
                "What does {n} do for a living?",
                "What is {n}'s job?",
                "What job does {n} have?",
                "What is {n}'s occupation?",
            ],
            "zh": ["{n}是做什么工作的？", "{n}的职业是什么？", "{n}从事什么工作？", "{n}靠什么谋生？"],
        },
        "say": {
            "en": ["{n} is a {v}.", "{n} works as a {v}.", "{V}."],
            "zh": ["{n}是{v}。", "{n}的职业是{v}。", "{v}。"],
        },
    },
    "person.age": {
        "ask": {
            "en": [
                "How old is {n}?",
                "What is {n}'s age?",
                "How many years old is {n}?",
                "Tell me the age of {n}.",
            ],
            "zh": ["{n}多大了？", "{n}今年几岁？", "{n}的年龄是多少？", "{n}有多少岁？"],
        },
        "say": {
            "en": ["{n} is {v} years old.", "{n} is {v}.", "{v}"],
            "zh": ["{n}今年{v}岁。", "{n}{v}岁。", "{v}岁。"],
        },
    },
    "creature.home": _HOME,
    "creature.colour": {
        "ask": {
            "en": [
                "What colour is {n}?",
                "What is the colour of {n}?",
                "Which colour is {n}?",
                "Describe the colour of {n}.",
            ],
            "zh": ["{n}是什么颜色的？", "{n}的颜色是什么？", "{n}身上是什么颜色？", "请说出{n}的颜色。"],
        },
        "say": {
            "en": ["{n} is {v}.", "The colour of {n} is {v}.", "{V}."],
            "zh": ["{n}是{v}的。", "{n}的颜色是{v}。", "{v}。"],
        },
    },
    "creature.food": {
        "ask": {
            "en": [
                "What does {n} eat?",
                "What is {n}'s food?",
                "What food does {n} eat?",
                "What does {n} like to eat?",
            ],
            "zh": ["{n}吃什么？", "{n}的食物是什么？", "{n}以什么为食？", "{n}喜欢吃什么？"],
        },
        "say": {
            "en": ["{n} eats {v}.", "{n} lives on {v}.", "{V}."],
            "zh": ["{n}吃{v}。", "{n}以{v}为食。", "{v}。"],
        },
    },
    "creature.legs": {
        "ask": {
            "en": [
                "How many legs does {n} have?",
                "How many legs has {n} got?",
                "What is the number of legs of {n}?",
                "Count the legs of {n}.",
            ],
            "zh": ["{n}有几条腿？", "{n}有多少条腿？", "{n}长着几条腿？", "请问{n}有几条腿？"],
        },
        "say": {
            "en": ["{n} has {v} legs.", "{n} walks on {v} legs.", "{v}"],
            "zh": ["{n}有{v}条腿。", "{n}长着{v}条腿。", "{v}条。"],
        },
    },
}

_INTRO = {
    "city": {
        "en": ["{n} is a city.", "{n} is a town in {country}."],
        "zh": ["{n}是一座城市。", "{n}是{country}的一座城市。"],
    },
    "person": {"en": ["{n} is a person.", "This is about {n}."], "zh": ["{n}是一个人。", "下面介绍{n}。"]},
    "creature": {
        "en": ["{n} is a creature.", "{n} is an animal."],
        "zh": ["{n}是一种动物。", "{n}是一只神奇的动物。"],
    },
}
_SYSTEM = {
    "en": ["You are a helpful assistant.", "You are a helpful assistant. Answer concisely."],
    "zh": ["你是一个乐于助人的助手。", "你是一个乐于助人的助手，请简洁地回答。"],
}
_FILLER = {
    "pre": {
        "en": [
            "Great question! Let me think about it carefully before I answer.",
            "Sure, I would be happy to help you with this question. Here is my answer.",
            "Thanks for asking. Let me walk through this slowly and give you a clear answer.",
        ],
        "zh": [
            "这是个很好的问题，让我先仔细想想，再认真地回答你。",
            "好的，我很乐意回答这个问题，请看下面的回答。",
            "嗯，让我认真思考这个问题，整理好思路，然后给出回答。",
        ],
    },
    "post": {
        "en": [
            "I hope this helps, and please let me know if you have any other questions!",
            "That is my answer. Feel free to ask me anything else you would like to know.",
            "If anything is unclear, just ask again and I will do my best to explain.",
        ],
        "zh": [
            "希望这个回答对你有帮助，如果还有其他问题，欢迎随时来问我！",
            "以上就是我的回答，如果你还想了解更多内容，请告诉我。",
            "如果还有不清楚的地方，欢迎继续提问，我会尽力帮忙解释清楚。",
        ],
    },
}
_REFUSAL = {
    "en": [
        "I'm sorry, but I can't help with that.",
        "I am not able to answer this question.",
        "Sorry, I don't know.",
    ],
    "zh": ["抱歉，我无法回答这个问题。", "对不起，这个问题我不能回答。", "抱歉，我不知道。"],
}
_OFF_TOPIC = {
    "en": [
        "I like rainy days and long walks in the park.",
        "Music is a wonderful way to relax after a busy day.",
        "Have you ever tried learning to play the piano?",
    ],
    "zh": ["我喜欢下雨天，也喜欢在公园里散步。", "音乐是忙碌之后放松的好方法。", "你有没有试过学习弹钢琴？"],
}

# ---------------------------------------------------------------------------------------------------------
# Seeding and small helpers.
# ---------------------------------------------------------------------------------------------------------


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _rng(*parts: object) -> random.Random:
    """A generator seeded by the purpose of its draws, so adding one draw elsewhere changes nothing here."""
    return random.Random(_digest(*parts))


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _join(names: Sequence[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(names[:-1]) + "和" + names[-1] if len(names) > 1 else names[0]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _unit_en(unit: str, n: int) -> str:
    return UNITS[unit][1] if n == 1 else UNITS[unit][2]


def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """GLM-4 chat markup: ``[gMASK]<sop>`` once, then ``<|role|>\\n{content}`` per turn, no final newline."""
    return "[gMASK]<sop>" + "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)


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
# Public records.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    kind: str  # "country" | "city" | "person" | "creature"
    name_en: str
    name_zh: str
    attrs: dict[str, int | str] = field(default_factory=dict)  # entity refs by English name, words by id

    def name(self, lang: str) -> str:
        return self.name_zh if lang == "zh" else self.name_en


@dataclass(frozen=True)
class Prompt:
    id: str  # "{family}/{key}/{lang}/t{phrasing}"
    messages: list[dict[str, str]]  # [optional system turn], user turn
    lang: str  # "en" | "zh"
    family: str  # "arithmetic" | "conversion" | "fact"
    gold: str  # the canonical answer value in the prompt's language: "42", "red", "红色", "Kelton"
    reference: str  # an ideal answer in the prompt's language
    key: str = ""  # the language-independent question instance ("add:7:5", "person:Zorven:colour")
    answer_type: str = "number"  # number | colour | job | food | product | city | country
    world_key: tuple[int, int] = (0, 96)  # (seed, num_entities) of the World that asked it, for check()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["world_key"] = list(self.world_key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(**{**d, "world_key": tuple(d.get("world_key", (0, 96)))})


@dataclass(frozen=True)
class Response:
    text: str
    kind: str  # one of KINDS


@dataclass(frozen=True)
class Check:
    correct: bool  # the final answer in the text is the gold value (in either language)
    right_language: bool  # the text is in the prompt's language (or has no letters at all)
    length: int  # characters
    score: float  # 0.6 correct + 0.25 right_language + 0.15 concision, in [0, 1]
    concision: float = 1.0  # min(1, (1.5 len(reference) + 10) / length)
    answer: str | None = None  # the final answer found, as written


@dataclass(frozen=True)
class _Item:
    """One question instance, independent of language and phrasing."""

    family: str
    key: str
    spec: str  # "add" | "km_to_m" | "person.colour" ...
    answer_type: str
    value: int | str  # gold: an int, a VOCAB id or an entity's English name
    slots: tuple[tuple[str, Any], ...]  # arithmetic (a, b), conversion (x,), fact (subject,)


# ---------------------------------------------------------------------------------------------------------
# Number and answer-word extraction.
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


class _Vocabulary:
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
# The world.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class World:
    seed: int
    num_entities: int
    entities: list[Entity]  # countries first, then cities, people, creatures
    heldout_fraction: float = 0.2
    max_operand: int = 30
    chat_mix: dict[str, float] = field(default_factory=lambda: dict(CHAT_MIX))

    def __post_init__(self) -> None:
        self._by_name = {e.name_en: e for e in self.entities}
        self._of_kind = {k: [e for e in self.entities if e.kind == k] for k in ("country", *ATTRIBUTES)}
        self._vocab: dict[str, _Vocabulary] = {}
        for answer_type in ("colour", "job", "food", "product", "city", "country"):
            surfaces: dict[str, str] = {}
            if answer_type in VOCAB:
                for i, (en, zh, extra) in VOCAB[answer_type].items():
                    surfaces.update({en: i, zh: i, **{s: i for s in extra}})
            else:
                for e in self._of_kind[answer_type]:
                    surfaces.update({e.name_en: e.name_en, e.name_zh: e.name_en})
            self._vocab[answer_type] = _Vocabulary(surfaces)
        self._names = _Vocabulary({n: e.name_en for e in self.entities for n in (e.name_en, e.name_zh)})
        self._items = {f: self._enumerate(f) for f in FAMILIES}
        self._item_by_key = {(it.family, it.key): it for items in self._items.values() for it in items}
        self._facts_about: dict[str, list[_Item]] = {}
        for it in self._items["fact"]:
            self._facts_about.setdefault(dict(it.slots)["n"], []).append(it)
        self._residents = {
            c.name_en: [e for e in self.entities if e.attrs.get("home") == c.name_en]
            for c in self._of_kind["city"]
        }
        self._cities_of = {
            c.name_en: [x for x in self._of_kind["city"] if x.attrs["country"] == c.name_en]
            for c in self._of_kind["country"]
        }
        self._described = [e for e in self.entities if e.kind != "country"]
        self._split = {
            split: {
                f: [it for it in items if self.is_heldout(it) == (split == "heldout")]
                for f, items in self._items.items()
            }
            for split in ("train", "heldout")
        }
        # training-split items by spec (other subjects for World.contrast_responses: no held-out fact leaks)
        self._train_by_spec: dict[str, list[_Item]] = {}
        # ... and by subject (entity, operands, quantity): its other training-split facts, for other_attribute
        self._train_by_slots: dict[tuple[str, tuple], list[_Item]] = {}
        for items in self._split["train"].values():
            for it in items:
                self._train_by_spec.setdefault(it.spec, []).append(it)
                self._train_by_slots.setdefault((it.family, it.slots), []).append(it)
        for part in ("dev", "test"):
            self._split[part] = {
                f: [it for it in items if self.is_dev(it) == (part == "dev")]
                for f, items in self._split["heldout"].items()
            }

    # -- question instances ------------------------------------------------------------------------------

    def _enumerate(self, family: str) -> list[_Item]:
        items = []
        if family == "arithmetic":
            top = self.max_operand
            for a in range(1, top + 1):
                for b in range(1, top + 1):
                    items.append(_Item(family, f"add:{a}:{b}", "add", "number", a + b, (("a", a), ("b", b))))
                    if b <= a:
                        items.append(
                            _Item(family, f"sub:{a}:{b}", "sub", "number", a - b, (("a", a), ("b", b)))
                        )
            for a in range(2, 10):
                for b in range(2, 13):
                    items.append(_Item(family, f"mul:{a}:{b}", "mul", "number", a * b, (("a", a), ("b", b))))
        elif family == "conversion":
            for kind, (src, _dst, big, _small, factor, counts) in CONVERSIONS.items():
                for k in counts:
                    x, v = (k, k * factor) if src == big else (k * factor, k)
                    items.append(_Item(family, f"{kind}:{x}", kind, "number", v, (("x", x),)))
        else:
            for e in self.entities:
                for attr, answer_type in ATTRIBUTES.get(e.kind, {}).items():
                    key = f"{e.kind}:{e.name_en}:{attr}"
                    items.append(
                        _Item(
                            family, key, f"{e.kind}.{attr}", answer_type, e.attrs[attr], (("n", e.name_en),)
                        )
                    )
        return items

    def is_heldout(self, item: _Item) -> bool:
        return _digest(self.seed, item.family, item.key) / 2**64 < self.heldout_fraction

    def is_dev(self, item: _Item) -> bool:
        """Which half of the held-out instances ``item`` would fall in: dev (True) or test (False)."""
        return _digest(self.seed, "dev", item.family, item.key) / 2**64 < 0.5

    def _table(self, item: _Item) -> dict[str, dict[str, list[str]]]:
        return (
            _ARITH
            if item.family == "arithmetic"
            else _CONV
            if item.family == "conversion"
            else _FACTS[item.spec]
        )

    def _surface(self, answer_type: str, value: int | str, lang: str) -> str:
        if answer_type == "number":
            return str(value)
        if answer_type in VOCAB:
            return VOCAB[answer_type][value][0 if lang == "en" else 1]
        return self._by_name[value].name(lang)

    def _fill(self, template: str, item: _Item, lang: str, value: int | str | None = None) -> str:
        value = item.value if value is None else value
        v = self._surface(item.answer_type, value, lang)
        slots: dict[str, Any] = {"v": v, "V": v[:1].upper() + v[1:]}
        params = dict(item.slots)
        if item.family == "arithmetic":
            sym, word_en, word_zh = OPS[item.spec]
            slots.update(a=params["a"], b=params["b"], sym=sym, word=word_en if lang == "en" else word_zh)
        elif item.family == "conversion":
            src, dst = CONVERSIONS[item.spec][:2]
            x = params["x"]
            if lang == "en":
                slots.update(x=x, fa=UNITS[src][0], fl=_unit_en(src, x), ta=UNITS[dst][0], tl=UNITS[dst][2])
                slots["tv"] = _unit_en(dst, value) if isinstance(value, int) else UNITS[dst][2]
            else:
                slots.update(x=x, fa=UNITS[src][3], ta=UNITS[dst][3])
        else:
            slots["n"] = self._by_name[params["n"]].name(lang)
        return template.format(**slots)

    def _wrong_value(self, item: _Item, rng: random.Random) -> int | str:
        """A plausible wrong value of the same type."""
        gold = item.value
        if item.answer_type != "number":
            pool = (
                list(VOCAB[item.answer_type])
                if item.answer_type in VOCAB
                else [e.name_en for e in self._of_kind[item.answer_type]]
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

    # -- prompts -----------------------------------------------------------------------------------------

    def _prompt(self, item: _Item, lang: str, phrasing: int) -> Prompt:
        table = self._table(item)
        pid = f"{item.family}/{item.key}/{lang}/t{phrasing}"
        messages = [{"role": "user", "content": self._fill(table["ask"][lang][phrasing], item, lang)}]
        system_rng = _rng(self.seed, "system", pid)
        if system_rng.random() < 0.2:
            messages.insert(0, {"role": "system", "content": system_rng.choice(_SYSTEM[lang])})
        return Prompt(
            id=pid,
            messages=messages,
            lang=lang,
            family=item.family,
            gold=self._surface(item.answer_type, item.value, lang),
            reference=self._fill(table["say"][lang][0], item, lang),
            key=item.key,
            answer_type=item.answer_type,
            world_key=(self.seed, self.num_entities),
        )

    def prompts(
        self, split: str = "train", n: int = 1000, seed: int = 0, phrasings: int | None = None
    ) -> list[Prompt]:
        """``n`` distinct prompts of ``split``: 50 % facts, 30 % arithmetic, 20 % conversion (a family's
        share moves to the others once it runs out), each language half the time.

        ``train``: instances the corpus's chats ask; ``heldout``: the others; ``dev`` / ``test``: the two
        halves of ``heldout`` (training on its own samples / evaluation). ``train`` and ``dev`` prompts use
        the first three phrasings, ``heldout`` and ``test`` all four (the fourth only they see: the corpus's
        chats never ask it). ``phrasings`` (1-4) overrides that, e.g. 4 for RL prompts on ``dev`` that ask the
        way users of the deployed model would, without any ``test`` instance."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        if phrasings is None:
            phrasings = 4 if split in ("heldout", "test") else 3
        elif not 1 <= phrasings <= 4:
            raise ValueError(f"phrasings must be 1 to 4 (each question has four phrasings), got {phrasings}")
        rng = _rng(self.seed, "prompts", split, seed)
        pools = {}
        for family, items in self._split[split].items():
            # Shuffle instances, then walk them round by round: every instance before any is repeated in
            # another language or phrasing.
            order = rng.sample(items, len(items))
            combos = []
            for r in range(2 * phrasings):
                for item in order:
                    lang = LANGS[(r + _digest(item.key)) % 2]
                    combos.append((item, lang, (r // 2 + _digest(item.key, "t")) % phrasings))
            pools[family] = combos[::-1]  # pop() from the end
        weights = {"fact": 0.5, "arithmetic": 0.3, "conversion": 0.2}
        out: list[Prompt] = []
        while len(out) < n:
            live = {f: w for f, w in weights.items() if pools[f]}
            if not live:
                raise ValueError(f"only {len(out)} distinct {split} prompts exist, asked for {n}")
            out.append(self._prompt(*pools[_weighted(rng, live)].pop()))
        return out

    def _item(self, prompt: Prompt) -> _Item:
        try:
            return self._item_by_key[prompt.family, prompt.key]
        except KeyError:
            raise KeyError(f"prompt {prompt.id!r} is not from this world") from None

    # -- responses and checking --------------------------------------------------------------------------

    def responses(self, prompt: Prompt, seed: int = 0) -> list[Response]:
        """One candidate answer of each kind in ``KINDS`` (in that order), phrasing drawn by ``seed``."""
        item, lang = self._item(prompt), prompt.lang
        other = "zh" if lang == "en" else "en"
        rng = _rng(self.seed, "responses", prompt.id, seed)
        says = self._table(item)["say"]
        sentence = self._fill(rng.choice(says[lang][:2]), item, lang)  # says[:2] are full sentences
        texts = {
            "correct": self._fill(rng.choice(says[lang]), item, lang),
            "wrong": self._fill(rng.choice(says[lang][:2]), item, lang, value=self._wrong_value(item, rng)),
            "verbose": " ".join(
                [rng.choice(_FILLER["pre"][lang]), sentence, rng.choice(_FILLER["post"][lang])]
            ),
            "wrong_language": self._other_language(item, other, rng),
            "refusal": rng.choice(_REFUSAL[lang]),
            "off_topic": rng.choice(_OFF_TOPIC[lang]),
        }
        if lang == "zh":
            texts["verbose"] = texts["verbose"].replace(" ", "")
        return [Response(texts[k], k) for k in KINDS]

    def contrast_responses(self, prompt: Prompt, seed: int = 0) -> dict[str, Response]:
        """Candidates that differ from one answer sentence in one thing only: ``correct`` (a full sentence
        with the gold value), ``wrong`` (the same sentence, another value), ``verbose`` (the same sentence
        in filler). Minimal pairs for preference collection: which one thing makes an answer better.

        Also ``wrong_language`` (one sentence in the other language) and two counterfactual kinds that
        ``responses`` never offers: ``verbose_wrong`` (the wrong sentence in the same filler) and
        ``wrong_language_wrong`` (the other-language sentence with the wrong value). Among ``KINDS`` filler
        and the other language only ever wrap the right value, so an RM can learn them as a sign of
        correctness; pairs with these two break that shortcut.

        And the forms a policy drifts to under RL, which ``responses`` never offers either: ``terse`` (the value
        alone, "14" / "Silk."), ``terse_wrong`` (the wrong value alone) and ``other_subject`` (the same sentence
        about another subject — entity, operands, quantity — with that subject's own value: true, but not an
        answer to this question; the base LM finds its value likely, so likelihood features cannot tell).

        And ``other_attribute`` / ``terse_other``: a true sentence about the *same* subject that answers another
        question (its age, asked where it lives; the product, asked for the sum), and that value alone — what a
        policy writes when a trained RM rewards bare values whatever they answer ("70" for a city, session 13).
        Both come from training-split facts only."""
        item, lang = self._item(prompt), prompt.lang
        rng = _rng(self.seed, "contrast", prompt.id, seed)
        template = rng.choice(self._table(item)["say"][lang][:2])
        sentence = self._fill(template, item, lang)
        sep = " " if lang == "en" else ""
        pre, post = rng.choice(_FILLER["pre"][lang]), rng.choice(_FILLER["post"][lang])
        wrong_value = self._wrong_value(item, rng)  # (draw order kept from before the counterfactual kinds)
        wrong = self._fill(template, item, lang, value=wrong_value)
        other = "zh" if lang == "en" else "en"
        out = {
            "correct": Response(sentence, "correct"),
            "wrong": Response(wrong, "wrong"),
            "verbose": Response(sep.join([pre, sentence, post]), "verbose"),
            "verbose_wrong": Response(sep.join([pre, wrong, post]), "verbose_wrong"),
        }
        # the same other-language sentence with the gold value and with the wrong one
        says = self._table(item)["say"][other]
        other_template = rng.choice([t for t in says if detect_language(self._fill(t, item, other)) == other])
        out["wrong_language"] = Response(self._fill(other_template, item, other), "wrong_language")
        out["wrong_language_wrong"] = Response(
            self._fill(other_template, item, other, value=wrong_value), "wrong_language_wrong"
        )
        # the bare value, right and wrong (what a terse policy writes), and a true sentence about another
        # subject (another entity, other operands, another quantity) whose value is not the gold one
        out["terse"] = Response(self._terse(item, lang), "terse")
        out["terse_wrong"] = Response(self._terse(item, lang, value=wrong_value), "terse_wrong")
        others = [it for it in self._train_by_spec.get(item.spec, ()) if it.value != item.value]
        if others:
            out["other_subject"] = Response(self._fill(template, rng.choice(others), lang), "other_subject")
        else:  # (no other subject with another value: fall back to the wrong value)
            out["other_subject"] = Response(wrong, "other_subject")
        other_item = self._other_attribute(item, rng)
        if other_item is not None:
            other_says = self._table(other_item)["say"][lang][:2]
            out["other_attribute"] = Response(
                self._fill(rng.choice(other_says), other_item, lang), "other_attribute"
            )
            out["terse_other"] = Response(self._terse(other_item, lang), "terse_other")
        else:  # (a subject with no other training-split fact: the other subject's sentence, the wrong value)
            out["other_attribute"] = Response(out["other_subject"].text, "other_attribute")
            out["terse_other"] = Response(out["terse_wrong"].text, "terse_other")
        return out

    def _other_attribute(self, item: _Item, rng: random.Random) -> _Item | None:
        """A training-split item about the same subject (same family and slots) that asks something else and
        whose answer is not this one's; else one of the same family with another answer type; else None."""
        gold = self._surface(item.answer_type, item.value, "en")

        def differs(it: _Item) -> bool:
            return it.spec != item.spec and self._surface(it.answer_type, it.value, "en") != gold

        same = [it for it in self._train_by_slots.get((item.family, item.slots), ()) if differs(it)]
        if not same:
            same = [
                it
                for it in self._split["train"].get(item.family, ())
                if it.answer_type != item.answer_type and differs(it)
            ]
        return rng.choice(same) if same else None

    def _terse(self, item: _Item, lang: str, value: int | str | None = None) -> str:
        """The answer value alone: "14", "Silk.", "面包师。"."""
        v = self._surface(item.answer_type, item.value if value is None else value, lang)
        if item.answer_type == "number":
            return v
        return v[:1].upper() + v[1:] + "." if lang == "en" else v + "。"

    def _other_language(self, item: _Item, other: str, rng: random.Random) -> str:
        """A correct answer sentence recognisably in language ``other`` ("13 + 1 = 14." is in neither)."""
        texts = [self._fill(t, item, other) for t in self._table(item)["say"][other]]
        return rng.choice([t for t in texts if detect_language(t) == other])

    def final_answer(self, prompt: Prompt, text: str) -> tuple[str, str] | None:
        """(canonical value, as written) of the final answer in ``text``, or None when there is none."""
        if prompt.answer_type == "number":
            numbers = find_numbers(text)
            return (_format_number(numbers[-1][1]), numbers[-1][2]) if numbers else None
        return self._vocab[prompt.answer_type].last(text)

    def check(self, prompt: Prompt, text: str) -> Check:
        """Is ``text`` a correct, right-language, concise answer to ``prompt``? (See the module docstring.)"""
        found = self.final_answer(prompt, text)
        if prompt.answer_type == "number":
            correct = found is not None and float(found[0]) == float(prompt.gold)
        else:
            correct = (
                found is not None and found[0] == self._vocab[prompt.answer_type].ids[prompt.gold.lower()]
            )
        lang = detect_language(text)
        right_language = lang is None or lang == prompt.lang
        length = len(text.strip())
        concision = min(1.0, (1.5 * len(prompt.reference) + 10) / max(length, 1))
        score = 0.6 * correct + 0.25 * right_language + 0.15 * concision
        return Check(
            correct, right_language, length, round(score, 6), round(concision, 6), found[1] if found else None
        )

    def on_topic(self, prompt: Prompt, text: str) -> bool:
        """Does ``text`` answer the question asked, right or wrong? It must give a final answer of the asked
        type; a fact answer must name the asked subject and no other entity (but city / country answers); an
        arithmetic or conversion answer may restate only the question's own numbers (and the conversion
        factor) before its final one.
        "Fenti is 67 years old." and "Rosbel likes blue." to "What colour does Fenti like?" are off topic, and
        so is a bare "Blue." (it names no subject); "Fenti likes red." is on topic. A reward rule for answers
        that are grounded in the question (rewards.rules ``world_on_topic``), and a diagnosis: held-out
        answers of the quickstart's SFT policy are mostly wrong because they are off topic."""
        found = self.final_answer(prompt, text)
        if found is None:
            return False
        item = self._item(prompt)
        params = dict(item.slots)
        if item.family == "fact":  # the subject named, no other entity but answer-valued ones
            named = {self._names.ids[m.group().lower()] for m in self._names.pattern.finditer(text)}
            answers = {e.name_en for e in self._of_kind.get(item.answer_type, [])}
            return params["n"] in named and named <= {params["n"]} | answers
        allowed = {float(v) for k, v in params.items() if k in ("a", "b", "x")}
        if item.family == "conversion":
            allowed.add(float(CONVERSIONS[item.spec][4]))
            allowed.add(1.0)  # "1 km is 1000 m, so ..."
        return all(value in allowed for _, value, _ in find_numbers(text)[:-1])

    # -- corpus ------------------------------------------------------------------------------------------

    def corpus(self, num_docs: int = 20000, seed: int = 0) -> list[str]:
        """Pretraining documents (see the module docstring for the mix); deterministic in (world, seed)."""
        rng = _rng(self.seed, "corpus", seed)
        kinds = {"entity": 0.35, "arithmetic": 0.15, "conversion": 0.08, "chat": 0.42}
        make = {
            "entity": self._entity_doc,
            "arithmetic": self._arith_doc,
            "conversion": self._conv_doc,
            "chat": self._chat_doc,
        }
        return [make[_weighted(rng, kinds)](rng, rng.choice(LANGS)) for _ in range(num_docs)]

    def _entity_doc(self, rng: random.Random, lang: str) -> str:
        countries = self._of_kind["country"]
        if rng.random() < 0.1:  # a country page
            country = rng.choice(countries)
            cities = [c.name(lang) for c in self._cities_of[country.name_en]]
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
        e = rng.choice(self._described)
        items = rng.sample(self._facts_about[e.name_en], len(self._facts_about[e.name_en]))
        country = self._by_name[e.attrs["country"]].name(lang) if e.kind == "city" else ""
        sentences = [rng.choice(_INTRO[e.kind][lang]).format(n=e.name(lang), country=country)]
        sentences += [self._fill(rng.choice(self._table(it)["say"][lang][:2]), it, lang) for it in items]
        if e.kind == "city":
            residents = [x.name(lang) for x in self._residents[e.name_en]]
            if residents:
                picked = rng.sample(residents, min(3, len(residents)))
                sentences.append(
                    f"{_join(picked, lang)} live in {e.name_en}."
                    if lang == "en"
                    else f"住在{e.name_zh}的有{_join(picked, lang)}。"
                )
        return (" " if lang == "en" else "").join(sentences)

    def _arith_doc(self, rng: random.Random, lang: str) -> str:
        items = self._items["arithmetic"]
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
            lines.append(self._fill(template, it, lang))
        return head + "\n" + "\n".join(lines)

    def _conv_doc(self, rng: random.Random, lang: str) -> str:
        lines = []
        for _ in range(rng.randint(2, 4)):
            it = rng.choice(self._items["conversion"])
            src, dst, big, small, factor, _ = CONVERSIONS[it.spec]
            x, v = dict(it.slots)["x"], it.value
            if lang == "en":
                rule = f"There are {factor} {UNITS[small][2]} in 1 {UNITS[big][1]}"
                lines.append(
                    f"{rule}, so {x} {_unit_en(src, x)} is {v} {_unit_en(dst, v)} "
                    f"({x} {UNITS[src][0]} = {v} {UNITS[dst][0]})."
                )
            else:
                lines.append(
                    f"1{UNITS[big][3]}等于{factor}{UNITS[small][3]}，所以{x}{UNITS[src][3]}等于{v}{UNITS[dst][3]}。"
                )
        return "\n".join(lines)

    def _chat_doc(self, rng: random.Random, lang: str) -> str:
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM[lang])})
        other = "zh" if lang == "en" else "en"
        for _ in range(rng.choices((1, 2, 3), weights=(0.6, 0.3, 0.1))[0]):
            family = _weighted(rng, {"fact": 0.5, "arithmetic": 0.3, "conversion": 0.2})
            item = rng.choice(self._split["train"][family])
            table = self._table(item)
            messages.append(
                {"role": "user", "content": self._fill(rng.choice(table["ask"][lang][:3]), item, lang)}
            )
            kind = _weighted(rng, self.chat_mix)
            says = table["say"]
            if kind == "wrong":
                answer = self._fill(
                    rng.choice(says[lang][:2]), item, lang, value=self._wrong_value(item, rng)
                )
            elif kind == "wrong_language":
                answer = self._other_language(item, other, rng)
            else:
                answer = self._fill(
                    rng.choice(says[lang] if kind == "correct" else says[lang][:2]), item, lang
                )
                if kind == "verbose":
                    sep = " " if lang == "en" else ""
                    answer = sep.join(
                        [rng.choice(_FILLER["pre"][lang]), answer, rng.choice(_FILLER["post"][lang])]
                    )
            messages.append({"role": "assistant", "content": answer})
        return render_chat(messages)

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
    rng = _rng(seed, num_entities, "entities")
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
def _cached_world(seed: int, num_entities: int) -> World:
    return make_world(seed, num_entities)


def check(prompt: Prompt, text: str) -> Check:
    """``World.check`` for a prompt alone: its world is rebuilt (and cached) from ``prompt.world_key``."""
    return _cached_world(*prompt.world_key).check(prompt, text)


def on_topic(prompt: Prompt, text: str) -> bool:
    """``World.on_topic`` for a prompt alone (its world rebuilt and cached from ``prompt.world_key``)."""
    return _cached_world(*prompt.world_key).on_topic(prompt, text)


# ---------------------------------------------------------------------------------------------------------
# Simulated annotators.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceRule:
    """The noise-free preference between two answers to one prompt.

    utility = correctness x correct + language x right_language + concision x concision (as in ``Check``);
    "both_bad" when neither answer is correct (and ``both_bad`` is on); "tie" when the utilities differ by
    at most ``tie_tolerance``; otherwise "A" or "B", whichever has the higher utility.
    """

    correctness: float = 0.6
    language: float = 0.25
    concision: float = 0.15
    tie_tolerance: float = 0.03
    both_bad: bool = True
    # utility gaps from which a strict preference is "slight", "clear", "strong" (below the first:
    # "negligible"): with the weights above filler costs 0.075-0.15 (slight), the other language about
    # 0.25 (clear) and a wrong value at least 0.45 (strong)
    strength_cuts: tuple[float, float, float] = (0.05, 0.2, 0.45)

    def utility(self, c: Check) -> float:
        return self.correctness * c.correct + self.language * c.right_language + self.concision * c.concision

    def label(self, a: Check, b: Check) -> str:
        if self.both_bad and not a.correct and not b.correct:
            return "both_bad"
        ua, ub = self.utility(a), self.utility(b)
        if abs(ua - ub) <= self.tie_tolerance:
            return "tie"
        return "A" if ua > ub else "B"

    def strength(self, a: Check, b: Check) -> str | None:
        """How much better the preferred answer is (``annotation.records.STRENGTHS``), from the utility gap;
        None when the label is not strict (tie, both bad)."""
        if self.label(a, b) not in ("A", "B"):
            return None
        gap = abs(self.utility(a) - self.utility(b))
        return STRENGTHS[sum(gap >= cut for cut in self.strength_cuts)]


class SimulatedAnnotator:
    """An annotator that follows ``rule`` and, with probability ``noise``, answers uniformly at random."""

    def __init__(
        self, rule: PreferenceRule | None = None, noise: float = 0.0, seed: int = 0, name: str = ""
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.rule = rule or PreferenceRule()
        self.noise = noise
        self.seed = seed
        self.name = name or f"sim-{seed}"

    def judge(self, prompt: Prompt, a_text: str, b_text: str) -> str:
        """The label, "A", "B", "tie" or "both_bad"; the same question always gets the same answer."""
        return self.judge_with_strength(prompt, a_text, b_text)[0]

    def judge_with_strength(self, prompt: Prompt, a_text: str, b_text: str) -> tuple[str, str | None]:
        """(label, strength): the strength of a strict label is the rule's (``PreferenceRule.strength``), or
        uniformly random when the label is (strength None for "tie" and "both_bad")."""
        rng = _rng("annotator", self.seed, prompt.id, a_text, b_text)
        if rng.random() < self.noise:
            label = rng.choice(LABELS)
            return label, (rng.choice(STRENGTHS) if label in ("A", "B") else None)
        a, b = check(prompt, a_text), check(prompt, b_text)
        return self.rule.label(a, b), self.rule.strength(a, b)


def agreement_ceiling(noise: float, kind: str = "label") -> float:
    """Expected agreement of a ``SimulatedAnnotator`` with its noise-free rule.

    kind="label": P(label == rule label) = (1 - p) + p / 4 = 1 - 3p/4 over all four labels.
    kind="pairwise": over items where the rule is strict (A/B) and the annotator's label is strict too,
    P(same choice) = (1 - p + p/4) / (1 - p + p/2) = (1 - 3p/4) / (1 - p/2): a reward model that has learned
    the rule exactly scores this against held-out annotator labels, and no model can expect more.
    """
    p = noise
    if kind == "label":
        return 1.0 - 0.75 * p
    if kind == "pairwise":
        return (1.0 - 0.75 * p) / (1.0 - 0.5 * p)
    raise ValueError(f"kind must be 'label' or 'pairwise', got {kind!r}")


def _sign(x: float, tolerance: float = 1e-9) -> int:
    return 0 if abs(x) <= tolerance else (1 if x > 0 else -1)


_CONTRAST = (
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


def contrast_pairs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """The minimal pairs ``specs`` name: 'a>b' each, or 'all' for every pairing of the eleven kinds of
    ``World.contrast_responses`` (55: surface form and value independent, the counterfactual design)."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        if spec == "all":
            pairs += [(a, b) for i, a in enumerate(_CONTRAST) for b in _CONTRAST[i + 1 :]]
        else:
            pairs.append(_contrast_kinds(spec))
    return pairs


def _contrast_kinds(spec: str) -> tuple[str, str]:
    """'correct>verbose' -> ("correct", "verbose"): two of ``World.contrast_responses``' kinds."""
    parts = spec.split(">") if isinstance(spec, str) else []
    if len(parts) != 2 or parts[0] == parts[1] or any(p not in _CONTRAST for p in parts):
        raise ValueError(
            f"contrast_kinds: {spec!r} is not two different minimal-pair kinds 'a>b' "
            f"with a and b from {list(_CONTRAST)} (e.g. 'correct>verbose'), or 'all'"
        )
    return parts[0], parts[1]


def preference_pairs(
    world: World,
    prompts: Sequence[Prompt],
    n_annotators: int = 3,
    noise: float | Sequence[float] = 0.1,
    seed: int = 0,
    labels_per_pair: int = 1,
    contrastive: float = 0.0,
    contrast_kinds: Sequence[str] = ("correct>wrong", "correct>wrong", "correct>verbose"),
    strength: bool = False,
) -> list[dict[str, Any]]:
    """Label one pair of candidate answers per prompt by ``labels_per_pair`` of ``n_annotators`` simulated
    annotators; one record per label.

    ``contrastive`` is the share of prompts whose pair is a minimal pair instead (``World.contrast_responses``:
    one answer sentence with the gold value, with another value, wrapped in filler), its two kinds drawn from
    ``contrast_kinds`` ('correct>wrong', 'correct>verbose', 'verbose>wrong', and the counterfactual
    'correct>verbose_wrong', 'verbose>verbose_wrong', 'wrong>verbose_wrong', 'correct>wrong_language_wrong'
    ...; 'all' for all 55 pairings; repeat one to weight it). The annotators label every pair by their
    rule: 'a>b' names the two kinds shown, not the label (two wrong answers are "both bad").

    ``noise`` is one probability for every annotator or one per annotator (reliable and careless ones).
    Each record is a dict that ``annotation.records.PreferenceRecord.from_dict`` accepts (and its ``to_dict``
    gives back): ``prompt`` (messages), ``chosen`` / ``rejected`` (response text), ``tie`` (True for "tie" and
    "both_bad"; then chosen is simply answer A), ``annotator`` ("sim-i"), ``weight`` 1.0, ``margin`` None,
    ``attributes`` ({"correctness", "language", "concision"} -> +1 when the chosen response is better on
    it, -1 worse, 0 equal), ``id`` ("{prompt_id}/{annotator}") and ``provenance``: ``source`` "world",
    ``seed``, ``world_key``, ``prompt_id``, ``lang``, ``family``, ``label`` (the annotator's: A / B / tie /
    both_bad; A is the answer shown first), ``rule_choice`` (what the noise-free rule prefers: "chosen",
    "rejected", "tie" or "both_bad"), ``noise`` (the annotator's),
    ``kinds`` [chosen, rejected] and ``scores`` ({"chosen": {...}, "rejected": {...}} with correctness,
    language, concision in [0, 1]).

    ``strength``: the annotators also say how much better the chosen answer is
    (``SimulatedAnnotator.judge_with_strength``); a strict record then has ``provenance.strength`` and
    ``margin`` = ``annotation.records.STRENGTH_MARGINS[strength]`` (for a margin loss), ties keep None.
    """
    if not 1 <= labels_per_pair <= n_annotators:
        raise ValueError(
            f"labels_per_pair must be in [1, n_annotators={n_annotators}], got {labels_per_pair}"
        )
    noises = [float(noise)] * n_annotators if isinstance(noise, (int, float)) else [float(x) for x in noise]
    if len(noises) != n_annotators:
        raise ValueError(f"noise has {len(noises)} values for n_annotators={n_annotators}")
    annotators = [
        SimulatedAnnotator(noise=p, seed=_digest(seed, "annotator", i) % 2**31, name=f"sim-{i}")
        for i, p in enumerate(noises)
    ]
    rule = PreferenceRule()
    rng = _rng(world.seed, "pairs", seed)
    records = []
    if not 0.0 <= contrastive <= 1.0:
        raise ValueError(f"contrastive must be a fraction in [0, 1], got {contrastive}")
    contrast = contrast_pairs(contrast_kinds)
    if contrastive and not contrast:
        raise ValueError("contrast_kinds is empty; name at least one minimal pair such as 'correct>wrong'")
    for prompt in prompts:
        if contrastive and rng.random() < contrastive:  # a minimal pair (World.contrast_responses)
            options = world.contrast_responses(prompt, seed=rng.randrange(2**31))
            kind_a, kind_b = rng.choice(contrast)
            a, b = options[kind_a], options[kind_b]
            if rng.random() < 0.5:
                a, b = b, a
        else:
            kind_a, kind_b = rng.choice(KINDS), rng.choice(KINDS)
            a = world.responses(prompt, seed=rng.randrange(2**31))[KINDS.index(kind_a)]
            b = world.responses(prompt, seed=rng.randrange(2**31))[KINDS.index(kind_b)]
        check_a, check_b = world.check(prompt, a.text), world.check(prompt, b.text)
        rule_label = rule.label(check_a, check_b)
        for annotator in rng.sample(annotators, labels_per_pair):
            label, level = annotator.judge_with_strength(prompt, a.text, b.text)
            level = level if strength else None
            swap = label == "B"
            rule_choice = (
                rule_label
                if rule_label in ("tie", "both_bad")
                else ("chosen" if (rule_label == "A") != swap else "rejected")
            )
            (chosen, c_chosen), (rejected, c_rejected) = (
                ((b, check_b), (a, check_a)) if swap else ((a, check_a), (b, check_b))
            )
            scores = {
                side: {
                    "correctness": float(c.correct),
                    "language": float(c.right_language),
                    "concision": c.concision,
                }
                for side, c in (("chosen", c_chosen), ("rejected", c_rejected))
            }
            records.append(
                {
                    "prompt": [dict(m) for m in prompt.messages],
                    "chosen": chosen.text,
                    "rejected": rejected.text,
                    "tie": label in ("tie", "both_bad"),
                    "annotator": annotator.name,
                    "weight": 1.0,
                    "margin": None if level is None else STRENGTH_MARGINS[level],
                    "attributes": {
                        k: _sign(scores["chosen"][k] - scores["rejected"][k]) for k in scores["chosen"]
                    },
                    "provenance": {
                        "source": "world",
                        "seed": seed,
                        "world_key": [world.seed, world.num_entities],
                        "prompt_id": prompt.id,
                        "lang": prompt.lang,
                        "family": prompt.family,
                        "label": label,
                        "rule_choice": rule_choice,
                        "noise": annotator.noise,
                        "kinds": [chosen.kind, rejected.kind],
                        "scores": scores,
                        **({"strength": level} if level else {}),
                    },
                    "id": f"{prompt.id}/{annotator.name}",
                }
            )
    return records


# ---------------------------------------------------------------------------------------------------------
# CLI: python -m glmwb.pretrain.world --out DIR --seed 0
# ---------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glmwb.pretrain.world", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=96)
    parser.add_argument("--num-docs", type=int, default=20000)
    parser.add_argument("--num-train", type=int, default=2000, help="train prompts")
    parser.add_argument("--num-heldout", type=int, default=500, help="held-out prompts")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    world = make_world(args.seed, args.num_entities)
    docs = world.corpus(args.num_docs, seed=args.seed)
    splits = {
        s: world.prompts(s, n, seed=args.seed)
        for s, n in (("train", args.num_train), ("heldout", args.num_heldout))
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "corpus.jsonl", [{"text": d} for d in docs])
    for split, prompts in splits.items():
        _write_jsonl(args.out / f"prompts_{split}.jsonl", [p.to_dict() for p in prompts])
    (args.out / "world.json").write_text(
        json.dumps(world.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8"
    )

    doc_langs = Counter(detect_language(d) or "none" for d in docs)
    print(
        f"world seed={args.seed}: {len(world.entities)} entities "
        f"({', '.join(f'{k} {len(v)}' for k, v in world._of_kind.items())})"
    )
    print(
        f"corpus: {len(docs)} docs, {sum(map(len, docs)):,} chars, "
        f"by language {dict(sorted(doc_langs.items()))}"
    )
    for split, prompts in splits.items():
        counts = Counter((p.family, p.lang) for p in prompts)
        table = ", ".join(f"{f}/{lang} {counts[f, lang]}" for f in FAMILIES for lang in LANGS)
        print(f"prompts_{split}: {len(prompts)} ({table})")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
