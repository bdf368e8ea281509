"""Decontamination: drop training documents that share an n-gram with an evaluation item.

Words are what the quality filter counts (``data._WORD``: runs of letters / digits, and each CJK character),
case-folded, punctuation ignored. A document is contaminated when it contains any word 13-gram of an
evaluation item (GPT-3's rule, Brown et al. 2020, appendix C). Items shorter than 13 words (short
instructions) are matched whole: their first ``min_n`` (8) words are looked up as an 8-gram and the rest of
the item must follow in the document. Items under ``min_n`` words are skipped (too generic to mean
contamination). The whole document is dropped, not only the overlapping span.

The evaluation sets are files given by path: JSONL (``.jsonl`` / ``.jsonl.gz``), the text in ``field`` (GSM8K
``question``, HumanEval and IFEval ``prompt``).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmwb.pretrain.data import _WORD
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import PositiveInt


@dataclass(frozen=True)
class EvalSetConfig:
    path: str  # JSONL / JSONL.gz file of evaluation items
    field: str = "prompt"  # the item's text (GSM8K: question)
    name: str | None = None  # in the report; default: the file's parent folder name


@dataclass(frozen=True)
class DecontamConfig:
    evals: tuple[EvalSetConfig, ...] = ()
    n: PositiveInt = 13  # word n-gram length (GPT-3)
    min_n: PositiveInt = (
        8  # shorter items are matched whole from an n-gram of this length; fewer words: skipped
    )
    examples: PositiveInt = 50  # removed documents listed in the report

    def __post_init__(self) -> None:
        if self.min_n > self.n:
            raise ValueError(f"decontaminate: min_n ({self.min_n}) must be <= n ({self.n})")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def read_eval_items(cfg: EvalSetConfig) -> list[str]:
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"decontaminate: no evaluation file at {path} (give JSONL files by path)")
    opener = gzip.open if path.name.endswith(".gz") else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get(cfg.field), str):
                raise ConfigError(f"decontaminate: {path}, line {lineno}: no string field {cfg.field!r}")
            items.append(record[cfg.field])
    return items


class Decontaminator:
    """The n-gram tables of the evaluation sets; ``match(text)`` names the first item a text overlaps."""

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        self.long: dict[int, tuple[str, int]] = {}  # hash of an n-gram -> (eval set, item)
        self.short: dict[int, list[tuple[tuple[str, ...], str, int]]] = {}  # hash of first min_n words
        self.items: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        for ev in cfg.evals:
            name = ev.name or Path(ev.path).parent.name
            items = read_eval_items(ev)
            self.items[name], self.skipped[name] = len(items), 0
            for i, text in enumerate(items):
                w = words(text)
                if len(w) >= cfg.n:
                    for s in range(len(w) - cfg.n + 1):
                        self.long.setdefault(hash(tuple(w[s : s + cfg.n])), (name, i))
                elif len(w) >= cfg.min_n:
                    self.short.setdefault(hash(tuple(w[: cfg.min_n])), []).append((tuple(w), name, i))
                else:
                    self.skipped[name] += 1

    def match(self, text: str) -> tuple[str, int] | None:
        """(eval set, item index) of an item ``text`` overlaps, or None."""
        w = words(text)
        n, m = self.cfg.n, self.cfg.min_n
        if self.long:
            for s in range(len(w) - n + 1):
                hit = self.long.get(hash(tuple(w[s : s + n])))
                if hit is not None:
                    return hit
        if self.short:
            for s in range(len(w) - m + 1):
                for item, name, i in self.short.get(hash(tuple(w[s : s + m])), ()):
                    if tuple(w[s : s + len(item)]) == item:
                        return name, i
        return None


@dataclass
class DecontamReport:
    """What the stage removed: counts per evaluation set and the first few documents."""

    removed: Counter = field(default_factory=Counter)
    items_hit: dict[str, set[int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, hit: tuple[str, int], doc: int, text: str, limit: int) -> None:
        name, item = hit
        self.removed[name] += 1
        self.items_hit.setdefault(name, set()).add(item)
        if len(self.examples) < limit:
            self.examples.append({"input_doc": doc, "eval": name, "item": item, "start": text[:120]})

    def to_dict(self) -> dict[str, Any]:
        return {"removed_docs": dict(self.removed),
                "items_hit": {k: sorted(v) for k, v in self.items_hit.items()},
                "examples": self.examples}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecontamReport:
        return cls(Counter(d.get("removed_docs", {})),
                   {k: set(v) for k, v in d.get("items_hit", {}).items()}, list(d.get("examples", [])))  # fmt: skip
