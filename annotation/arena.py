"""Arena battles as store items: what the comparison app (``ui/arena.py``) records, in plain functions.

A battle is one user's side-by-side comparison of two models: the same user turns go to both, each model
answers from its own conversation (as in FastChat's arena), and one vote (A = left, B = right, tie, both
bad) ends it. ``ArenaBattle.to_item`` turns a judged battle into a comparison item of the annotation store
(``Store.record_judged_item`` stores it with its vote in one transaction), so the store's export
(``annotation/export.py``) makes the same preference records of it as of annotator votes:

- the item's prompt is the conversation up to the last user turn; its answers are the two models' last
  answers in display order (A = left, B = right), each a generation with its model, checkpoint, sampling
  parameters and chat-template hash;
- ``item.meta["arena"]`` (``ARENA_META``, read by ``annotation.ratings.battles_from_store``) holds the
  bookkeeping: ``mode`` (anonymous / named), ``counted`` (false: stored but not rated), ``leaked`` and
  ``leaks`` (why: the user named a model, or an answer named one), ``battle_id``, ``user``, ``turns``,
  ``left`` / ``right`` (the models as shown), ``regenerations``, ``started_at`` / ``voted_at`` (UTC,
  ISO 8601), ``finish_reasons``, ``tokens`` (each answer's length in tokens), and, when the pair was chosen by ``ratings.next_pair``, ``pair_prob`` and
  ``weight``;
- the item's batch is ``"arena"`` and it is closed: nobody else is ever assigned it.

After more than one turn the two models have answered different conversations, so the pair has no shared
prompt; such a battle is rated but not exported as a training pair (``export_records`` counts it under
``skipped["arena_multi_turn"]``), and each answer keeps its own conversation in its generation's meta.

A vote counts for the leaderboard only in an anonymous battle in which no identity leaked.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from glmwb.annotation.ratings import ARENA_META
from glmwb.annotation.store import NewItem, NewResponse

ARENA_BATCH = "arena"
MODES = ("anonymous", "named")
ARENA_CHOICES = ("A", "B", "tie", "both_bad")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _name_pattern(name: str) -> re.Pattern:
    # a name counts when it stands alone: "glm-sft" in "I am glm-sft." but not in "xglm-sfty"
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def identity_leaks(
    user_turns: Iterable[str], answers: Mapping[str, str], names: Mapping[str, Sequence[str]]
) -> list[str]:
    """Why the models' identities are no longer hidden: a user turn names one of the models, or an answer
    (by side, "A" / "B") names one. ``names``: model -> the names it goes by (its own first). Names
    shorter than 3 characters are ignored (too many false alarms)."""
    reasons = []
    patterns = {
        model: [_name_pattern(n) for n in dict.fromkeys([model, *aliases]) if len(n) >= 3]
        for model, aliases in names.items()
    }
    for text in user_turns:
        for model, ps in patterns.items():
            if any(p.search(text) for p in ps) and f"the user named {model}" not in reasons:
                reasons.append(f"the user named {model}")
    for side, text in answers.items():
        for model, ps in patterns.items():
            if any(p.search(text) for p in ps):
                reasons.append(f"answer {side} named {model}")
    return reasons


@dataclass
class BattleSide:
    """One model's part of a battle: who it is and its own conversation (user turns and its answers)."""

    model: str
    checkpoint: str | None
    chat_template_sha256: str | None
    sampling: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated tokens of each answer

    @property
    def answer(self) -> str:
        return (
            self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""
        )


