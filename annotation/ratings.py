"""Arena ratings: Bradley–Terry with ties, intervals, style control, fragility and active pair selection.

Plain functions over ``Battle`` records (numpy / scipy, no Gradio), used by ``glmwb arena leaderboard`` and
by the arena app (``ui/``). The math is described in docs/arena_leaderboard.md.

    battles = read_battles("battles.jsonl")          # FastChat's public battle format (JSONL or a JSON list)
    battles = battles_from_store(store)              # the annotation store's two-answer comparison votes
    lb = fit_bt(battles, ties="davidson", style_control=False, bootstrap=1000)
    print(lb.table())
    lb.row("model-x").rank, lb.row("model-x").lower, lb.position_bias, lb.style
    online_elo(battles)                              # FastChat's online Elo, for comparison
    wr = win_rate_matrix(battles); plot_leaderboard(lb, battles, "board.png")
    rank_fragility(battles, lb)                      # fewest removed votes that change each model's rank
    votes_to_separate(lb, "model-x", "model-y")      # battles still needed between two models
    choice = next_pair(lb, models, rng)              # the next anonymous battle's pair, with its probability

A battle's ``model_a`` is the answer shown first (left, letter A); ``winner`` is one of ``WINNERS``.

The store holds arena votes as two-answer comparison items; ``battles_from_store`` reads the arena's
bookkeeping from ``item.meta[ARENA_META]`` (written by the app), every key optional:

    {"mode": "anonymous" | "named",
     "counted": true,            # false: the vote is stored but not rated (e.g. a model's identity leaked)
     "category": "code",         # the prompt's category (also read from item.meta / prompt meta "category")
     "pair_prob": 0.031,         # probability with which next_pair drew this pair (active selection)
     "weight": 1.6,              # inverse-probability weight of the battle (PairChoice.weight)
     "tokens": {"A": 812, "B": 95}}   # answer lengths in tokens (else counted from the text)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from glmwb.pretrain.errors import ConfigError

if TYPE_CHECKING:
    from glmwb.annotation.store import Store

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
TIE_MODELS = ("davidson", "rao-kupper", "none")
BOTHBAD_MODES = ("separate", "tie", "drop")
# Style covariates: answer length and three markdown features (FastChat's style control v1).
STYLE_FEATURES = ("length", "headers", "lists", "bold")
MARKDOWN_FEATURES = ("headers", "lists", "bold")
ARENA_META = "arena"
ELO_SCALE = 400.0  # rating points per factor of 10 in the odds
ELO_BASE_RATING = 1000.0


class RatingsError(ConfigError):
    """Unusable battles or arguments (the CLI prints it as one line and exits with code 2)."""


@dataclass(frozen=True)
class Battle:
    """One judged battle. ``model_a`` was shown first (left / letter A).

    ``tokens_*``: answer lengths in tokens; ``markdown_*``: counts of "headers", "lists", "bold" in the
    answer (style control needs both sides). ``weight``: inverse-probability weight (1.0 = drawn at the
    uniform rate); ``pair_prob``: the probability the pair was drawn with, when chosen by ``next_pair``.
    """

    model_a: str
    model_b: str
    winner: str
    category: str | None = None
    tokens_a: float | None = None
    tokens_b: float | None = None
    markdown_a: Mapping[str, float] | None = None
    markdown_b: Mapping[str, float] | None = None
    weight: float = 1.0
    pair_prob: float | None = None
    judge: str | None = None
    tstamp: float | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.winner not in WINNERS:
            raise RatingsError(
                f"battle {self.id or ''}: winner must be one of {WINNERS}, got {self.winner!r}"
            )
        if self.model_a == self.model_b:
            raise RatingsError(f"battle {self.id or ''}: a model cannot battle itself ({self.model_a!r})")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise RatingsError(
                f"battle {self.id or ''}: weight must be a finite number > 0, got {self.weight!r}"
            )

    @property
    def has_style(self) -> bool:
        return self.tokens_a is not None and self.tokens_b is not None


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval, in rating points (or a logit for a style coefficient)."""

    estimate: float
    lower: float
    upper: float
    se: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"estimate": self.estimate, "lower": self.lower, "upper": self.upper, "se": self.se}


