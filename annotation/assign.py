"""Which item an annotator sees next.

Rules (enforced by the database where a race could break them, see ``annotation/schema.py``):

- every regular item goes to ``item.overlap`` distinct annotators: an assignment takes a *slot*
  ``0 <= slot < overlap`` and ``UNIQUE(item_id, slot)`` refuses a second holder of a slot;
- never twice to one annotator: ``UNIQUE(item_id, annotator_id)``;
- gold items (known answers, ``items.gold_choice``) are mixed in at ``gold_rate``: on each new assignment a
  deterministic coin (a hash of seed, annotator and how many items they were given) decides whether it is a
  gold turn; gold items take no slot, so any number of annotators may see them;
- priority: higher ``items.priority`` first (e.g. reward-model disagreement, ``priority_from_scores``), then
  oldest first, so that started items fill up before new ones are opened (complete items accrue);
- order of service: an annotator's pending assignment first (the one just undone, or one left open by a
  closed browser tab), then a new one, then the items they skipped, oldest skip first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, exists, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from glmwb.annotation.schema import QUEUE_PREDICATE, Assignment, Item, utcnow


@dataclass(frozen=True)
class AssignmentPolicy:
    gold_rate: float = 0.1  # share of new assignments that are gold items (while unseen gold items remain)
    seed: int = 0
    candidates: int = 16  # items tried per request before giving up on a lost race

    def __post_init__(self) -> None:
        if not 0.0 <= self.gold_rate <= 1.0:
            raise ValueError(f"gold_rate must be in [0, 1], got {self.gold_rate}")

    def gold_turn(self, annotator_id: int, served: int) -> bool:
        """Whether an annotator's ``served``-th new assignment (0-based) should be a gold item."""
        digest = hashlib.sha256(f"{self.seed}|gold|{annotator_id}|{served}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.gold_rate


def priority_from_scores(scores: Sequence[float], kind: str = "margin") -> float:
    """An item's priority from a reward model's scores of its answers (higher is labelled first).

    kind="margin": -|s_A - s_B| (for more answers, minus the gap between the best two): the pairs the
    reward model can least tell apart first. kind="spread": the standard deviation of the scores of one
    answer across an ensemble of reward models (pass those scores): where the models disagree, first.
    """
    if len(scores) < 2:
        raise ValueError("priority_from_scores needs at least two scores")
    if kind == "margin":
        top = sorted(scores, reverse=True)
        return -(top[0] - top[1])
    if kind == "spread":
        mean = sum(scores) / len(scores)
        return (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    raise ValueError(f"kind must be 'margin' or 'spread', got {kind!r}")


AS, IT = Assignment.__table__, Item.__table__  # Core tables: this is the hot path of every request


def _mine(annotator_id: int):
    return exists().where(AS.c.item_id == IT.c.id, AS.c.annotator_id == annotator_id)


def _queue():
    # Exactly the text of the partial index's predicate (literals, not bound parameters): only then can the
    # planners prove that the index covers the query.
    return text(QUEUE_PREDICATE)


def regular_candidates(conn: Connection, annotator_id: int, limit: int) -> list[int]:
    """Open regular items with a free slot that this annotator has not had, best first.

    On PostgreSQL the best one only, locked (``FOR UPDATE SKIP LOCKED``): concurrent requests each take a
    different item instead of all racing for the first one (the unique constraints stay the guarantee)."""
    q = select(IT.c.id).where(_queue(), ~_mine(annotator_id)).order_by(IT.c.priority.desc(), IT.c.id)
    if conn.dialect.name == "postgresql":
        q = q.limit(1).with_for_update(skip_locked=True)
    else:
        q = q.limit(limit)
    return [r[0] for r in conn.execute(q)]


def gold_candidates(conn: Connection, annotator_id: int, limit: int) -> list[int]:
    rows = conn.execute(
        select(IT.c.id)
        .where(IT.c.status == "open", IT.c.gold_choice.is_not(None), ~_mine(annotator_id))
        .order_by(IT.c.priority.desc(), IT.c.id)
        .limit(limit)
    )
    return [r[0] for r in rows]


def has_regular_work(conn: Connection, annotator_id: int) -> bool:
    return conn.execute(select(exists(select(IT.c.id).where(_queue(), ~_mine(annotator_id))))).scalar_one()


def available_count(conn: Connection, annotator_id: int) -> int:
    """Regular items this annotator could still be given."""
    return conn.execute(select(func.count(IT.c.id)).where(_queue(), ~_mine(annotator_id))).scalar_one()


def _insert(conn: Connection, item_id: int, annotator_id: int, slot: int | None) -> int:
    now = utcnow()
    values = {"item_id": item_id, "annotator_id": annotator_id, "slot": slot, "status": "pending", "skips": 0}
    assignment_id = conn.execute(
        insert(AS).values(**values, created_at=now, updated_at=now).returning(AS.c.id)
    ).scalar_one()
    if slot is not None:
        conn.execute(update(IT).where(IT.c.id == item_id).values(assigned=IT.c.assigned + 1))
    return assignment_id


def _try_assign(conn: Connection, item_id: int, annotator_id: int, gold: bool) -> int | None:
    """Give the item to the annotator (gold: without a slot; else the lowest free slot); None when it has no
    free slot any more or a unique constraint says someone else won the race (PostgreSQL; SQLite's write
    transactions are serialised, so no race can happen there)."""
    slot = None
    if not gold:
        overlap = conn.execute(select(IT.c.overlap).where(IT.c.id == item_id)).scalar_one()
        used = set(
            conn.execute(select(AS.c.slot).where(AS.c.item_id == item_id, AS.c.slot.is_not(None))).scalars()
        )
        free = [k for k in range(overlap) if k not in used]
        if not free:
            return None
        slot = free[0]
    if conn.dialect.name == "sqlite":
        return _insert(conn, item_id, annotator_id, slot)
    try:
        with conn.begin_nested():
            return _insert(conn, item_id, annotator_id, slot)
    except IntegrityError:
        return None


def _new_assignment(conn: Connection, annotator_id: int, policy: AssignmentPolicy) -> tuple[int, int] | None:
    # Gold items are checks, not work: one is given on a gold turn only (never once the real work has run out).
    served = 0
    if policy.gold_rate > 0:
        served = conn.execute(
            select(func.count(AS.c.id)).where(AS.c.annotator_id == annotator_id)
        ).scalar_one()
    if (
        policy.gold_rate > 0
        and policy.gold_turn(annotator_id, served)
        and has_regular_work(conn, annotator_id)
    ):
        for item_id in gold_candidates(conn, annotator_id, policy.candidates):
            assignment_id = _try_assign(conn, item_id, annotator_id, gold=True)
            if assignment_id is not None:
                return assignment_id, item_id
    for _ in range(3):  # a lost race (PostgreSQL) re-reads the candidates
        candidates = regular_candidates(conn, annotator_id, policy.candidates)
        for item_id in candidates:
            assignment_id = _try_assign(conn, item_id, annotator_id, gold=False)
            if assignment_id is not None:
                return assignment_id, item_id
        if not candidates:
            break
    return None


def next_assignment(conn: Connection, annotator_id: int, policy: AssignmentPolicy) -> tuple[int, int] | None:
    """(assignment id, item id) to show this annotator now (created when needed), or None when nothing is
    left. Runs inside the caller's write transaction; the caller commits."""
    pending = conn.execute(
        select(AS.c.id, AS.c.item_id)
        .where(AS.c.annotator_id == annotator_id, AS.c.status == "pending")
        .order_by(AS.c.updated_at.desc(), AS.c.id.desc())
        .limit(1)
    ).first()
    if pending is not None:
        return pending.id, pending.item_id
    new = _new_assignment(conn, annotator_id, policy)
    if new is not None:
        return new
    skipped = conn.execute(
        select(AS.c.id, AS.c.item_id)
        .where(AS.c.annotator_id == annotator_id, AS.c.status == "skipped")
        .order_by(AS.c.updated_at, AS.c.id)
        .limit(1)
    ).first()
    if skipped is None:
        return None
    conn.execute(update(AS).where(AS.c.id == skipped.id).values(status="pending", updated_at=utcnow()))
    return skipped.id, skipped.item_id