@dataclass
class ArenaBattle:
    """A battle between ``left`` (shown as A) and ``right`` (B), as the app keeps it while it runs."""

    battle_id: str
    user: str
    mode: str
    left: BattleSide
    right: BattleSide
    aliases: dict[str, list[str]] = field(default_factory=dict)  # model -> other names it goes by
    pair_prob: float | None = None
    weight: float = 1.0
    category: str | None = None
    started_at: float = field(default_factory=time.time)
    regenerations: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def sides(self) -> dict[str, BattleSide]:
        return {"A": self.left, "B": self.right}

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.left.messages)

    @property
    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.left.messages if m["role"] == "user"]

    def leaks(self) -> list[str]:
        names = {s.model: self.aliases.get(s.model, []) for s in (self.left, self.right)}
        answers = {
            k: "\n".join(m["content"] for m in s.messages if m["role"] == "assistant")
            for k, s in self.sides.items()
        }
        return identity_leaks(self.user_turns, answers, names)

    def counted(self) -> bool:
        return self.mode == "anonymous" and not self.leaks()

    def meta(self, voted_at: float) -> dict[str, Any]:
        leaks = self.leaks()
        meta = {
            "mode": self.mode,
            "counted": self.mode == "anonymous" and not leaks,
            "leaked": bool(leaks),
            "leaks": leaks,
            "battle_id": self.battle_id,
            "user": self.user,
            "turns": self.turns,
            "left": self.left.model,
            "right": self.right.model,
            "regenerations": self.regenerations,
            "started_at": _utc(self.started_at),
            "voted_at": _utc(voted_at),
            "finish_reasons": {
                k: s.finish_reasons[-1] if s.finish_reasons else "" for k, s in self.sides.items()
            },
            "weight": self.weight,
        }
        if all(s.tokens for s in (self.left, self.right)):  # the answers' lengths, for style control
            meta["tokens"] = {k: s.tokens[-1] for k, s in self.sides.items()}
        if self.pair_prob is not None:
            meta["pair_prob"] = self.pair_prob
        if self.category:
            meta["category"] = self.category
        return meta

    def to_item(self, voted_at: float | None = None) -> NewItem:
        """The judged battle as a comparison item in display order (see the module docstring)."""
        if not (self.left.answer and self.right.answer):
            raise ValueError("a battle is judged after both models answered")
        multi_turn = self.turns > 1
        responses = [
            NewResponse(
                text=s.answer,
                model=s.model,
                checkpoint=s.checkpoint,
                sampling=dict(s.sampling),
                chat_template_sha256=s.chat_template_sha256,
                meta={"conversation": s.messages[:-1]} if multi_turn else {},
            )
            for s in (self.left, self.right)
        ]
        return NewItem(
            prompt_uid=f"arena:{self.battle_id}",
            prompt=[dict(m) for m in self.left.messages[:-1]],
            responses=responses,
            source=ARENA_BATCH,
            prompt_meta={"category": self.category} if self.category else {},
            batch=ARENA_BATCH,
            meta={ARENA_META: self.meta(time.time() if voted_at is None else voted_at)},
            shuffle=False,
        )


def draw_pair(
    models: Sequence[str], rng: random.Random, leaderboard: Any = None
) -> tuple[str, str, float | None, float]:
    """(left, right, pair probability, weight) for an anonymous battle: the pair from
    ``ratings.next_pair`` when a leaderboard is given (active selection, its inverse-probability weight
    stored with the vote), else uniform over the pairs; left / right in random order either way."""
    if len(models) < 2:
        raise ValueError("an arena needs at least two models")
    if leaderboard is None:
        a, b = rng.sample(list(models), 2)
        n = len(models)
        return a, b, 2.0 / (n * (n - 1)), 1.0
    import numpy as np

    from glmwb.annotation.ratings import next_pair

    choice = next_pair(leaderboard, list(models), np.random.default_rng(rng.getrandbits(64)))
    pair = [choice.model_a, choice.model_b]
    rng.shuffle(pair)
    return pair[0], pair[1], choice.prob, choice.weight


class RateLimiter:
    """Per user: at most ``per_minute`` requests in any 60 s, and ``per_day`` per UTC day.

    ``take(user)`` records a request and returns None, or refuses (records nothing) with the reason."""

    def __init__(self, per_minute: int = 10, per_day: int = 500, clock=time.time) -> None:
        if per_minute < 1 or per_day < 1:
            raise ValueError("per_minute and per_day must be >= 1")
        self.per_minute, self.per_day, self.clock = per_minute, per_day, clock
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._daily: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()

    def take(self, user: str) -> str | None:
        now = self.clock()
        day = datetime.fromtimestamp(now, timezone.utc).date().isoformat()
        with self._lock:
            recent = self._recent[user]
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            if self._daily[user, day] >= self.per_day:
                return f"daily cap reached ({self.per_day} prompts a day); come back tomorrow (UTC)"
            if len(recent) >= self.per_minute:
                wait = int(recent[0] + 60.0 - now) + 1
                return f"rate limit: at most {self.per_minute} prompts a minute; try again in {wait} s"
            recent.append(now)
            self._daily[user, day] += 1
            return None
