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
        return {
            "rows": [r.to_dict() for r in self.rows],
            "ties": self.ties,
            "bothbad": self.bothbad,
            "tie_params": dict(self.tie_params),
            "position_bias": self.position_bias.to_dict() if self.position_bias else None,
            "style": {k: v.to_dict() for k, v in self.style.items()},
            "n_battles": self.n_battles,
            "confidence": self.confidence,
            "interval": self.interval,
            "bootstrap_rounds": self.bootstrap_rounds,
            "category": self.category,
            "scale": self.scale,
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        """The leaderboard as aligned text (the CLI prints it)."""
        width = max([5, *(len(r.model) for r in self.rows)])
        frag = any(r.fragility is not None for r in self.rows)
        pct = f"{self.confidence:.0%}"
        head = (f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {pct + ' ' + self.interval:>22}  "
                f"{'battles':>7}  {'W-L-T':>15}  {'both bad':>8}" + ("  fragility" if frag else ""))  # fmt: skip
        lines = [head, "-" * len(head)]
        for r in self.rows:
            wlt = f"{r.wins}-{r.losses}-{r.ties}"
            iv = f"[{r.lower:7.1f}, {r.upper:7.1f}]"
            line = (f"{r.rank:>4}  {r.model:<{width}}  {r.rating:7.1f}  {iv:>22}  {r.battles:>7}  {wlt:>15}  "
                    f"{r.bothbad:>8}")  # fmt: skip
            if frag:
                line += f"  {'-' if r.fragility is None else r.fragility:>9}"
            lines.append(line)
        notes = [f"{self.n_battles} battles, Bradley-Terry with {self.ties} ties"
                 + (f" ({', '.join(f'{k} {v:.3g}' for k, v in self.tie_params.items())})" if self.tie_params else "")
                 + (f", category {self.category!r}" if self.category else "")]  # fmt: skip
        if self.position_bias is not None:
            pb = self.position_bias
            notes.append(
                f"position bias (first-shown answer): {pb.estimate:+.1f} points [{pb.lower:+.1f}, {pb.upper:+.1f}]"
            )
        for name, c in self.style.items():
            notes.append(f"style {name}: {c.estimate:+.1f} points per s.d. [{c.lower:+.1f}, {c.upper:+.1f}]")
        notes.append("rank = 1 + the number of models whose interval lies wholly above")
        if frag:
            notes.append(
                "fragility = the fewest removed votes found that change the rank (robust intervals, refits)"
            )
        return "\n".join(lines + [""] + notes)


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

_FASTCHAT_MARKDOWN = {"headers": "header_count", "lists": "list_count", "bold": "bold_count"}


def _count(value: Any, where: str) -> float:
    """A FastChat metadata count: a number, or a dict of sub-counts (summed)."""
    if isinstance(value, Mapping):
        return float(sum(_count(v, where) for v in value.values()))
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise RatingsError(f"{where}: a count must be a number >= 0, got {value!r}")
    return float(value)


def _battle_from_row(row: Any, where: str) -> Battle:
    if not isinstance(row, Mapping):
        raise RatingsError(f"{where}: a battle must be a JSON object, got {type(row).__name__}")
    for key in ("model_a", "model_b", "winner"):
        if key not in row:
            raise RatingsError(f"{where}: missing field {key!r} (a battle needs model_a, model_b, winner)")
        if not isinstance(row[key], str) or not row[key]:
            raise RatingsError(f"{where}: field {key!r} must be a non-empty string, got {row[key]!r}")
    meta = row.get("conv_metadata")
    tokens: list[float | None] = [None, None]
    markdown: list[dict[str, float] | None] = [None, None]
    if meta is not None:
        if not isinstance(meta, Mapping):
            raise RatingsError(f"{where}: conv_metadata must be an object")
        for i, side in enumerate("ab"):
            key = f"sum_assistant_{side}_tokens"
            if key in meta:
                tokens[i] = _count(meta[key], f"{where}, conv_metadata.{key}")
            found = {
                name: _count(meta[f"{prefix}_{side}"], f"{where}, conv_metadata.{prefix}_{side}")
                for name, prefix in _FASTCHAT_MARKDOWN.items()
                if f"{prefix}_{side}" in meta
            }
            if found:
                markdown[i] = {name: found.get(name, 0.0) for name in MARKDOWN_FEATURES}
    category = row.get("category", row.get("category_tag"))
    if category is not None and not isinstance(category, str):
        category = None  # FastChat's category_tag is a nested dict of tags; only a plain name is a category
    weight = row.get("weight", 1.0)
    pair_prob = row.get("pair_prob")
    tstamp = row.get("tstamp")
    try:
        return Battle(
            model_a=row["model_a"],
            model_b=row["model_b"],
            winner=row["winner"],
            category=category,
            tokens_a=tokens[0],
            tokens_b=tokens[1],
            markdown_a=markdown[0],
            markdown_b=markdown[1],
            weight=weight,
            pair_prob=float(pair_prob) if isinstance(pair_prob, (int, float)) else None,
            judge=None if row.get("judge") is None else str(row.get("judge")),
            tstamp=float(tstamp) if isinstance(tstamp, (int, float)) else None,
            id=None if row.get("question_id") is None else str(row.get("question_id")),
        )
    except RatingsError as e:
        raise RatingsError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def read_battles(path: str | Path, anonymous_only: bool = False) -> list[Battle]:
    """Battles from FastChat's public battle format: JSONL (one object a line) or one JSON list of objects
    with ``model_a``, ``model_b``, ``winner`` and optionally ``conv_metadata`` (``sum_assistant_a_tokens``,
    ``header_count_a``, ``list_count_a``, ``bold_count_a`` and the ``_b`` ones; a count may be a dict of
    sub-counts, which are summed), ``category``, ``judge``, ``tstamp``, ``question_id``, ``weight``,
    ``pair_prob``. ``anonymous_only``: leave out rows with ``"anony": false``."""
    p = Path(path)
    if not p.is_file():
        raise RatingsError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RatingsError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    rows: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RatingsError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
        rows = [(f"{p}, item {i}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{p}, line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise RatingsError(f"{p}, line {n}: not valid JSON ({e.msg})") from None
    battles = []
    for where, row in rows:
        if anonymous_only and isinstance(row, Mapping) and row.get("anony") is False:
            continue
        battles.append(_battle_from_row(row, where))
    if not battles:
        raise RatingsError(f"{p}: no battles in it")
    return battles


_HEADER = __import__("re").compile(r"^#{1,6}\s", __import__("re").M)
_LIST = __import__("re").compile(r"^\s*(?:[-*+]|\d+[.)])\s", __import__("re").M)
_BOLD = __import__("re").compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


def markdown_counts(text: str) -> dict[str, int]:
    """Markdown features of an answer: "headers" (# lines), "lists" (list items), "bold" (**x** / __x__)."""
    return {
        "headers": len(_HEADER.findall(text)),
        "lists": len(_LIST.findall(text)),
        "bold": len(_BOLD.findall(text)),
    }


_STORE_WINNER = {"A": "model_a", "B": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


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
    unless ``include_uncounted``. Items with more than two answers, or two answers of one model, are left
    out. Style covariates come from the answers' texts (token counts from the arena bookkeeping when
    present, else whitespace-separated words)."""
    votes = store.votes()
    items = store.items({v.item_id for v in votes})
    battles = []
    for v in votes:
        item = items.get(v.item_id)
        if item is None or len(item.responses) != 2 or v.choice not in _STORE_WINNER:
            continue
        a, b = sorted(item.responses, key=lambda r: r.letter)
        if a.model == b.model:
            continue
        arena = item.meta.get(ARENA_META)
        arena = arena if isinstance(arena, Mapping) else None
        if arena_only and arena is None:
            continue
        if arena is not None and arena.get("counted") is False and not include_uncounted:
            continue
        arena = arena or {}
        cat = arena.get("category") or item.meta.get("category") or item.prompt_meta.get("category")
        if category is not None and cat != category:
            continue
        tokens = arena.get("tokens") if isinstance(arena.get("tokens"), Mapping) else {}
        weight = arena.get("weight", 1.0)
        prob = arena.get("pair_prob")
        battles.append(
            Battle(
                model_a=a.model,
                model_b=b.model,
                winner=_STORE_WINNER[v.choice],
                category=None if cat is None else str(cat),
                tokens_a=float(tokens.get("A", len(a.text.split()))),
                tokens_b=float(tokens.get("B", len(b.text.split()))),
                markdown_a=markdown_counts(a.text),
                markdown_b=markdown_counts(b.text),
                weight=float(weight) if isinstance(weight, (int, float)) and weight > 0 else 1.0,
                pair_prob=float(prob) if isinstance(prob, (int, float)) else None,
                judge=v.annotator,
                tstamp=v.created_at.timestamp() if v.created_at else None,
                id=v.uid,
            )
        )
    return battles


def filter_battles(battles: Iterable[Battle], category: str | None = None) -> list[Battle]:
    """The battles of one prompt category (None: all)."""
    return [b for b in battles if category is None or b.category == category]


# ---------------------------------------------------------------------------------------------------------
# The likelihood. A battle's linear predictor is d = theta_a - theta_b + gamma + x . beta (x: the style
# covariates, A minus B), and its outcome one of win (A), loss (A), tie (tie and both bad; "both bad" then
# takes its share of the tie probability, estimated apart). Parameters q = (theta (m), gamma?, beta (k),
# tau?) with tau = log nu (Davidson) or log eta (Rao-Kupper).
# ---------------------------------------------------------------------------------------------------------

WIN, LOSS, TIE = 0, 1, 2
_LOG10 = math.log(10.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import log_expit

    return log_expit(x)


def _outcome_terms(tie_model: str, y: np.ndarray, d: np.ndarray, tau: np.ndarray | None, second: bool = True):
    """Per row (broadcast over rounds): log-likelihood l and its derivatives in d and tau
    (l_d, l_t, l_dd, l_dt, l_tt; the tau ones None without a tie parameter)."""
    win, loss, tie = (y == WIN), (y == LOSS), (y == TIE)
    fw, fl, ft = win.astype(float), loss.astype(float), tie.astype(float)
    if tie_model == "none" or tau is None:
        s = _sigmoid(d)
        ls_pos, ls_neg = _log_sigmoid(d), _log_sigmoid(-d)
        if tie_model == "none":  # a tie: half a win and half a loss
            aw, al = fw + 0.5 * ft, fl + 0.5 * ft
        else:  # a tie model without ties in the data: plain Bradley-Terry (nu = 0)
            aw, al = fw, 1.0 - fw
        l_ = aw * ls_pos + al * ls_neg
        l_d = aw - (aw + al) * s
        return l_, l_d, None, (-(aw + al) * s * (1.0 - s) if second else None), None, None
    t = tau[..., None] if np.ndim(tau) else tau
    if tie_model == "davidson":
        # Z = e^{d/2} + e^{-d/2} + e^tau; |d| and tau stay far below exp's range (capped Newton steps, prior)
        half = np.clip(0.5 * d, -300.0, 300.0)
        ew = np.exp(half)
        el = 1.0 / ew
        nu = np.exp(t)
        z = ew + el + nu
        log_z = np.log(z)
        inv = 1.0 / z
        pw, pl, pt = ew * inv, el * inv, nu * inv
        l_ = (fw - fl) * half + ft * t - log_z
        diff = 0.5 * (pw - pl)
        l_d = 0.5 * (fw - fl) - diff
        l_t = ft - pt
        if not second:
            return l_, l_d, l_t, None, None, None
        l_dd = diff * diff - 0.25 * (pw + pl)
        l_dt = pt * diff
        l_tt = pt * (pt - 1.0)
        return l_, l_d, l_t, l_dd, l_dt, l_tt
    # Rao-Kupper: P(win) = s(d - eta), P(loss) = s(-d - eta), P(tie) = the rest; eta = e^tau
    eta = np.exp(t)
    s1, s2 = _sigmoid(d - eta), _sigmoid(-d - eta)
    v1, v2 = s1 * (1.0 - s1), s2 * (1.0 - s2)
    tt = np.maximum(1.0 - s1 - s2, 1e-300)
    # derivatives in (d, eta) first
    ld_w, le_w = 1.0 - s1, -(1.0 - s1)
    ld_l, le_l = -(1.0 - s2), -(1.0 - s2)
    td, te = -v1 + v2, v1 + v2
    ld_t, le_t = td / tt, te / tt
    l_ = np.where(win, _log_sigmoid(d - eta), np.where(loss, _log_sigmoid(-d - eta), np.log(tt)))
    l_d = np.where(win, ld_w, np.where(loss, ld_l, ld_t))
    l_e = np.where(win, le_w, np.where(loss, le_l, le_t))
    if not second:
        return l_, l_d, eta * l_e, None, None, None
    a1, a2 = v1 * (1.0 - 2.0 * s1), v2 * (1.0 - 2.0 * s2)
    tdd, tde, tee = -a1 - a2, a1 - a2, -a1 - a2
    l_dd = np.where(win, -v1, np.where(loss, -v2, tdd / tt - ld_t * ld_t))
    l_de = np.where(win, v1, np.where(loss, -v2, tde / tt - ld_t * le_t))
    l_ee = np.where(win, -v1, np.where(loss, -v2, tee / tt - le_t * le_t))
    return l_, l_d, eta * l_e, l_dd, eta * l_de, eta * eta * l_ee + eta * l_e


@dataclass
class _Design:
    """The distinct battles (rows) of a fit: their design, outcome, weight and multiplicity."""

    models: list[str]
    D: Any  # scipy.sparse CSR, rows x p_d: +1 theta_a, -1 theta_b, 1 gamma, x (style)
    F: Any  # rows x p_d^2: the flattened outer products of D's rows (for Hessians)
    y: np.ndarray  # outcome per row
    w: np.ndarray  # inverse-probability weight per row
    count: np.ndarray  # battles per row
    pair: np.ndarray  # (rows, 2) model indices a, b
    bothbad: np.ndarray  # "both bad" battles per row (part of count, tie rows only)
    has_gamma: bool
    style_names: tuple[str, ...]
    style_mean: np.ndarray
    style_std: np.ndarray
    tie_model: str
    has_tau: bool

    @property
    def m(self) -> int:
        return len(self.models)

    @property
    def p_d(self) -> int:
        return self.D.shape[1]

    @property
    def p(self) -> int:
        return self.p_d + int(self.has_tau)

    @property
    def gamma_index(self) -> int | None:
        return self.m if self.has_gamma else None

    @property
    def style_slice(self) -> slice:
        start = self.m + int(self.has_gamma)
        return slice(start, start + len(self.style_names))

    def row_weights(self) -> np.ndarray:
        return self.count * self.w

    def subset(self, counts: np.ndarray) -> _Design:
        """The same rows with other multiplicities (rows at zero kept: harmless)."""
        import copy

        out = copy.copy(self)
        out.count = counts.astype(float)
        out.bothbad = np.minimum(self.bothbad, out.count)
        return out


def _style_matrix(battles: Sequence[Battle]) -> np.ndarray:
    """FastChat's style covariates: per feature (A - B) / (A + B + 1)."""
    missing = sum(1 for b in battles if not b.has_style)
    if missing:
        raise RatingsError(
            f"style control needs both answers' token counts; {missing} of {len(battles)} battles lack them"
        )
    a = np.array(
        [[b.tokens_a, *((b.markdown_a or {}).get(f, 0.0) for f in MARKDOWN_FEATURES)] for b in battles], float
    )
    bb = np.array(
        [[b.tokens_b, *((b.markdown_b or {}).get(f, 0.0) for f in MARKDOWN_FEATURES)] for b in battles], float
    )
    return (a - bb) / (a + bb + 1.0)


def _design(
    battles: Sequence[Battle], tie_model: str, bothbad: str, style: bool, gamma: bool, weighted: bool
) -> _Design:
    from scipy import sparse

    if bothbad == "drop":
        battles = [b for b in battles if b.winner != "tie (bothbad)"]
    if not battles:
        raise RatingsError("no battles to rate")
    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    if len(models) < 2:
        raise RatingsError(f"need battles between at least two models, have only {models}")
    index = {m: i for i, m in enumerate(models)}
    n = len(battles)
    a = np.fromiter((index[b.model_a] for b in battles), np.int64, n)
    b_ = np.fromiter((index[b.model_b] for b in battles), np.int64, n)
    code = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 3}
    out = np.fromiter((code[b.winner] for b in battles), np.int64, n)
    w = np.fromiter((b.weight for b in battles), float, n) if weighted else np.ones(n)
    if style:
        x = _style_matrix(battles)
        mean, std = x.mean(0), x.std(0)
        names = tuple(f for f, s in zip(STYLE_FEATURES, std, strict=True) if s > 0)
        keep = std > 0
        x = (x[:, keep] - mean[keep]) / std[keep]
        mean, std = mean[keep], std[keep]
    else:
        x, names, mean, std = np.zeros((n, 0)), (), np.zeros(0), np.zeros(0)
    # distinct rows: (a, b, outcome, weight, x) -> multiplicity; "both bad" shares the tie rows (counted apart)
    y_all = np.minimum(out, TIE)
    if x.shape[1]:
        key = np.column_stack([a, b_, y_all, w, x])
        _, first, inverse, counts = np.unique(
            key, axis=0, return_index=True, return_inverse=True, return_counts=True
        )
    else:  # one integer key per row: much faster than unique rows
        _, w_code = np.unique(w, return_inverse=True)
        key = ((w_code.reshape(-1) * len(models) + a) * len(models) + b_) * 3 + y_all
        _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    ua, ub, y, uw, ux = a[first], b_[first], y_all[first], w[first], x[first]
    u = len(first)
    bb = np.bincount(inverse, weights=(out == 3).astype(float), minlength=u)
    m = len(models)
    k = ux.shape[1]
    p_d = m + int(gamma) + k
    cols = [ua, ub]
    vals = [np.ones(u), -np.ones(u)]
    if gamma:
        cols.append(np.full(u, m))
        vals.append(np.ones(u))
    for j in range(k):
        cols.append(np.full(u, m + int(gamma) + j))
        vals.append(ux[:, j])
    cols_a, vals_a = np.column_stack(cols), np.column_stack(vals)
    rows = np.repeat(np.arange(u), cols_a.shape[1])
    D = sparse.csr_matrix((vals_a.ravel(), (rows, cols_a.ravel())), shape=(u, p_d))
    # outer products: every (col_i, col_j) of a row
    nnz = cols_a.shape[1]
    fi = (cols_a[:, :, None] * p_d + cols_a[:, None, :]).reshape(u, nnz * nnz)
    fv = (vals_a[:, :, None] * vals_a[:, None, :]).reshape(u, nnz * nnz)
    F = sparse.csr_matrix(
        (fv.ravel(), (np.repeat(np.arange(u), nnz * nnz), fi.ravel())), shape=(u, p_d * p_d)
    )
    has_tau = tie_model != "none" and bool((y == TIE).any())
    return _Design(models, D, F, y, uw, counts.astype(float), np.column_stack([ua, ub]), bb, gamma, names,
                   mean, std, tie_model, has_tau)  # fmt: skip


def _objective(des: _Design, q: np.ndarray, W: np.ndarray, prior: float, second: bool = True):
    """Penalised log-likelihood of parameters q (R x p) under row weights W (R x rows): value, gradient,
    Hessian (R x p x p, when ``second``)."""
    m, p_d = des.m, des.p_d
    d = (des.D @ q[:, :p_d].T).T  # R x rows
    tau = q[:, p_d] if des.has_tau else None
    l_, l_d, l_t, l_dd, l_dt, l_tt = _outcome_terms(des.tie_model, des.y, d, tau, second)
    theta = q[:, :m]
    ssum = theta.sum(1)
    kappa = 1.0  # the gauge: sum(theta) = 0 (the likelihood does not see it; this term fixes it)
    value = (W * l_).sum(1) - 0.5 * prior * (q * q).sum(1) - 0.5 * kappa * ssum * ssum
    g = np.zeros_like(q)
    g[:, :p_d] = (des.D.T @ (W * l_d).T).T
    if des.has_tau:
        g[:, p_d] = (W * l_t).sum(1)
    g -= prior * q
    g[:, :m] -= kappa * ssum[:, None]
    if not second:
        return value, g, None
    R = q.shape[0]
    H = np.zeros((R, des.p, des.p))
    H[:, :p_d, :p_d] = (des.F.T @ (W * l_dd).T).T.reshape(R, p_d, p_d)
    if des.has_tau:
        cross = (des.D.T @ (W * l_dt).T).T
        H[:, :p_d, p_d] = cross
        H[:, p_d, :p_d] = cross
        H[:, p_d, p_d] = (W * l_tt).sum(1)
    idx = np.arange(des.p)
    H[:, idx, idx] -= prior
    H[:, :m, :m] -= kappa
    return value, g, H


def _newton(
    des: _Design, W: np.ndarray, q0: np.ndarray, prior: float, max_iter: int = 100, tol: float = 1e-9
):
    """Maximise the penalised log-likelihood for each round (rows of W) by Newton steps, each capped and
    halved until the objective rises (rounds that have converged drop out)."""
    q = q0.copy()
    value, g, H = _objective(des, q, W, prior)
    active = np.ones(len(q), bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        try:
            step = np.linalg.solve(-H[idx], g[idx][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack(
                [np.linalg.lstsq(-h, gg, rcond=None)[0] for h, gg in zip(H[idx], g[idx], strict=True)]
            )
        step *= np.minimum(1.0, 5.0 / np.maximum(np.abs(step).max(1), 1e-300))[:, None]
        t = np.ones(len(idx))
        cand = q[idx] + step
        v, gc, Hc = _objective(des, cand, W[idx], prior)
        worse = np.flatnonzero(~(v >= value[idx] - 1e-12 * np.abs(value[idx])))
        if len(worse):
            todo = worse
            for _ in range(40):
                t[todo] *= 0.5
                cand[todo] = q[idx[todo]] + t[todo, None] * step[todo]
                nv, _, _ = _objective(des, cand[todo], W[idx[todo]], prior, second=False)
                ok = nv >= value[idx[todo]] - 1e-12 * np.abs(value[idx[todo]])
                todo = todo[~ok]
                if not len(todo):
                    break
            v[worse], gc[worse], Hc[worse] = _objective(des, cand[worse], W[idx[worse]], prior)
        q[idx], value[idx], g[idx], H[idx] = cand, v, gc, Hc
        active[idx[np.abs(t[:, None] * step).max(1) < tol]] = False
    return q, H


def _start(des: _Design) -> np.ndarray:
    q = np.zeros(des.p)
    if des.has_tau:
        wts = des.row_weights()
        f = float(wts[des.y == TIE].sum() / wts.sum())
        f = min(max(f, 1e-6), 1 - 1e-6)
        q[des.p_d] = (
            math.log(2 * f / (1 - f))
            if des.tie_model == "davidson"
            else math.log(math.log((1 + f) / (1 - f)))
        )
    return q


def _scores_cov(des: _Design, q: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model-based ((-H)^-1) and robust sandwich (H^-1 J H^-1) covariances of the full-data estimate;
    J sums each battle's weighted score outer product."""
    p_d = des.p_d
    d = des.D @ q[:p_d]
    tau = np.array([q[p_d]]) if des.has_tau else None
    _, l_d, l_t, *_ = _outcome_terms(des.tie_model, des.y, d[None], tau, second=False)
    S = des.D.multiply(l_d[0][:, None]).toarray()
    if des.has_tau:
        S = np.column_stack([S, l_t[0]])
    J = (S * (des.count * des.w * des.w)[:, None]).T @ S
    inv = np.linalg.inv(-H)
    return inv, inv @ J @ inv


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2.0))


# ---------------------------------------------------------------------------------------------------------
# Fitting.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _FitState:
    design: _Design
    q: np.ndarray
    H: np.ndarray
    cov_model: np.ndarray
    cov_robust: np.ndarray
    boot: np.ndarray | None  # rounds x p
    settings: dict[str, Any]
    offset: float  # rating = offset + scale / ln 10 * theta  (theta in logits)
    anchor_index: int | None


def _to_points(scale: float) -> float:
    return scale / _LOG10


def _check_args(ties: str, bothbad: str, confidence: float, bootstrap: int) -> None:
    if ties not in TIE_MODELS:
        raise RatingsError(f"ties must be one of {', '.join(TIE_MODELS)}, got {ties!r}")
    if bothbad not in BOTHBAD_MODES:
        raise RatingsError(f"bothbad must be one of {', '.join(BOTHBAD_MODES)}, got {bothbad!r}")
    if not 0.0 < confidence < 1.0:
        raise RatingsError(f"confidence must be between 0 and 1, got {confidence}")
    if bootstrap < 0:
        raise RatingsError(f"bootstrap rounds must be >= 0, got {bootstrap}")


def _components(des: _Design) -> list[set[str]]:
    parent = list(range(des.m))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in np.unique(des.pair[des.count > 0], axis=0):  # distinct pairs: at most m^2 of them
        parent[find(a)] = find(b)
    groups: dict[int, set[str]] = {}
    for i, name in enumerate(des.models):
        groups.setdefault(find(i), set()).add(name)
    return list(groups.values())


def _fit_core(des: _Design, prior: float) -> tuple[np.ndarray, np.ndarray]:
    q, H = _newton(des, des.row_weights()[None], _start(des)[None], prior)
    return q[0], H[0]


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _bootstrap(
    des: _Design, q_hat: np.ndarray, rounds: int, prior: float, seed: int, workers: int
) -> np.ndarray:
    """Resample the battles with replacement (multinomially over the distinct rows, "both bad" apart), refit
    each round by Newton from the full-data estimate. Rounds are fitted in chunks, ``workers`` chunks at a
    time in threads (numpy releases the GIL); the draws are made in order, so the result does not depend on
    the number of workers."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    n = int(des.count.sum())
    u = len(des.count)
    fine = np.concatenate([des.count - des.bothbad, des.bothbad])
    probs = fine / fine.sum()
    chunk = max(1, min(125, int(2e6 // max(u, 1))))
    starts = list(range(0, rounds, chunk))
    out = np.empty((rounds, des.p))

    def fit(start: int, M: np.ndarray) -> None:
        r = len(M)
        q, _ = _newton(des, M * des.w[None], np.repeat(q_hat[None], r, 0), prior, max_iter=50, tol=1e-7)
        out[start : start + r] = q

    def draw(start: int) -> np.ndarray:
        M = rng.multinomial(n, probs, size=min(chunk, rounds - start)).astype(float)
        return M[:, :u] + M[:, u:]

    workers = max(1, min(workers, len(starts)))
    if workers == 1:
        for start in starts:
            fit(start, draw(start))
        return out
    with ThreadPoolExecutor(workers) as pool:
        for g in range(0, len(starts), workers):
            group = starts[g : g + workers]
            list(pool.map(fit, group, [draw(st) for st in group]))
    return out


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
    scale: float = ELO_SCALE,
    prior: float = 1e-2,
    seed: int = 0,
    workers: int | None = None,
) -> Leaderboard:
    """Bradley–Terry maximum likelihood with ties, on an Elo-like scale (``scale`` points = 10x the odds;
    the ratings average ``anchor_rating``, or ``anchor`` is pinned to it).

    ``ties``: "davidson", "rao-kupper", or "none" (a tie counts as half a win and half a loss, as in
    FastChat). ``bothbad``: "separate" ("both bad" is a tie outcome of its own, its share reported),
    "tie" (a plain tie) or "drop" (left out). ``style_control``: length and markdown covariates (every
    battle needs token counts). ``position_bias``: estimate the first-shown answer's advantage.
    ``bootstrap``: resampling rounds (0: robust intervals only). ``weighted``: use the battles'
    inverse-probability weights. ``category``: fit one category's battles only. ``prior``: precision of a
    weak Gaussian prior on every parameter on the logit scale (keeps an unbeaten model's rating, or a
    position term that explains every vote, finite; 0.01 is a standard deviation of 10 logits).
    ``workers``: threads for the bootstrap (default: the cores this process may use, at most 8); the result
    does not depend on it."""
    import time

    t0 = time.perf_counter()
    _check_args(ties, bothbad, confidence, bootstrap)
    battles = filter_battles(battles, category)
    if not battles:
        raise RatingsError(f"no battles{'' if category is None else f' in category {category!r}'}")
    des = _design(battles, ties, bothbad, style_control, position_bias, weighted)
    parts = _components(des)
    if len(parts) > 1:
        shown = "; ".join(", ".join(sorted(p)[:4]) + ("..." if len(p) > 4 else "") for p in parts[:3])
        raise RatingsError(
            f"the models fall into {len(parts)} groups that never met ({shown}); their ratings cannot be compared"
        )
    if anchor is not None and anchor not in des.models:
        raise RatingsError(f"anchor model {anchor!r} has no battles")
    q, H = _fit_core(des, prior)
    cov_model, cov_robust = _scores_cov(des, q, H)
    boot = _bootstrap(des, q, bootstrap, prior, seed, workers or min(_cores(), 8)) if bootstrap else None
    settings = dict(ties=ties, bothbad=bothbad, style_control=style_control, position_bias=position_bias,
                    confidence=confidence, weighted=weighted, anchor=anchor, anchor_rating=anchor_rating,
                    scale=scale, prior=prior, category=category)  # fmt: skip
    state = _FitState(des, q, H, cov_model, cov_robust, boot, settings, anchor_rating,
                      None if anchor is None else des.models.index(anchor))  # fmt: skip
    lb = _leaderboard(state)
    lb.seconds = time.perf_counter() - t0
    return lb


def _gauge(state: _FitState, theta: np.ndarray) -> np.ndarray:
    """theta (.. x m, logits) -> ratings in points (anchored or averaging the offset)."""
    k = _to_points(state.settings["scale"])
    if state.anchor_index is not None:
        theta = theta - theta[..., [state.anchor_index]]
    else:
        theta = theta - theta.mean(-1, keepdims=True)
    return state.offset + k * theta


def _robust_se(state: _FitState, cov: np.ndarray | None = None) -> np.ndarray:
    """Standard errors of the ratings (points) in the leaderboard's gauge."""
    m = state.design.m
    cov = state.cov_robust if cov is None else cov
    A = np.eye(m)
    if state.anchor_index is not None:
        A[:, state.anchor_index] -= 1.0
    else:
        A -= 1.0 / m
    c = A @ cov[:m, :m] @ A.T
    return _to_points(state.settings["scale"]) * np.sqrt(np.maximum(np.diag(c), 0.0))


def _ranks(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """1 + the number of models whose interval lies wholly above each one's."""
    return 1 + (lower[None, :] > upper[:, None]).sum(1)


def _tally(des: _Design, bothbad: str) -> np.ndarray:
    """Per model (rows of the result): battles, wins, losses, ties, both bad (as ties unless kept apart)."""
    m, c, bb = des.m, des.count, des.bothbad
    a, b = des.pair[:, 0], des.pair[:, 1]
    win, loss, tie = (des.y == WIN), (des.y == LOSS), (des.y == TIE)
    per = lambda idx, w: np.bincount(idx, weights=w, minlength=m)  # noqa: E731
    out = np.zeros((m, 5))
    out[:, 0] = per(a, c) + per(b, c)
    out[:, 1] = per(a, c * win) + per(b, c * loss)
    out[:, 2] = per(a, c * loss) + per(b, c * win)
    plain_ties = c * tie - (bb if bothbad == "separate" else 0.0)
    out[:, 3] = per(a, plain_ties) + per(b, plain_ties)
    if bothbad == "separate":
        out[:, 4] = per(a, bb) + per(b, bb)
    return np.rint(out).astype(int)


def _leaderboard(state: _FitState) -> Leaderboard:
    des, q, st = state.design, state.q, state.settings
    m, k = des.m, _to_points(st["scale"])
    conf = st["confidence"]
    z = _z(conf)
    ratings = _gauge(state, q[:m])
    se = _robust_se(state)
    r_lo, r_hi = ratings - z * se, ratings + z * se
    boot = None
    if state.boot is not None:
        br = _gauge(state, state.boot[:, :m])
        alpha = (1.0 - conf) / 2.0
        b_lo, b_med, b_hi = np.quantile(br, [alpha, 0.5, 1.0 - alpha], axis=0)
        boot = (b_lo, b_med, b_hi)
        lower, upper = b_lo, b_hi
    else:
        lower, upper = r_lo, r_hi
    ranks = _ranks(lower, upper)
    tally = _tally(des, st["bothbad"])
    rows = []
    for i, name in enumerate(des.models):
        n, w, lo_, t, bb = (int(v) for v in tally[i])
        rows.append(
            ModelRating(
                model=name,
                rating=float(ratings[i]),
                lower=float(lower[i]),
                upper=float(upper[i]),
                rank=int(ranks[i]),
                battles=n,
                wins=w,
                losses=lo_,
                ties=t,
                bothbad=bb,
                robust=Interval(float(ratings[i]), float(r_lo[i]), float(r_hi[i]), float(se[i])),
                bootstrap=None
                if boot is None
                else Interval(float(boot[1][i]), float(boot[0][i]), float(boot[2][i])),
            )  # fmt: skip
        )
    rows.sort(key=lambda r: (-r.rating, r.model))

    def param(index: int, factor: float) -> Interval:
        est = float(q[index])
        rse = float(math.sqrt(max(state.cov_robust[index, index], 0.0)))
        if state.boot is not None:
            alpha = (1.0 - conf) / 2.0
            lo_, hi_ = np.quantile(state.boot[:, index], [alpha, 1.0 - alpha])
        else:
            lo_, hi_ = est - z * rse, est + z * rse
        return Interval(factor * est, factor * float(lo_), factor * float(hi_), factor * rse)

    gamma = param(des.gamma_index, k) if des.has_gamma else None
    style = {name: param(des.style_slice.start + j, k) for j, name in enumerate(des.style_names)}
    tie_params: dict[str, float] = {}
    if des.has_tau:
        tie_params["nu" if des.tie_model == "davidson" else "eta"] = float(math.exp(q[des.p_d]))
    n_tie_rows = des.count[des.y == TIE].sum()
    if st["bothbad"] == "separate":
        tie_params["bothbad_share"] = float(des.bothbad.sum() / n_tie_rows) if n_tie_rows else 0.0
    return Leaderboard(
        rows=rows, ties=st["ties"], bothbad=st["bothbad"], tie_params=tie_params, position_bias=gamma,
        style=style, n_battles=int(des.count.sum()), confidence=conf,
        interval="bootstrap" if state.boot is not None else "robust",
        bootstrap_rounds=0 if state.boot is None else len(state.boot), category=st["category"],
        scale=st["scale"], _state=state,
    )  # fmt: skip


def online_elo(
    battles: Iterable[Battle], k: float = 4.0, scale: float = ELO_SCALE, base: float = 10.0,
    init: float = ELO_BASE_RATING,
) -> dict[str, float]:  # fmt: skip
    """Sequential Elo in the battles' order (FastChat's ``compute_elo``: a tie scores 0.5)."""
    rating: dict[str, float] = {}
    for b in battles:
        ra, rb = rating.setdefault(b.model_a, init), rating.setdefault(b.model_b, init)
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        sa = 1.0 if b.winner == "model_a" else 0.0 if b.winner == "model_b" else 0.5
        rating[b.model_a] = ra + k * (sa - ea)
        rating[b.model_b] = rb + k * ((1.0 - sa) - (1.0 - ea))
    return rating


def win_rate_matrix(
    battles: Iterable[Battle], models: Sequence[str] | None = None, ties: str = "exclude"
) -> WinRates:
    """Pairwise win shares; ``ties``: "exclude" (as FastChat's heat map) or "half"."""
    if ties not in ("exclude", "half"):
        raise RatingsError(f"ties must be 'exclude' or 'half', got {ties!r}")
    battles = list(battles)
    if models is None:
        models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    index = {m: i for i, m in enumerate(models)}
    n = len(models)
    won, count, games = np.zeros((n, n)), np.zeros((n, n), int), np.zeros((n, n))
    for b in battles:
        i, j = index.get(b.model_a), index.get(b.model_b)
        if i is None or j is None:
            continue
        count[i, j] += 1
        count[j, i] += 1
        if b.winner == "model_a":
            won[i, j] += 1
        elif b.winner == "model_b":
            won[j, i] += 1
        elif ties == "half":
            won[i, j] += 0.5
            won[j, i] += 0.5
        else:
            continue
        games[i, j] += 1
        games[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, won / np.maximum(games, 1), np.nan)
    return WinRates(list(models), rate, count)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(rates: WinRates, path: str | Path | None = None, ax: Any = None) -> Any:
    """A heat map of ``rates`` (row model beats column model) with the shares written in the cells
    (matplotlib); saved to ``path`` when given. Returns the axes."""
    plt = _pyplot()
    n = len(rates.models)
    own = ax is None
    if own:
        size = max(4.0, 0.55 * n + 2.5)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(np.ma.masked_invalid(rates.rate), cmap="RdBu", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), rates.models, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), rates.models, fontsize=9)
    ax.set_xlabel("opponent (column)")
    ax.set_ylabel("model (row)")
    ax.set_title("share of battles the row model won (ties left out)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                v = rates.rate[i, j]
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v - 0.5) > 0.3 else "black")  # fmt: skip
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if own and path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
        plt.close(ax.figure)
    return ax


def plot_leaderboard(lb: Leaderboard, battles: Sequence[Battle], path: str | Path) -> Path:
    """One figure: ratings with their intervals (best at the top), and the win-rate matrix in the
    leaderboard's order; written to ``path`` (PNG)."""
    plt = _pyplot()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = len(lb.rows)
    height = max(4.0, 0.5 * n + 2.5)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(2 * height + 3, height), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    ys = np.arange(n)[::-1]
    ratings = np.array([r.rating for r in lb.rows])
    lo = np.array([r.lower for r in lb.rows])
    hi = np.array([r.upper for r in lb.rows])
    left.errorbar(ratings, ys, xerr=[ratings - lo, hi - ratings], fmt="o", color="tab:blue", capsize=3)
    labels = [f"{r.rank}. {r.model}" + (f"  (fragility {r.fragility})" if r.fragility is not None else "")
              for r in lb.rows]  # fmt: skip
    left.set_yticks(ys, labels, fontsize=9)
    left.set_xlabel(f"rating ({lb.scale:.0f} points = 10x the odds)")
    what = f"{lb.confidence:.0%} {lb.interval} interval"
    cat = f", category {lb.category}" if lb.category else ""
    left.set_title(
        f"Bradley–Terry ({lb.ties} ties), {lb.n_battles} battles{cat}\n{what}; rank = 1 + models wholly above"
    )
    left.grid(axis="x", alpha=0.3)
    plot_win_rates(win_rate_matrix(filter_battles(battles, lb.category), lb.models), ax=right)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


# ---------------------------------------------------------------------------------------------------------
# Beyond the ratings.
# ---------------------------------------------------------------------------------------------------------


def _refit_robust(state: _FitState, counts: np.ndarray, q0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratings and robust half-widths (points) after changing the rows' multiplicities."""
    des = state.design.subset(counts)
    q, H = _newton(des, des.row_weights()[None], q0[None], state.settings["prior"], max_iter=60, tol=1e-8)
    _, cov = _scores_cov(des, q[0], H[0])
    st = _FitState(des, q[0], H[0], cov, cov, None, state.settings, state.offset, state.anchor_index)
    return _gauge(st, q[0][: des.m]), _z(state.settings["confidence"]) * _robust_se(st)


def _robust_ranks(ratings: np.ndarray, half: np.ndarray) -> np.ndarray:
    return _ranks(ratings - half, ratings + half)


def _remove(counts: np.ndarray, order: np.ndarray, nvotes: int) -> np.ndarray:
    """``counts`` less ``nvotes`` battles taken from the rows in ``order``, each row emptied in turn."""
    out = counts.copy()
    left = nvotes
    for u in order:
        take = min(left, out[u])
        out[u] -= take
        left -= take
        if left <= 0:
            break
    return out


def _flip_search(state: _FitState, i: int, rank: int, order: np.ndarray, start: int, limit: int | None):
    """The shortest prefix (in votes) of ``order`` whose removal changes model i's rank: grow from
    ``start`` by half each time until a refit shows a change, then bisect. (votes, counts, new rank) or None."""
    des = state.design
    total = int(des.count[order].sum())
    cache: dict[int, int | None] = {}

    def new_rank(nvotes: int) -> int | None:
        if nvotes not in cache:
            counts = _remove(des.count, order, nvotes)
            cache[nvotes] = None
            if counts.sum() >= 1:
                r, h = _refit_robust(state, counts, state.q)
                got = int(_robust_ranks(r, h)[i])
                cache[nvotes] = got if got != rank else None
        return cache[nvotes]

    lo, hi, nv = 0, None, max(1, min(start, total))
    while True:
        if limit is not None and nv >= limit:
            return None
        if new_rank(nv) is not None:
            hi = nv
            break
        if nv >= total:
            return None
        lo, nv = nv, min(total, max(nv + 1, int(nv * 1.5)))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if new_rank(mid) is not None:
            hi = mid
        else:
            lo = mid
    return hi, _remove(des.count, order, hi), new_rank(hi)


def rank_fragility(
    battles: Sequence[Battle] | None,
    lb: Leaderboard,
    models: Sequence[str] | None = None,
    candidates: int = 3,
) -> dict[str, Fragility]:
    """Per model, the fewest votes found whose removal changes its rank, with refits at ``lb``'s settings
    and robust intervals (every removal reported is checked by a refit); written into ``lb``'s rows.

    For each other model j whose "wholly above" relation to this model could flip, the votes are ordered
    by their influence on the margin between j's interval and this model's (one Newton step per removed
    vote); for the ``candidates`` most promising j the shortest prefix that changes the rank is found by
    refits (grow, then bisect), and the smallest kept. A found count is an upper bound on the true minimum.
    ``battles`` is not needed (the fit's battles are in ``lb``); it is accepted for symmetry."""
    del battles
    state: _FitState = lb._state
    des = state.design
    m, p_d = des.m, des.p_d
    names = des.models
    k = _to_points(state.settings["scale"])
    base_r, base_h = _refit_robust(state, des.count, state.q)
    base_rank = _robust_ranks(base_r, base_h)
    # each row's score for one battle; removing one battle of row u moves q by about -(-H)^-1 (w_u s_u)
    d = des.D @ state.q[:p_d]
    tau = np.array([state.q[p_d]]) if des.has_tau else None
    _, l_d, l_t, *_ = _outcome_terms(des.tie_model, des.y, d[None], tau, second=False)
    S = des.D.multiply(l_d[0][:, None]).toarray()
    if des.has_tau:
        S = np.column_stack([S, l_t[0]])
    delta = -(np.linalg.solve(-state.H, (S * des.w[:, None]).T)).T  # rows x p
    out: dict[str, Fragility] = {}
    for name in names if models is None else list(models):
        if name not in names:
            raise RatingsError(f"no model {name!r} on this leaderboard")
        i = names.index(name)
        plans = []
        for j in range(m):
            if j == i:
                continue
            margin = (base_r[j] - base_h[j]) - (base_r[i] + base_h[i])  # > 0: j lies wholly above i
            gain = (
                (-1.0 if margin > 0 else 1.0) * k * (delta[:, j] - delta[:, i])
            )  # toward the flip, per vote
            order = np.argsort(-gain)
            order = order[(gain[order] > 0) & (des.count[order] > 0)]
            if not len(order):
                continue
            cum = np.cumsum(gain[order] * des.count[order])
            hit = int(np.searchsorted(cum, abs(margin) + 1e-9))
            est = int(des.count[order][:hit].sum()) + 1
            plans.append((est, order))
        plans.sort(key=lambda t: t[0])
        best = None
        for est, order in plans[:candidates]:
            found = _flip_search(state, i, int(base_rank[i]), order, est, None if best is None else best[0])
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        if best is None:
            out[name] = Fragility(name, int(base_rank[i]), None, None)
            continue
        removed = []
        gone = des.count - best[1]
        for u in np.flatnonzero(gone > 0):
            a, b = des.pair[u]
            removed.append((names[a], names[b], ("model_a", "model_b", "tie")[des.y[u]], int(gone[u])))
        out[name] = Fragility(name, int(base_rank[i]), int(best[0]), best[2], tuple(removed))
    for r in lb.rows:
        if r.model in out:
            r.fragility = out[r.model].votes
    return out


def _pair_information(state: _FitState, i: int, j: int) -> np.ndarray:
    """Expected Fisher information (p x p) of one more battle between models i and j, shown in either order
    with equal chance and with average style (x = 0)."""
    des, q = state.design, state.q
    p_d = des.p_d
    info = np.zeros((des.p, des.p))
    for a, b in ((i, j), (j, i)):
        u = np.zeros(p_d)
        u[a], u[b] = 1.0, -1.0
        if des.has_gamma:
            u[des.gamma_index] = 1.0
        d = np.array([[float(u @ q[:p_d])]])
        tau = np.array([q[p_d]]) if des.has_tau else None
        for y in (WIN, LOSS, TIE) if des.has_tau else (WIN, LOSS):
            l_, _, _, l_dd, l_dt, l_tt = _outcome_terms(des.tie_model, np.array([y]), d, tau)
            prob = float(np.exp(l_[0, 0]))
            h = np.zeros((des.p, des.p))
            h[:p_d, :p_d] = l_dd[0, 0] * np.outer(u, u)
            if des.has_tau:
                h[:p_d, p_d] = h[p_d, :p_d] = l_dt[0, 0] * u
                h[p_d, p_d] = l_tt[0, 0]
            info -= 0.5 * prob * h
    return info


def votes_to_separate(
    lb: Leaderboard,
    model_a: str,
    model_b: str,
    confidence: float | None = None,
    criterion: str = "rank",
) -> Separation:
    """Battles between ``model_a`` and ``model_b`` still needed, at the estimated gap, until they separate:
    ``criterion="rank"``: their intervals no longer overlap (so their ranks differ); "difference": the
    interval of their difference excludes zero. The information each new battle adds is the model's
    expected information at the current estimate; the current uncertainty is the fit's robust one."""
    if criterion not in ("rank", "difference"):
        raise RatingsError(f"criterion must be 'rank' or 'difference', got {criterion!r}")
    state: _FitState = lb._state
    names = state.design.models
    for name in (model_a, model_b):
        if name not in names:
            raise RatingsError(f"no model {name!r} on this leaderboard")
    conf = lb.confidence if confidence is None else confidence
    if not 0 < conf < 1:
        raise RatingsError(f"confidence must be between 0 and 1, got {conf}")
    z = _z(conf)
    i, j = names.index(model_a), names.index(model_b)
    m = state.design.m
    k = _to_points(state.settings["scale"])
    gap = k * float(state.q[i] - state.q[j])
    # the current information: the inverse of the robust covariance (the gauge direction filled in)
    ones = np.zeros(state.design.p)
    ones[:m] = 1.0
    cov0 = state.cov_robust + np.outer(ones, ones)
    info0 = np.linalg.inv(cov0)
    pair = _pair_information(state, i, j)
    e = np.zeros(state.design.p)
    e[i], e[j] = 1.0, -1.0

    def separated(n: int) -> bool:
        cov = np.linalg.inv(info0 + n * pair)
        if criterion == "difference":
            return abs(gap) >= z * k * math.sqrt(max(e @ cov @ e, 0.0))
        st = _FitState(
            state.design, state.q, state.H, cov, cov, None, state.settings, state.offset, state.anchor_index
        )
        se = _robust_se(st)
        return abs(gap) >= z * (se[i] + se[j])

    if separated(0):
        return Separation(model_a, model_b, gap, 0, conf, criterion)
    if gap == 0.0:
        return Separation(model_a, model_b, gap, None, conf, criterion)
    hi = 1
    while not separated(hi):
        hi *= 2
        if hi > 10**9:
            return Separation(model_a, model_b, gap, None, conf, criterion)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if separated(mid):
            hi = mid
        else:
            lo = mid
    return Separation(model_a, model_b, gap, hi, conf, criterion)


def adjacent_separations(
    lb: Leaderboard, confidence: float | None = None, criterion: str = "rank"
) -> list[Separation]:
    """``votes_to_separate`` for each pair of neighbours on the leaderboard (by rating)."""
    return [
        votes_to_separate(lb, a.model, b.model, confidence, criterion)
        for a, b in zip(lb.rows, lb.rows[1:], strict=False)
    ]


def next_pair(
    lb: Leaderboard | None,
    models: Sequence[str],
    rng: np.random.Generator | None = None,
    explore: float = 0.2,
) -> PairChoice:
    """The next anonymous battle's pair, drawn with probability (1 - explore) x the pair's share of the
    expected reduction in uncertainty + explore x uniform, so that every pair keeps a chance. The
    uncertainty is the sum of the variances of the neighbours' gaps (what the ranks hang on); one more
    battle of pair (i, j) adds its expected information f u u^T (u = e_i - e_j), and the variance of a gap
    v falls by f (v' C u)^2 / (1 + f u' C u) (Sherman–Morrison). Models without battles on ``lb`` (or no
    ``lb``) make their pairs the first choice. Store ``prob`` / ``weight`` with the vote (``ARENA_META``)
    so that the fit weights it by the inverse probability."""
    models = list(dict.fromkeys(models))
    if len(models) < 2:
        raise RatingsError(f"need at least two models to pick a pair, have {models}")
    if not 0.0 <= explore <= 1.0:
        raise RatingsError(f"explore must be between 0 and 1, got {explore}")
    rng = np.random.default_rng() if rng is None else rng
    pairs = [(models[a], models[b]) for a in range(len(models)) for b in range(a + 1, len(models))]
    n_pairs = len(pairs)
    score = np.zeros(n_pairs)
    known = set(lb._state.design.models) if lb is not None else set()
    new = np.array([a not in known or b not in known for a, b in pairs])
    if lb is not None and not new.all():
        state: _FitState = lb._state
        names = state.design.models
        ones = np.zeros(state.design.p)
        ones[: state.design.m] = 1.0
        # the scores' covariance with the sum-to-zero gauge pinned; used as it is, never inverted: with one
        # pair played so far the extra parameters (e.g. the first-position bias) are collinear and it is singular
        C = state.cov_robust + np.outer(ones, ones)
        order = [names.index(r.model) for r in lb.rows if r.model in models]
        V = np.zeros((max(len(order) - 1, 0), state.design.p))
        for t, (x, y) in enumerate(zip(order, order[1:], strict=False)):
            V[t, x], V[t, y] = 1.0, -1.0
        for t, (a, b) in enumerate(pairs):
            if new[t]:
                continue
            i, j = names.index(a), names.index(b)
            f_info = _pair_information(state, i, j)
            u = np.zeros(state.design.p)
            u[i], u[j] = 1.0, -1.0
            f = float(f_info[i, i])  # the information one battle adds along u
            cu = C @ u
            score[t] = f * float(((V @ cu) ** 2).sum()) / (1.0 + f * float(u @ cu))
    if new.any():
        focus = new.astype(float)
    else:
        focus = score
    total = focus.sum()
    base = focus / total if total > 0 else np.full(n_pairs, 1.0 / n_pairs)
    probs = (1.0 - explore) * base + explore / n_pairs
    probs /= probs.sum()
    t = int(rng.choice(n_pairs, p=probs))
    prob = float(probs[t])
    return PairChoice(
        pairs[t][0], pairs[t][1], prob, 1.0 / (n_pairs * prob), dict(zip(pairs, probs.tolist(), strict=True))
    )


def ratings_json(lb: Leaderboard, path: str | Path) -> Path:
    """Write ``lb.to_dict()`` as JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(lb.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
