"""The preference store's SQL schema (SQLAlchemy 2.x declarative models).

    annotators ─┬─< sessions                       (API tokens and page sessions, SHA-256 digests)
                ├─< assignments >── items ──< item_responses >── generations >── prompts
                └─< votes >──────── assignments

- ``prompts``: chat messages (the turns before the judged answer), a unique external ``uid``, metadata.
- ``generations``: one answer to a prompt with its provenance: model, checkpoint, sampling parameters and
  the SHA-256 of the chat template it was rendered with.
- ``items``: one comparison of two or more generations of one prompt; ``item_responses.position`` is the
  display order (A, B, ...), drawn at random when the item is made and then fixed, so every annotator of an
  item sees the same order and a vote's letter means the same answer for all of them. ``gold_choice`` (a
  letter, "tie" or "both_bad") marks a gold item with a known answer.
- ``assignments``: an item given to an annotator. ``UNIQUE(item_id, annotator_id)``: never twice to one
  annotator; ``UNIQUE(item_id, slot)`` with ``slot < overlap`` in code: at most ``overlap`` regular
  annotators per item, even when two servers assign at the same instant. Gold assignments have no slot.
  ``items.assigned`` counts the taken slots (updated with them) and ``ix_items_queue``, a partial index on
  the items with a free slot, makes "the next item" an index lookup.
- ``votes``: the judgement, and for a winner optionally its ``strength`` (negligible / slight / clear /
  strong better, ``annotation.records.STRENGTHS``; the export turns it into the record's margin). ``uid``
  is the client's idempotency key (``UNIQUE``: a retried submit cannot store a second vote), and a partial
  unique index allows one *active* (not retracted) vote per assignment.
  Undo retracts a vote (``retracted_at``) instead of deleting it: no judgement is ever lost.

Timestamps are naive UTC (``utcnow()``) so that SQLite and PostgreSQL store and compare them alike.
The migrations in ``annotation/migrations`` create exactly this schema (tested).
"""

from __future__ import annotations

import string
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from glmwb.annotation.records import STRENGTHS

MAX_RESPONSES = 4  # answers per comparison item: letters A..D
LETTERS = tuple(string.ascii_uppercase[:MAX_RESPONSES])
CHOICES = (*LETTERS, "tie", "both_bad")  # a vote: the best answer's letter, a tie, or all answers bad
ROLES = ("annotator", "admin", "external")  # external: an imported data set's labeller; cannot log in
ASSIGNMENT_STATUSES = ("pending", "done", "skipped")
ITEM_STATUSES = ("open", "closed")  # closed items are never assigned (e.g. imported public sets)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Named constraints, so that migrations on SQLite (batch mode) and PostgreSQL can refer to them.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: JSON, list[dict[str, Any]]: JSON}


class Annotator(Base):
    __tablename__ = "annotators"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))  # argon2id; NULL: cannot log in
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Session(Base):
    """A sign-in session: a bearer token of the JSON API or the annotator page's session cookie; only its
    SHA-256 is stored, so a database dump grants nothing. Deleted by sign-out, a new password or disabling
    the account; past ``expires_at`` it counts for nothing."""

    __tablename__ = "sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(255), unique=True)  # e.g. the world's prompt id, a data set row
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(255), default="")
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Generation(Base):
    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(512))  # a name: "policy-r2", "world:correct", "import:hh-rlhf"
    checkpoint: Mapped[str | None] = mapped_column(String(1024))  # the folder sampled from
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # temperature, top_p, seed, ...
    chat_template_sha256: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    prompt: Mapped[Prompt] = relationship()


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        CheckConstraint(_in("status", ITEM_STATUSES), name="status"),
        CheckConstraint(f"gold_choice IS NULL OR {_in('gold_choice', CHOICES)}", name="gold_choice"),
        CheckConstraint("overlap >= 1", name="overlap"),
        CheckConstraint("assigned >= 0 AND assigned <= overlap", name="assigned"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    overlap: Mapped[int] = mapped_column(Integer, default=3)  # distinct annotators wanted
    assigned: Mapped[int] = mapped_column(Integer, default=0)  # slots taken (kept with the assignments)
    priority: Mapped[float] = mapped_column(Float, default=0.0)  # higher is served first
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open")
    batch: Mapped[str] = mapped_column(String(128), default="")
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    prompt: Mapped[Prompt] = relationship()
    responses: Mapped[list[ItemResponse]] = relationship(order_by="ItemResponse.position")


# The work queue: open regular items with a free slot, best first. A partial index, so that finding the next
# item reads a few index entries however many items are full or closed.
QUEUE_PREDICATE = "status = 'open' AND gold_choice IS NULL AND assigned < overlap"
Index(
    "ix_items_queue",
    Item.priority.desc(),
    Item.id,
    sqlite_where=text(QUEUE_PREDICATE),
    postgresql_where=text(QUEUE_PREDICATE),
)


class ItemResponse(Base):
    __tablename__ = "item_responses"
    __table_args__ = (
        UniqueConstraint("item_id", "generation_id"),
        CheckConstraint(f"position >= 0 AND position < {MAX_RESPONSES}", name="position"),
    )

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 = A, 1 = B, ...
    generation_id: Mapped[int] = mapped_column(ForeignKey("generations.id"), index=True)

    generation: Mapped[Generation] = relationship()


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator_id"),  # never twice to one annotator
        UniqueConstraint("item_id", "slot"),  # at most `overlap` regular annotators (NULL slots: gold)
        CheckConstraint(_in("status", ASSIGNMENT_STATUSES), name="status"),
        Index("ix_assignments_queue", "annotator_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    slot: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    skips: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        CheckConstraint(_in("choice", CHOICES), name="choice"),
        CheckConstraint("time_spent_s IS NULL OR time_spent_s >= 0", name="time_spent"),
        CheckConstraint(f"strength IS NULL OR {_in('strength', STRENGTHS)}", name="strength"),
        # One active vote per assignment: a second one is refused by the database itself.
        Index(
            "uq_votes_active_assignment",
            "assignment_id",
            unique=True,
            sqlite_where=text("retracted_at IS NULL"),
            postgresql_where=text("retracted_at IS NULL"),
        ),
        Index("ix_votes_annotator", "annotator_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)  # client-supplied idempotency key
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    choice: Mapped[str] = mapped_column(String(16))
    ratings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {attribute: {letter: 1..5}}
    strength: Mapped[str | None] = mapped_column(String(16))  # how much better the winner is (letters only)
    rationale: Mapped[str] = mapped_column(Text, default="")
    time_spent_s: Mapped[float | None] = mapped_column(Float)
    guideline_version: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    retracted_at: Mapped[datetime | None] = mapped_column(DateTime)