@dataclass
class ModelRating:
    """One leaderboard row. ``lower`` / ``upper``: the interval the rank is computed from (``interval``
    of the leaderboard: bootstrap when it ran, else robust)."""

    model: str
    rating: float
    lower: float
    upper: float
    rank: int
    battles: int
    wins: int
    losses: int
    ties: int
    bothbad: int
    robust: Interval | None = None  # sandwich (robust) interval
    bootstrap: Interval | None = None  # bootstrap percentile interval (median as estimate)
    fragility: int | None = None  # fewest removed votes that change the rank (rank_fragility)

    @property
    def bothbad_rate(self) -> float:
        return self.bothbad / self.battles if self.battles else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("model", "rating", "lower", "upper", "rank", "battles", "wins",
                                           "losses", "ties", "bothbad", "fragility")}  # fmt: skip
        d["bothbad_rate"] = self.bothbad_rate
        d["robust"] = self.robust.to_dict() if self.robust else None
        d["bootstrap"] = self.bootstrap.to_dict() if self.bootstrap else None
        return d


@dataclass
class Leaderboard:
    """What ``fit_bt`` returns: rows best first and the fit's other parameters.

    ``tie_params``: {"nu": ...} (Davidson) or {"eta": ...} (Rao–Kupper), plus "bothbad_share", the share of
    the tie outcomes that were "both bad". ``position_bias``: the first-shown answer's advantage in rating
    points (positive: the left answer is favoured). ``style``: per style feature, its coefficient in rating
    points per standard deviation of the feature's normalised difference (A minus B).
    """

    rows: list[ModelRating]
    ties: str
    bothbad: str
    tie_params: dict[str, float]
    position_bias: Interval | None
    style: dict[str, Interval]
    n_battles: int
    confidence: float
    interval: str  # "bootstrap" or "robust": which interval the ranks use
    bootstrap_rounds: int
    category: str | None = None
    scale: float = ELO_SCALE
    seconds: float = 0.0
    _state: Any = field(default=None, repr=False)  # the fit's internals (for the functions below)

    @property
    def models(self) -> list[str]:
        return [r.model for r in self.rows]

    def row(self, model: str) -> ModelRating:
        for r in self.rows:
            if r.model == model:
                return r
        raise RatingsError(f"no model {model!r} on this leaderboard")

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def table(self) -> str:
        """The leaderboard as aligned text (the CLI prints it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Fragility:
    """The fewest votes found whose removal changes ``model``'s rank, and which ones (a verified upper
    bound on the true minimum, found greedily with refits). ``removed``: (model_a, model_b, winner, count)."""

    model: str
    rank: int
    votes: int | None  # None: no removal found (e.g. a lone model)
    new_rank: int | None
    removed: tuple[tuple[str, str, str, int], ...] = ()


@dataclass(frozen=True)
class Separation:
    """How many more battles between two models separate them at ``confidence`` (0: already separated;
    None: never, at the estimated gap — e.g. a gap of zero)."""

    model_a: str
    model_b: str
    gap: float  # rating points, a minus b
    votes: int | None
    confidence: float
    criterion: str


@dataclass(frozen=True)
class PairChoice:
    """The next battle's pair. ``prob``: the probability this (unordered) pair was drawn with; ``weight``:
    the inverse-probability weight to store with its vote (1 / (pairs x prob): 1.0 under uniform sampling).
    Left / right order is for the caller to randomise."""

    model_a: str
    model_b: str
    prob: float
    weight: float
    scores: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class WinRates:
    """``rate[i, j]``: the share of battles between models[i] and models[j] that i won (ties excluded, or
    counted as half a win); NaN where they never met. ``count[i, j]``: their battles."""

    models: list[str]
    rate: np.ndarray
    count: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# Reading battles.
# ---------------------------------------------------------------------------------------------------------


def read_battles(path: str | Path) -> list[Battle]:
    """Battles from FastChat's public battle format: JSONL (one object a line) or one JSON list of objects
    with ``model_a``, ``model_b``, ``winner`` and optionally ``conv_metadata`` (``sum_assistant_a_tokens``,
    ``header_count_a``, ``list_count_a``, ``bold_count_a`` and the ``_b`` ones; a count may be a dict of
    sub-counts, which are summed), ``category`` (or ``category_tag``), ``judge``, ``tstamp``,
    ``question_id``. Rows with ``anony: false`` are kept (filter with ``anonymous_only``)."""
    raise NotImplementedError


def battles_from_store(
    store: Store,
    *,
    arena_only: bool = False,
    include_uncounted: bool = False,
    category: str | None = None,
) -> list[Battle]:
    """One battle per active vote on a two-answer comparison item of the store: A's model is ``model_a``;
    "A" / "B" / "tie" / "both_bad" become "model_a" / "model_b" / "tie" / "tie (bothbad)". ``arena_only``:
    only items with arena bookkeeping (``item.meta["arena"]``); votes marked ``counted: false`` are left out
    unless ``include_uncounted``. Style covariates come from the answers' texts (token counts from the
    arena bookkeeping when present, else whitespace words)."""
    raise NotImplementedError


def filter_battles(battles: Iterable[Battle], category: str | None = None) -> list[Battle]:
    """The battles of one prompt category (None: all)."""
    raise NotImplementedError


def markdown_counts(text: str) -> dict[str, int]:
    """Markdown features of an answer: "headers" (# lines), "lists" (list items), "bold" (**x** / __x__)."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Fitting.
# ---------------------------------------------------------------------------------------------------------


def fit_bt(
    battles: Sequence[Battle],
    *,
    ties: str = "davidson",
    bothbad: str = "separate",
    style_control: bool = False,
    position_bias: bool = True,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    category: str | None = None,
    weighted: bool = True,
    anchor: str | None = None,
    anchor_rating: float = ELO_BASE_RATING,
    seed: int = 0,
) -> Leaderboard:
    """Bradley–Terry maximum likelihood with ties, on an Elo-like scale (400 points = 10x the odds; the
    ratings average ``anchor_rating``, or ``anchor`` is pinned to it).

    ``ties``: "davidson", "rao-kupper", or "none" (a tie counts as half a win and half a loss, as in
    FastChat). ``bothbad``: "separate" ("both bad" is a tie outcome of its own, its share reported),
    "tie" (a plain tie) or "drop" (left out). ``style_control``: length and markdown covariates (every
    battle needs them). ``position_bias``: estimate the first-shown answer's advantage. ``bootstrap``:
    resampling rounds (0: robust intervals only). ``weighted``: use the battles' inverse-probability
    weights. ``category``: fit one category's battles only."""
    raise NotImplementedError


def online_elo(
    battles: Iterable[Battle], k: float = 4.0, scale: float = ELO_SCALE, base: float = 10.0,
    init: float = ELO_BASE_RATING,
) -> dict[str, float]:  # fmt: skip
    """Sequential Elo in the battles' order (FastChat's ``compute_elo``: a tie scores 0.5)."""
    raise NotImplementedError


def win_rate_matrix(
    battles: Iterable[Battle], models: Sequence[str] | None = None, ties: str = "exclude"
) -> WinRates:
    """Pairwise win shares; ``ties``: "exclude" (as FastChat's heat map) or "half"."""
    raise NotImplementedError


def plot_win_rates(rates: WinRates, path: str | Path | None = None, ax: Any = None) -> Any:
    """A heat map of ``rates`` with the shares written in the cells (matplotlib); saved to ``path``."""
    raise NotImplementedError


def plot_leaderboard(lb: Leaderboard, battles: Sequence[Battle], path: str | Path) -> Path:
    """One figure: ratings with their intervals, and the win-rate matrix; written to ``path`` (PNG)."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Beyond the ratings.
# ---------------------------------------------------------------------------------------------------------


def rank_fragility(
    battles: Sequence[Battle], lb: Leaderboard, models: Sequence[str] | None = None
) -> dict[str, Fragility]:
    """Per model, the fewest votes found whose removal changes its rank (refits with robust intervals at
    ``lb``'s settings); also written into ``lb``'s rows (``fragility``)."""
    raise NotImplementedError


def votes_to_separate(
    lb: Leaderboard,
    model_a: str,
    model_b: str,
    confidence: float | None = None,
    criterion: str = "rank",
) -> Separation:
    """Battles between ``model_a`` and ``model_b`` still needed, at the estimated gap, until they separate:
    ``criterion="rank"``: their intervals no longer overlap (so their ranks differ); "difference": the
    interval of their difference excludes zero."""
    raise NotImplementedError


def adjacent_separations(lb: Leaderboard, confidence: float | None = None) -> list[Separation]:
    """``votes_to_separate`` for each pair of neighbours on the leaderboard (by rating)."""
    raise NotImplementedError


def next_pair(
    lb: Leaderboard | None,
    models: Sequence[str],
    rng: np.random.Generator | None = None,
    explore: float = 0.2,
) -> PairChoice:
    """The next anonymous battle's pair: drawn with probability mixing (1 - explore) x the pairs' expected
    reduction of the leaderboard's uncertainty (of the neighbours' gaps) with explore x uniform, so that
    every pair keeps a chance; models without battles come first. Store ``prob`` / ``weight`` with the vote
    (``ARENA_META``) so that the fit weights it by the inverse probability."""
    raise NotImplementedError


def ratings_json(lb: Leaderboard, path: str | Path) -> Path:
    """Write ``lb.to_dict()`` as JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(lb.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
