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

import numpy as np

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


def gram_hashes(w: list[str], n: int) -> np.ndarray:
    """A 64-bit hash of every word n-gram of ``w`` (uint64, len(w) - n + 1 of them): each word hashed once, the
    windows combined as a random linear combination mod 2^64 in numpy (13 vector passes, no Python loop)."""
    if len(w) < n:
        return np.empty(0, dtype=np.uint64)
    ids = np.fromiter((hash(x) for x in w), dtype=np.int64, count=len(w)).view(np.uint64)
    h = ids[: len(w) - n + 1] * _MULT[0]
    for j in range(1, n):
        h += ids[j : len(w) - n + 1 + j] * _MULT[j]
    return h


_MULT = np.random.default_rng(0xDEC0).integers(0, 2**64, size=64, dtype=np.uint64) | np.uint64(1)


class Decontaminator:
    """The n-gram tables of the evaluation sets; ``match(text)`` names the first item a text overlaps."""

    def __init__(self, cfg: DecontamConfig):
        if cfg.n > len(_MULT):
            raise ValueError(f"decontaminate: n must be <= {len(_MULT)}, got {cfg.n}")
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
                    for h in gram_hashes(w, cfg.n).tolist():
                        self.long.setdefault(h, (name, i))
                elif len(w) >= cfg.min_n:
                    h = int(gram_hashes(w[: cfg.min_n], cfg.min_n)[0])
                    self.short.setdefault(h, []).append((tuple(w), name, i))
                else:
                    self.skipped[name] += 1
        self._long = np.sort(np.fromiter(self.long, dtype=np.uint64, count=len(self.long)))
        self._short = np.sort(np.fromiter(self.short, dtype=np.uint64, count=len(self.short)))

    @staticmethod
    def _hits(grams: np.ndarray, table: np.ndarray) -> np.ndarray:
        if not len(table) or not len(grams):
            return np.empty(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(table, grams), len(table) - 1)
        return np.flatnonzero(table[pos] == grams)

    def match(self, text: str) -> tuple[str, int] | None:
        """(eval set, item index) of an item ``text`` overlaps, or None."""
        w = words(text)
        hits = self._hits(gram_hashes(w, self.cfg.n), self._long)
        if len(hits):
            return self.long[int(gram_hashes(w[hits[0] : hits[0] + self.cfg.n], self.cfg.n)[0])]
        m = self.cfg.min_n
        grams = gram_hashes(w, m)
        for s in self._hits(grams, self._short).tolist():
            for item, name, i in self.short[int(grams[s])]:
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
