"""The world's tables: families, languages, splits, names, answer vocabularies, attributes, operations, units.

Names are built from 40 syllables, each with an English spelling and one Chinese character (``zor``/佐 +
``ven``/文 -> Zorven / 佐文); cities take a suffix (-ton/顿, -ford/福, -burg/堡), countries -ia/亚 and
creatures' Chinese names 兽. The name characters are disjoint from numerals, units and every answer word,
so a name can never be mistaken for an answer. Attributes (``ATTRIBUTES``):

====================  =======================================================================
city                  country (a country), bridges (2-30), product (tea/茶, salt/盐, ...)
person                home (a city), colour (red/红色, ...), job (baker/面包师, ...), age (18-80)
creature              home (a city), colour, food (fish/鱼, ...), legs (0, 2, 4, 6, 8)
====================  =======================================================================

Task families (``FAMILIES``), each a set of language-independent *question instances* with a key:
``arithmetic`` (``add:a:b`` / ``sub:a:b`` with 1 <= b <= a, operands up to ``max_operand``; ``mul:a:b``,
2-9 x 2-12), ``conversion`` (km<->m, kg<->g, hours<->minutes, integer results, key ``km_to_m:3``) and
``fact`` (``person:Zorven:colour``). How each is asked and answered: ``phrasings``.
"""

from __future__ import annotations

FAMILIES = ("arithmetic", "conversion", "fact")
LANGS = ("en", "zh")
SPLITS = ("train", "heldout", "dev", "test")  # dev and test: the two halves of heldout

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


def unit_name(unit: str, n: int) -> str:
    """The English name of ``unit`` agreeing with ``n``: "kilometre" for 1, else "kilometres"."""
    return UNITS[unit][1] if n == 1 else UNITS[unit][2]
