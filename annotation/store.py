"""The preference store: accounts, prompts, generations, comparison items, assignments and votes.

``Store(url)`` opens (and migrates to the newest schema) an SQLite file or a PostgreSQL database:

    store = Store("sqlite:///runs/annotation.db")         # or a plain path (``sqlite://``: in memory, one
                                                          # thread only); PostgreSQL:
    store = Store("postgresql+psycopg://user:pw@127.0.0.1:5432/glmwb")

Every public method is one transaction. A vote is acknowledged (the method returns) only after its
transaction committed, so an acknowledged vote survives a crash of the server: SQLite runs in WAL mode
with ``synchronous=FULL`` (the WAL is fsynced at every commit) and concurrent requests are committed in
groups (``GroupCommitter``: one fsync for many), PostgreSQL commits durably by default.

Votes are idempotent: the client picks the vote's ``uid`` (e.g. a UUID made when the item was shown) and
a resubmission with the same uid returns the stored vote instead of storing another; the database refuses
a second vote with one uid, and a second *active* vote on one assignment (see ``annotation/schema.py``).
Nobody sees or changes what is not theirs: every read and write of an assignment or vote names the
annotator and is refused (as "not found") for someone else's.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import random
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import selectinload, sessionmaker
from sqlalchemy.pool import StaticPool

from glmwb.annotation.assign import AssignmentPolicy, available_count, next_assignment
from glmwb.annotation.records import STRENGTHS
from glmwb.annotation.schema import (
    CHOICES,
    LETTERS,
    MAX_RESPONSES,
    ROLES,
    Annotator,
    Assignment,
    Generation,
    Item,
    ItemResponse,
    Prompt,
    Session,
    Vote,
    utcnow,
)
from glmwb.pretrain.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
AN, SE, PR, GE = Annotator.__table__, Session.__table__, Prompt.__table__, Generation.__table__
IT, IR, AS, VO = Item.__table__, ItemResponse.__table__, Assignment.__table__, Vote.__table__
UID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{8,64}$")
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MAX_RATIONALE = 10_000
MAX_RATING_ATTRIBUTES = 32  # rated attributes in one vote
MAX_PASSWORD = 1024  # characters (argon2 hashes any length; sign-in bodies are bounded)
MAX_ID = 2**63 - 1  # row ids are 64-bit signed integers (SQLite INTEGER, PostgreSQL BIGINT)
_SURROGATE = re.compile("[\ud800-\udfff]")
SESSION_TTL = timedelta(hours=12)


class StoreError(ConfigError):
    """A request the store refuses; the message is safe to show to the user who made it."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Plain views handed out by the store (no ORM objects leave it).
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatorInfo:
    id: int
    username: str
    role: str
    active: bool = True

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Task:
    """What an annotator is shown: never the gold answer, never other people's votes."""

    assignment_id: int
    item_id: int
    prompt: list[dict[str, Any]]
    responses: list[str]  # in display order: A, B, ...
    letters: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "assignment_id": self.assignment_id,
            "item_id": self.item_id,
            "prompt": self.prompt,
            "responses": [
                {"letter": k, "text": t} for k, t in zip(self.letters, self.responses, strict=True)
            ],
        }


@dataclass(frozen=True)
class VoteReceipt:
    vote_id: int
    uid: str
    assignment_id: int
    item_id: int
    choice: str
    created: bool  # False: this uid was stored before, nothing new was written

    def to_dict(self) -> dict[str, Any]:
        return {
            "vote_id": self.vote_id,
            "uid": self.uid,
            "assignment_id": self.assignment_id,
            "item_id": self.item_id,
            "choice": self.choice,
            "duplicate": not self.created,
        }


@dataclass(frozen=True)
class VoteRow:
    """One vote with what agreement and export need to know about it."""

    vote_id: int
    uid: str
    item_id: int
    annotator: str
    choice: str
    ratings: dict[str, Any]
    rationale: str
    time_spent_s: float | None
    guideline_version: str
    created_at: datetime
    retracted: bool
    gold_choice: str | None
    strength: str | None = None  # how much better the chosen answer is (letters only)


@dataclass(frozen=True)
class ResponseInfo:
    letter: str
    generation_id: int
    text: str
    model: str
    checkpoint: str | None
    sampling: dict[str, Any]
    chat_template_sha256: str | None


@dataclass(frozen=True)
class ItemInfo:
    item_id: int
    prompt_uid: str
    prompt: list[dict[str, Any]]
    prompt_meta: dict[str, Any]
    source: str
    responses: list[ResponseInfo]
    gold_choice: str | None
    batch: str
    meta: dict[str, Any]
    overlap: int = 3  # votes wanted (regular items)
    status: str = "open"  # open / closed


@dataclass
class NewResponse:
    text: str
    model: str
    checkpoint: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    chat_template_sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class NewItem:
    """A comparison to add: a prompt (found by ``prompt_uid`` or created) and 2..4 responses.

    ``gold``: index (into ``responses``, before shuffling) of the better answer, or "tie" / "both_bad".
    ``labels``: judgements that come with the data (an imported public set): (labeller name, index or
    "tie" / "both_bad"); each becomes a vote by an "external" account of that name.
    """

    prompt_uid: str
    prompt: list[dict[str, Any]]
    responses: list[NewResponse]
    source: str = ""
    prompt_meta: dict[str, Any] = field(default_factory=dict)
    overlap: int = 3
    priority: float = 0.0
    gold: int | str | None = None
    status: str = "open"
    batch: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    labels: list[tuple[str, int | str]] = field(default_factory=list)
    shuffle: bool = (
        True  # False: ``responses`` are already in display order (A, B, ...), e.g. an arena battle
    )


# ---------------------------------------------------------------------------------------------------------
# Engine, migrations, passwords.
# ---------------------------------------------------------------------------------------------------------


def normalise_url(db: str | Path) -> str:
    """A database URL from a URL or a plain file path (``runs/a.db`` -> ``sqlite:///runs/a.db``)."""
    text = str(db)
    if "://" not in text:
        text = f"sqlite:///{text}"
    if text.startswith("postgresql://") or text.startswith("postgres://"):
        text = "postgresql+psycopg://" + text.split("://", 1)[1]  # psycopg 3, not the psycopg2 default
    return text


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=16, max_overflow=32, pool_pre_ping=True)
    path = url.split(":///", 1)[1] if ":///" in url else ""
    memory = path in ("", ":memory:")
    if not memory:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 60},
        **({"poolclass": StaticPool} if memory else {"pool_size": 8, "max_overflow": 16}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acknowledged = on disk
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # Write transactions take the write lock up front (BEGIN IMMEDIATE): a deferred transaction that
        # reads and then writes can fail with "database is locked" without waiting for the busy timeout.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` with Alembic (``annotation/migrations``)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _default_hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id, RFC 9106 low-memory profile


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _letters(n: int) -> tuple[str, ...]:
    return LETTERS[:n]


class GroupCommitter:
    """SQLite's one writer, shared: concurrent write requests are run by one thread in one transaction,
    each inside its own savepoint, and committed together, so one fsync covers many of them.

    A request's result (or exception) is handed back only after the transaction committed: an
    acknowledged write is on disk. A request that fails is rolled back to its savepoint alone."""

    def __init__(self, engine: Engine, lock: threading.Lock, max_batch: int = 64) -> None:
        self.engine = engine
        self.lock = lock
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="store-group-commit", daemon=True)
        self._thread.start()

    def run(self, work: Callable[[Connection], Any]) -> Any:
        done: Future = Future()
        self._queue.put((work, done))
        return done.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                jobs.append(job)
            outcomes = []
            try:
                with self.lock, self.engine.begin() as conn:
                    for work, done in jobs:
                        try:
                            with conn.begin_nested():
                                outcomes.append((done, work(conn), None))
                        except Exception as e:  # this request's own failure: its savepoint is rolled back
                            outcomes.append((done, None, e))
            except Exception as e:  # the commit itself failed: nothing of the batch is stored
                for _, done in jobs:
                    done.set_exception(e)
                continue
            for done, result, error in outcomes:
                if error is None:
                    done.set_result(result)
                else:
                    done.set_exception(error)


# ---------------------------------------------------------------------------------------------------------
# The store.
# ---------------------------------------------------------------------------------------------------------


class Store:
    def __init__(
        self,
        url: str | Path,
        *,
        migrate_on_open: bool = True,
        policy: AssignmentPolicy | None = None,
        password_hasher: Any = None,
    ) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.policy = policy or AssignmentPolicy()
        self._hasher = password_hasher or _default_hasher()
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self._write_engine = writer
        self._writer = sessionmaker(writer, expire_on_commit=False)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        # One writer at a time in this process (SQLite allows one anyway; waiting here is FIFO and cheap,
        # waiting in SQLite's busy handler is a sleep loop). Other processes still queue on busy_timeout.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._committer = GroupCommitter(writer, self._write_lock) if self.is_sqlite else None
        if migrate_on_open:
            migrate(self.engine)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.close()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[OrmSession]:
        if self._write_lock is not None:
            self._write_lock.acquire()
        try:
            with self._writer() as session, session.begin():
                yield session
        finally:
            if self._write_lock is not None:
                self._write_lock.release()

    @contextmanager
    def _read(self) -> Iterator[OrmSession]:
        with self._reader() as session, session.begin():
            yield session

    # The per-request paths (token, next task, vote, skip, undo, progress) use Core on a connection (the
    # ORM's unit of work costs several times the CPU), and their writes go through `_transact`: on SQLite
    # the group committer (one fsync for many concurrent requests), on PostgreSQL a plain transaction
    # (the server commits concurrent transactions together by itself).
    def _transact(self, work: Callable[[Connection], Any]) -> Any:
        if self._committer is not None:
            return self._committer.run(work)
        with self._write_engine.begin() as conn:
            return work(conn)

    @contextmanager
    def _read_conn(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- accounts ------------------------------------------------------------------------------------------

    def create_annotator(self, username: str, password: str | None, role: str = "annotator") -> AnnotatorInfo:
        if not USERNAME_PATTERN.match(username):
            raise StoreError(f"username {username!r}: use 1-64 letters, digits or _ . @ -")
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if role != "external" and (password is None or len(password) < 8):
            raise StoreError("a password needs at least 8 characters")
        if password is not None:
            _check_text("a password", password, MAX_PASSWORD)
        hashed = None if password is None else self._hasher.hash(password)
        try:
            with self._write() as s:
                a = Annotator(username=username, password_hash=hashed, role=role)
                s.add(a)
                s.flush()
                return AnnotatorInfo(a.id, a.username, a.role, a.active)
        except IntegrityError:
            raise Conflict(f"user {username!r} exists already") from None

    def set_password(self, username: str, password: str) -> None:
        if len(password) < 8:
            raise StoreError("a password needs at least 8 characters")
        _check_text("a password", password, MAX_PASSWORD)
        with self._write() as s:
            a = s.scalar(select(Annotator).where(Annotator.username == username))
            if a is None:
                raise NotFound(f"no user {username!r}")
            a.password_hash = self._hasher.hash(password)
            s.execute(Session.__table__.delete().where(Session.annotator_id == a.id))

    def set_active(self, username: str, active: bool) -> None:
        with self._write() as s:
            a = s.scalar(select(Annotator).where(Annotator.username == username))
            if a is None:
                raise NotFound(f"no user {username!r}")
            a.active = active
            if not active:
                s.execute(Session.__table__.delete().where(Session.annotator_id == a.id))

    def annotators(self) -> list[AnnotatorInfo]:
        with self._read() as s:
            rows = s.scalars(select(Annotator).order_by(Annotator.id))
            return [AnnotatorInfo(a.id, a.username, a.role, a.active) for a in rows]

    def annotator(self, username: str) -> AnnotatorInfo | None:
        if not _is_text(username, 64):
            return None
        with self._read() as s:
            a = s.scalar(select(Annotator).where(Annotator.username == username))
            return None if a is None else AnnotatorInfo(a.id, a.username, a.role, a.active)

    @functools.cached_property
    def _dummy_hash(self) -> str:  # verified for unknown users, so that a miss costs as much as a hit
        return self._hasher.hash(secrets.token_hex(8))

    def authenticate(self, username: str, password: str) -> AnnotatorInfo | None:
        """The active account with this password, else None (an unknown name costs as much as a wrong one)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        if not _is_text(username, 64) or not _is_text(password, MAX_PASSWORD):
            return None  # not a name or password anyone has (e.g. a lone surrogate): refused, not a crash
        with self._read() as s:
            a = s.scalar(select(Annotator).where(Annotator.username == username))
            stored = a.password_hash if a is not None and a.active and a.role != "external" else None
            info = None if a is None else AnnotatorInfo(a.id, a.username, a.role, a.active)
        try:
            self._hasher.verify(stored or self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        # Each hash carries its own argon2 parameters, so hashes made with other settings still verify.
        return None if stored is None else info

    def create_session(self, annotator: AnnotatorInfo, ttl: timedelta = SESSION_TTL) -> str:
        """A new bearer token for the JSON API (only its SHA-256 is stored)."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self._write() as s:
            s.add(
                Session(
                    token_sha256=_sha256(token),
                    annotator_id=annotator.id,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
        return token

    def annotator_for_token(self, token: str) -> AnnotatorInfo | None:
        if not token or not _is_text(token, 256):
            return None
        with self._read_conn() as conn:
            row = conn.execute(
                select(AN.c.id, AN.c.username, AN.c.role, AN.c.active)
                .join(SE, SE.c.annotator_id == AN.c.id)
                .where(SE.c.token_sha256 == _sha256(token), SE.c.expires_at > utcnow(), AN.c.active)
            ).first()
        return None if row is None else AnnotatorInfo(*row)

    def revoke_session(self, token: str) -> None:
        if not _is_text(token, 256):
            return
        with self._write() as s:
            s.execute(Session.__table__.delete().where(Session.token_sha256 == _sha256(token)))

    # -- content -------------------------------------------------------------------------------------------

    def add_items(self, items: Iterable[NewItem], seed: int = 0) -> list[int]:
        """Add comparison items (prompts found by uid or created, generations, display order drawn at
        random and recorded); returns the new item ids. One transaction for all of them."""
        ids = []
        with self._write() as s:
            prompt_ids: dict[str, int] = {}
            externals: dict[str, int] = {}
            for n, new in enumerate(items):
                ids.append(self._add_item(s, new, seed, n, prompt_ids, externals))
        return ids

    def _add_item(
        self,
        s: OrmSession,
        new: NewItem,
        seed: int,
        n: int,
        prompt_ids: dict[str, int],
        externals: dict[str, int],
    ) -> int:
        k = len(new.responses)
        if not 2 <= k <= MAX_RESPONSES:
            raise StoreError(
                f"item for prompt {new.prompt_uid!r}: needs 2 to {MAX_RESPONSES} responses, has {k}"
            )
        if new.overlap < 1:
            raise StoreError(f"item for prompt {new.prompt_uid!r}: overlap must be >= 1")
        prompt_id = prompt_ids.get(new.prompt_uid)
        if prompt_id is None:
            prompt_id = s.scalar(select(Prompt.id).where(Prompt.uid == new.prompt_uid))
        if prompt_id is None:
            p = Prompt(
                uid=new.prompt_uid, messages=list(new.prompt), source=new.source, meta=dict(new.prompt_meta)
            )
            s.add(p)
            s.flush()
            prompt_id = p.id
        prompt_ids[new.prompt_uid] = prompt_id
        generations = []
        for r in new.responses:
            g = Generation(
                prompt_id=prompt_id,
                text=r.text,
                model=r.model,
                checkpoint=r.checkpoint,
                sampling=dict(r.sampling),
                chat_template_sha256=r.chat_template_sha256,
                meta=dict(r.meta),
            )
            s.add(g)
            generations.append(g)
        # Display order: a seeded shuffle, recorded as positions (A = 0), fixed for every annotator.
        order = list(range(k))
        if new.shuffle:
            random.Random(f"{seed}|{new.prompt_uid}|{n}").shuffle(order)  # order[position] = original index
        letter_of = {original: LETTERS[pos] for pos, original in enumerate(order)}

        def as_choice(value: int | str) -> str:
            if isinstance(value, str):
                if value not in ("tie", "both_bad"):
                    raise StoreError(f"a label is a response index, 'tie' or 'both_bad', got {value!r}")
                return value
            if not 0 <= value < k:
                raise StoreError(f"label index {value} out of range for {k} responses")
            return letter_of[value]

        item = Item(
            prompt_id=prompt_id,
            overlap=new.overlap,
            priority=float(new.priority),
            gold_choice=None if new.gold is None else as_choice(new.gold),
            status=new.status,
            batch=new.batch,
            meta=dict(new.meta),
        )
        s.add(item)
        s.flush()
        for pos, original in enumerate(order):
            s.add(ItemResponse(item_id=item.id, position=pos, generation_id=generations[original].id))
        for labeller, value in new.labels:
            annotator_id = externals.get(labeller) or s.scalar(
                select(Annotator.id).where(Annotator.username == labeller)
            )
            if annotator_id is None:
                a = Annotator(username=labeller, password_hash=None, role="external")
                s.add(a)
                s.flush()
                annotator_id = a.id
            externals[labeller] = annotator_id
            assignment = Assignment(item_id=item.id, annotator_id=annotator_id, slot=None, status="done")
            s.add(assignment)
            s.flush()
            s.add(
                Vote(
                    uid=f"import-{item.id}-{annotator_id}",
                    assignment_id=assignment.id,
                    item_id=item.id,
                    annotator_id=annotator_id,
                    choice=as_choice(value),
                    guideline_version="imported",
                )
            )
        return item.id

    def record_judged_item(
        self,
        annotator: AnnotatorInfo,
        item: NewItem,
        choice: str,
        *,
        uid: str,
        time_spent_s: float | None = None,
        guideline_version: str = "",
    ) -> VoteReceipt:
        """Store an item together with its one vote, in one transaction: a comparison that was judged as it
        was made (an arena battle). The item is closed (never assigned to anyone else) and keeps the
        display order given (``item.shuffle`` is ignored). The same ``uid`` again stores nothing and returns
        the stored vote (``created=False``)."""
        if not isinstance(uid, str) or not UID_PATTERN.match(uid):
            raise StoreError("a vote id (uid) is 8-64 characters of letters, digits and _ . : -")
        letters = _letters(len(item.responses))
        if choice not in (*letters, "tie", "both_bad"):
            raise StoreError(f"this item has answers {', '.join(letters)}; got choice {choice!r}")
        if time_spent_s is not None and not (0 <= time_spent_s < 10**7):
            raise StoreError(f"time_spent_s must be >= 0, got {time_spent_s}")
        closed = replace(item, status="closed", overlap=1, gold=None, labels=[], shuffle=False)
        try:
            with self._write() as s:
                item_id = self._add_item(s, closed, 0, 0, {}, {})
                assignment = Assignment(item_id=item_id, annotator_id=annotator.id, slot=None, status="done")
                s.add(assignment)
                s.flush()
                vote = Vote(
                    uid=uid,
                    assignment_id=assignment.id,
                    item_id=item_id,
                    annotator_id=annotator.id,
                    choice=choice,
                    time_spent_s=time_spent_s,
                    guideline_version=guideline_version,
                )
                s.add(vote)
                s.flush()
                return VoteReceipt(vote.id, uid, assignment.id, item_id, choice, created=True)
        except IntegrityError:
            pass
        with self._read_conn() as conn:
            v = conn.execute(
                select(VO.c.id, VO.c.annotator_id, VO.c.assignment_id, VO.c.item_id, VO.c.choice).where(
                    VO.c.uid == uid
                )
            ).first()
        if v is not None and v.annotator_id == annotator.id:
            return VoteReceipt(v.id, uid, v.assignment_id, v.item_id, v.choice, created=False)
        raise Conflict(f"vote id {uid} or prompt {item.prompt_uid!r} is taken; make new ones")

    def record_external_vote(
        self,
        username: str,
        item_id: int,
        choice: str,
        *,
        key: str,
        ratings: Mapping[str, Mapping[str, int]] | None = None,
        rationale: str = "",
        guideline_version: str = "",
    ) -> VoteReceipt:
        """Store a judgement made outside the workbench (an Argilla response) by the "external" account
        ``username`` (created on first use) on an existing item. ``key`` names the judgement's content (a
        hash of it): when this person's active vote on the item has that key, nothing is written
        (``created=False``), so importing the same responses again adds nothing. A different key is a
        changed judgement: the active vote is retracted (kept: the history holds both) and the new one stored
        with the uid ``<key>.<n>`` (n: this person's votes on the item before it)."""
        if not isinstance(key, str) or not UID_PATTERN.match(key) or len(key) > 56:
            raise StoreError("a judgement key is 8-56 characters of letters, digits and _ . : -")
        if not USERNAME_PATTERN.match(username or ""):
            raise StoreError(f"an annotator name is 1-64 letters, digits or _ . @ -, got {username!r}")
        _check_text("the rationale", rationale or "", MAX_RATIONALE)

        def work(conn: Connection) -> VoteReceipt:
            n = conn.execute(select(func.count()).where(IR.c.item_id == item_id)).scalar_one()
            if n == 0:
                raise NotFound(f"item {item_id} is not in this store")
            letters = _letters(n)
            if choice not in (*letters, "tie", "both_bad"):
                raise StoreError(f"item {item_id} has answers {', '.join(letters)}; got choice {choice!r}")
            annotator_id = conn.execute(select(AN.c.id).where(AN.c.username == username)).scalar()
            if annotator_id is None:
                row = {"username": username, "password_hash": None, "role": "external"}
                annotator_id = conn.execute(insert(AN).values(**row).returning(AN.c.id)).scalar_one()
            where = (AS.c.item_id == item_id) & (AS.c.annotator_id == annotator_id)
            assignment_id = conn.execute(select(AS.c.id).where(where)).scalar()
            now = utcnow()
            if assignment_id is None:
                row = {"item_id": item_id, "annotator_id": annotator_id, "slot": None, "status": "done"}
                assignment_id = conn.execute(insert(AS).values(**row).returning(AS.c.id)).scalar_one()
            mine = conn.execute(
                select(VO.c.id, VO.c.uid, VO.c.choice, VO.c.retracted_at).where(
                    VO.c.assignment_id == assignment_id
                )
            ).all()
            for v in mine:
                if v.retracted_at is None and v.uid.rsplit(".", 1)[0] == key:
                    return VoteReceipt(v.id, v.uid, assignment_id, item_id, v.choice, created=False)
            active = (VO.c.assignment_id == assignment_id) & VO.c.retracted_at.is_(None)
            conn.execute(update(VO).where(active).values(retracted_at=now))
            uid = f"{key}.{len(mine)}"
            vote = {
                "uid": uid,
                "assignment_id": assignment_id,
                "item_id": item_id,
                "annotator_id": annotator_id,
                "choice": choice,
                "ratings": _check_ratings(ratings or {}, letters),
                "rationale": rationale or "",
                "guideline_version": guideline_version,
                "created_at": now,
            }
            vote_id = conn.execute(insert(VO).values(**vote).returning(VO.c.id)).scalar_one()
            conn.execute(update(AS).where(AS.c.id == assignment_id).values(status="done", updated_at=now))
            return VoteReceipt(vote_id, uid, assignment_id, item_id, choice, created=True)

        return self._transact(work)

    def retract_external_vote(self, username: str, item_id: int) -> bool:
        """Retract (keep, marked retracted) the active vote of the external account ``username`` on an item:
        its judgement was withdrawn where it was made. False when there is none."""

        def work(conn: Connection) -> bool:
            annotator_id = conn.execute(
                select(AN.c.id).where(AN.c.username == username, AN.c.role == "external")
            ).scalar()
            if annotator_id is None:
                return False
            active = (
                (VO.c.annotator_id == annotator_id) & (VO.c.item_id == item_id) & VO.c.retracted_at.is_(None)
            )
            return conn.execute(update(VO).where(active).values(retracted_at=utcnow())).rowcount > 0

        return self._transact(work)

    def prompt_uids(self) -> set[str]:
        with self._read() as s:
            return set(s.scalars(select(Prompt.uid)))

    def set_priorities(self, priorities: Mapping[int, float]) -> None:
        with self._write() as s:
            for item_id, p in priorities.items():
                s.execute(update(Item).where(Item.id == item_id).values(priority=float(p)))

    def set_status(self, item_ids: Sequence[int], status: str) -> None:
        with self._write() as s:
            s.execute(update(Item).where(Item.id.in_(list(item_ids))).values(status=status))

    # -- annotating ----------------------------------------------------------------------------------------

    def next_task(self, annotator: AnnotatorInfo) -> Task | None:
        """The item this annotator should judge now (assigned to them here if new), or None when done."""

        def work(conn: Connection) -> Task | None:
            found = next_assignment(conn, annotator.id, self.policy)
            return None if found is None else self._task(conn, *found)

        return self._transact(work)

    def task(self, annotator: AnnotatorInfo, assignment_id: int) -> Task:
        _check_id(annotator, assignment_id)
        with self._read_conn() as conn:
            row = conn.execute(
                select(AS.c.item_id, AS.c.annotator_id).where(AS.c.id == assignment_id)
            ).first()
            if row is None or row.annotator_id != annotator.id:
                raise NotFound(f"no assignment {assignment_id} for {annotator.username}")
            return self._task(conn, assignment_id, row.item_id)

    @staticmethod
    def _task(conn: Connection, assignment_id: int, item_id: int) -> Task:
        rows = conn.execute(
            select(PR.c.messages, GE.c.text)
            .select_from(IT.join(PR, PR.c.id == IT.c.prompt_id))
            .join(IR, IR.c.item_id == IT.c.id)
            .join(GE, GE.c.id == IR.c.generation_id)
            .where(IT.c.id == item_id)
            .order_by(IR.c.position)
        ).all()
        texts = [r.text for r in rows]
        return Task(assignment_id, item_id, list(rows[0].messages), texts, _letters(len(texts)))

    def _own_assignment(self, conn: Connection, annotator: AnnotatorInfo, assignment_id: int):
        _check_id(annotator, assignment_id)
        row = conn.execute(
            select(AS.c.id, AS.c.item_id, AS.c.annotator_id, AS.c.status).where(AS.c.id == assignment_id)
        ).first()
        if row is None or row.annotator_id != annotator.id:
            raise NotFound(f"no assignment {assignment_id} for {annotator.username}")
        return row

    def skip(self, annotator: AnnotatorInfo, assignment_id: int) -> None:
        def work(conn: Connection) -> None:
            a = self._own_assignment(conn, annotator, assignment_id)
            if a.status == "done":
                raise Conflict("this item has a vote already; undo it to change it")
            conn.execute(
                update(AS)
                .where(AS.c.id == a.id)
                .values(status="skipped", skips=AS.c.skips + 1, updated_at=utcnow())
            )

        self._transact(work)

    def submit_vote(
        self,
        annotator: AnnotatorInfo,
        assignment_id: int,
        choice: str,
        *,
        uid: str,
        ratings: Mapping[str, Mapping[str, int]] | None = None,
        rationale: str = "",
        time_spent_s: float | None = None,
        guideline_version: str = "",
        strength: str | None = None,
    ) -> VoteReceipt:
        """Store a vote once: the same ``uid`` again returns the stored vote (``created=False``).

        ``strength``: for a winner (a letter), how much better it is (``annotation.records.STRENGTHS``).

        The fast path is one insert; the database's unique constraints (vote uid; one active vote per
        assignment) decide a repeat or a race, and the loser reads back what is stored."""
        if not isinstance(uid, str) or not UID_PATTERN.match(uid):
            raise StoreError("a vote id (uid) is 8-64 characters of letters, digits and _ . : -")
        _check_choice(choice, strength)
        rationale = rationale or ""
        _check_text("the rationale", rationale, MAX_RATIONALE)
        _check_text("guideline_version", guideline_version, 64)
        if time_spent_s is not None and (
            isinstance(time_spent_s, bool)
            or not isinstance(time_spent_s, (int, float))
            or not (0 <= time_spent_s < 10**7)  # also refuses NaN
        ):
            raise StoreError(f"time_spent_s must be a number of seconds >= 0, got {time_spent_s!r}")
        _check_id(annotator, assignment_id)

        def work(conn: Connection) -> VoteReceipt:
            a = self._own_assignment(conn, annotator, assignment_id)
            n = conn.execute(select(func.count()).where(IR.c.item_id == a.item_id)).scalar_one()
            letters = _letters(n)
            if choice not in (*letters, "tie", "both_bad"):
                raise StoreError(f"this item has answers {', '.join(letters)}; got choice {choice!r}")
            now = utcnow()
            vote_id = conn.execute(
                insert(VO)
                .values(
                    uid=uid,
                    assignment_id=a.id,
                    item_id=a.item_id,
                    annotator_id=annotator.id,
                    choice=choice,
                    ratings=_check_ratings(ratings or {}, letters),
                    strength=strength,
                    rationale=rationale,
                    time_spent_s=time_spent_s,
                    guideline_version=guideline_version,
                    created_at=now,
                )
                .returning(VO.c.id)
            ).scalar_one()
            conn.execute(update(AS).where(AS.c.id == a.id).values(status="done", updated_at=now))
            return VoteReceipt(vote_id, uid, a.id, a.item_id, choice, created=True)

        try:
            return self._transact(work)
        except IntegrityError:
            pass
        # A repeat of a stored vote (same uid), or a second vote on one assignment: the database said no.
        with self._read_conn() as conn:
            v = conn.execute(
                select(
                    VO.c.id,
                    VO.c.annotator_id,
                    VO.c.assignment_id,
                    VO.c.item_id,
                    VO.c.choice,
                    VO.c.retracted_at,
                ).where(VO.c.uid == uid)
            ).first()
            active = conn.execute(
                select(VO.c.uid).where(VO.c.assignment_id == assignment_id, VO.c.retracted_at.is_(None))
            ).scalar()
        if v is not None and v.annotator_id == annotator.id and v.assignment_id == assignment_id:
            if v.retracted_at is not None:  # a resend after an undo: the undo came later and stands
                raise Conflict(f"vote {uid} was undone; a new vote needs a new vote id (uid)")
            return VoteReceipt(v.id, uid, v.assignment_id, v.item_id, v.choice, created=False)
        if v is not None:
            raise Conflict(f"vote id {uid} is taken; make a new one for a new vote")
        raise Conflict(f"this item has a vote already (vote {active}); undo it to change it")

    def undo_last_vote(self, annotator: AnnotatorInfo) -> VoteReceipt | None:
        """Retract this annotator's newest active vote (kept, marked retracted); its item is theirs to judge
        again, next. None when there is nothing to undo. Votes on closed items (an arena battle, judged as
        it was made) are not undone: a closed item is never served again."""

        def work(conn: Connection) -> VoteReceipt | None:
            v = conn.execute(
                select(VO.c.id, VO.c.uid, VO.c.assignment_id, VO.c.item_id, VO.c.choice)
                .join(IT, IT.c.id == VO.c.item_id)
                .where(VO.c.annotator_id == annotator.id, VO.c.retracted_at.is_(None), IT.c.status == "open")
                .order_by(VO.c.id.desc())
                .limit(1)
            ).first()
            if v is None:
                return None
            now = utcnow()
            conn.execute(update(VO).where(VO.c.id == v.id).values(retracted_at=now))
            conn.execute(
                update(AS).where(AS.c.id == v.assignment_id).values(status="pending", updated_at=now)
            )
            return VoteReceipt(v.id, v.uid, v.assignment_id, v.item_id, v.choice, created=False)

        return self._transact(work)

    def change_vote(
        self, annotator: AnnotatorInfo, item_id: int, choice: str, *, uid: str, strength: str | None = None
    ) -> VoteReceipt:
        """Replace this annotator's vote on an open item by ``choice`` (and ``strength``), in one transaction:
        the previous vote is kept, marked retracted (the history: ``votes(include_retracted=True)``), and the
        new one carries its ratings, rationale, time and guideline version. Agreement and export read active
        votes, so they use the newest. NotFound when they have no vote on the item; Conflict once it closed."""
        _check_choice(choice, strength)
        if not isinstance(uid, str) or not UID_PATTERN.match(uid):
            raise StoreError("a vote id (uid) is 8-64 characters of letters, digits and _ . : -")
        if isinstance(item_id, bool) or not isinstance(item_id, int) or not 1 <= item_id <= MAX_ID:
            raise NotFound(f"no vote of {annotator.username} on item {item_id!r}")

        def work(conn: Connection) -> VoteReceipt:
            old = conn.execute(
                select(VO, IT.c.status.label("item_status"))
                .join(IT, IT.c.id == VO.c.item_id)
                .where(
                    VO.c.annotator_id == annotator.id, VO.c.item_id == item_id, VO.c.retracted_at.is_(None)
                )
            ).first()
            if old is None:
                raise NotFound(f"no vote of {annotator.username} on item {item_id}")
            if old.item_status != "open":
                raise Conflict(f"item {item_id} is closed; its votes can no longer change")
            n = conn.execute(select(func.count()).where(IR.c.item_id == item_id)).scalar_one()
            if choice not in (*_letters(n), "tie", "both_bad"):
                raise StoreError(f"this item has answers {', '.join(_letters(n))}; got choice {choice!r}")
            now = utcnow()
            conn.execute(update(VO).where(VO.c.id == old.id).values(retracted_at=now))
            vote_id = conn.execute(
                insert(VO)
                .values(uid=uid, assignment_id=old.assignment_id, item_id=item_id, annotator_id=annotator.id,
                        choice=choice, ratings=old.ratings, strength=strength, rationale=old.rationale,
                        time_spent_s=old.time_spent_s, guideline_version=old.guideline_version, created_at=now)
                .returning(VO.c.id)
            ).scalar_one()  # fmt: skip
            return VoteReceipt(vote_id, uid, old.assignment_id, item_id, choice, created=True)

        try:
            return self._transact(work)
        except IntegrityError:
            raise Conflict(f"vote id {uid} is taken; make a new one for a new vote") from None

    def add_votes_wanted(self, item_id: int, n: int = 1) -> int:
        """Ask for ``n`` more votes on an open regular item (its overlap grows: the next annotator without it
        gets it); the new overlap. For disputed items: one more annotator settles a split. Closed items are
        never assigned, and gold items go to everyone in turn: both are refused (Conflict)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100:
            raise StoreError(f"n must be an integer 1..100, got {n!r}")
        with self._write() as s:
            item = s.get(Item, item_id)
            if item is None:
                raise NotFound(f"no item {item_id}")
            if item.status != "open" or item.gold_choice is not None:
                raise Conflict(f"item {item_id} is {'closed' if item.status != 'open' else 'a gold item'}; "
                               "only open regular items take more votes")  # fmt: skip
            item.overlap += n
            return item.overlap

    def release_stale(self, older_than: timedelta) -> int:
        """Free the slots of pending assignments nobody has touched for ``older_than`` (abandoned tabs), so
        that others can take those items; returns how many were released."""
        cutoff = utcnow() - older_than

        def work(conn: Connection) -> int:
            stale = conn.execute(
                select(AS.c.id, AS.c.item_id, AS.c.slot).where(
                    AS.c.status.in_(("pending", "skipped")),
                    AS.c.updated_at < cutoff,
                    ~select(VO.c.id).where(VO.c.assignment_id == AS.c.id).exists(),
                )
            ).all()
            for a in stale:
                conn.execute(AS.delete().where(AS.c.id == a.id))
                if a.slot is not None:
                    conn.execute(update(IT).where(IT.c.id == a.item_id).values(assigned=IT.c.assigned - 1))
            return len(stale)

        return self._transact(work)

    # -- reading -------------------------------------------------------------------------------------------

    def progress(self, annotator: AnnotatorInfo) -> dict[str, int]:
        with self._read_conn() as conn:
            counts = dict(
                conn.execute(
                    select(AS.c.status, func.count())
                    .where(AS.c.annotator_id == annotator.id)
                    .group_by(AS.c.status)
                ).all()
            )
            votes = conn.execute(
                select(func.count()).where(VO.c.annotator_id == annotator.id, VO.c.retracted_at.is_(None))
            ).scalar_one()
            return {
                "votes": votes,
                "pending": counts.get("pending", 0),
                "skipped": counts.get("skipped", 0),
                "available": available_count(conn, annotator.id),
            }

    def overview(self) -> dict[str, Any]:
        """Totals and per-annotator counts for the admin view."""
        with self._read() as s:
            items = dict(s.execute(select(Item.status, func.count()).group_by(Item.status)).all())
            gold = s.scalar(select(func.count()).where(Item.gold_choice.is_not(None)))
            active = select(Vote.item_id, func.count().label("n")).where(Vote.retracted_at.is_(None))
            per_item = active.group_by(Vote.item_id).subquery()
            complete = s.scalar(
                select(func.count())
                .select_from(Item)
                .join(per_item, per_item.c.item_id == Item.id)
                .where(Item.gold_choice.is_(None), per_item.c.n >= Item.overlap)
            )
            wanted = s.scalar(
                select(func.coalesce(func.sum(Item.overlap), 0)).where(
                    Item.gold_choice.is_(None), Item.status == "open"
                )
            )
            votes = s.scalar(select(func.count()).where(Vote.retracted_at.is_(None)))
            retracted = s.scalar(select(func.count()).where(Vote.retracted_at.is_not(None)))
            people = s.execute(
                select(
                    Annotator.username,
                    Annotator.role,
                    func.count(Vote.id),
                    func.avg(Vote.time_spent_s),
                    func.max(Vote.created_at),
                )
                .outerjoin(Vote, (Vote.annotator_id == Annotator.id) & Vote.retracted_at.is_(None))
                .group_by(Annotator.id, Annotator.username, Annotator.role)
                .order_by(Annotator.username)
            ).all()
            return {
                "items": sum(items.values()),
                "open_items": items.get("open", 0),
                "gold_items": gold,
                "complete_items": complete,
                "votes": votes,
                "retracted_votes": retracted,
                "votes_wanted": wanted,
                "annotators": [
                    {
                        "username": u,
                        "role": r,
                        "votes": n,
                        "mean_time_s": None if t is None else round(float(t), 1),
                        "last_vote": None if last is None else str(last)[:19],
                    }
                    for u, r, n, t, last in people
                ],
            }

    def votes(self, include_retracted: bool = False, annotator: str | None = None) -> list[VoteRow]:
        """Active votes (with ``include_retracted``: also undone and changed ones, the history), oldest
        first; ``annotator``: only that username's."""
        with self._read() as s:
            q = (
                select(Vote, Annotator.username, Item.gold_choice)
                .join(Annotator, Annotator.id == Vote.annotator_id)
                .join(Item, Item.id == Vote.item_id)
                .order_by(Vote.id)
            )
            if not include_retracted:
                q = q.where(Vote.retracted_at.is_(None))
            if annotator is not None:
                q = q.where(Annotator.username == annotator)
            return [
                VoteRow(
                    vote_id=v.id,
                    uid=v.uid,
                    item_id=v.item_id,
                    annotator=username,
                    choice=v.choice,
                    ratings=dict(v.ratings or {}),
                    rationale=v.rationale,
                    time_spent_s=v.time_spent_s,
                    guideline_version=v.guideline_version,
                    created_at=v.created_at,
                    retracted=v.retracted_at is not None,
                    gold_choice=gold,
                    strength=v.strength,
                )
                for v, username, gold in s.execute(q)
            ]

    def items(self, item_ids: Iterable[int] | None = None) -> dict[int, ItemInfo]:
        with self._read() as s:
            q = select(Item).options(
                selectinload(Item.prompt), selectinload(Item.responses).selectinload(ItemResponse.generation)
            )
            if item_ids is not None:
                q = q.where(Item.id.in_(list(item_ids)))
            out = {}
            for item in s.scalars(q.order_by(Item.id)):
                out[item.id] = ItemInfo(
                    item_id=item.id,
                    prompt_uid=item.prompt.uid,
                    prompt=list(item.prompt.messages),
                    prompt_meta=dict(item.prompt.meta or {}),
                    source=item.prompt.source,
                    responses=[
                        ResponseInfo(
                            letter=LETTERS[r.position],
                            generation_id=r.generation.id,
                            text=r.generation.text,
                            model=r.generation.model,
                            checkpoint=r.generation.checkpoint,
                            sampling=dict(r.generation.sampling or {}),
                            chat_template_sha256=r.generation.chat_template_sha256,
                        )
                        for r in item.responses
                    ],
                    gold_choice=item.gold_choice,
                    batch=item.batch,
                    meta=dict(item.meta or {}),
                    overlap=item.overlap,
                    status=item.status,
                )
            return out

    def counts(self) -> dict[str, int]:
        """Rows per table (for tests and the CLI)."""
        with self._read() as s:
            tables = (Annotator, Prompt, Generation, Item, Assignment, Vote)
            return {t.__tablename__: s.scalar(select(func.count()).select_from(t)) for t in tables}


def _check_ratings(ratings: Mapping[str, Any], letters: Sequence[str]) -> dict[str, dict[str, int]]:
    """{attribute: {letter: 1..5}}: per-attribute Likert ratings of each answer (any subset)."""
    if not isinstance(ratings, Mapping):
        raise StoreError("ratings must map attribute -> {letter: 1..5}")
    if len(ratings) > MAX_RATING_ATTRIBUTES:
        raise StoreError(f"{len(ratings)} rated attributes; at most {MAX_RATING_ATTRIBUTES}")
    out: dict[str, dict[str, int]] = {}
    for attribute, per_letter in ratings.items():
        if not _is_text(attribute, 64) or not attribute or not attribute.isprintable():
            raise StoreError(f"rating attribute {attribute!r}: a name of 1-64 printable characters")
        if not isinstance(per_letter, Mapping):
            raise StoreError(f"rating {attribute!r} must map answer letters to 1..5")
        clean = {}
        for letter, value in per_letter.items():
            if letter not in letters:
                raise StoreError(f"rating {attribute!r}: no answer {letter!r} in this item")
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                raise StoreError(f"rating {attribute!r}[{letter}] must be an integer 1..5, got {value!r}")
            clean[letter] = value
        if clean:
            out[attribute] = clean
    return out


def _check_choice(choice: Any, strength: Any) -> None:
    if choice not in CHOICES:
        raise StoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if strength is not None:
        if strength not in STRENGTHS:
            raise StoreError(f"strength must be one of {', '.join(STRENGTHS)} (or none), got {strength!r}")
        if choice in ("tie", "both_bad"):
            raise StoreError(f"a strength goes with a winner (a letter), not with choice {choice!r}")


def _is_text(value: Any, max_len: int) -> bool:
    """A ``str`` of at most ``max_len`` characters that is Unicode (no lone surrogate)."""
    return isinstance(value, str) and len(value) <= max_len and not _SURROGATE.search(value)


def _check_text(what: str, value: Any, max_len: int) -> None:
    if not isinstance(value, str):
        raise StoreError(f"{what} must be text, got {type(value).__name__}")
    if len(value) > max_len:
        raise StoreError(f"{what} is longer than {max_len:,} characters")
    m = _SURROGATE.search(value)
    if m:
        raise StoreError(f"{what} holds a lone surrogate (U+{ord(m.group()):04X}), which is not Unicode text")


def _check_id(annotator: AnnotatorInfo, assignment_id: Any) -> None:
    """An assignment id the database can hold; anything else is nobody's assignment (NotFound)."""
    if (
        isinstance(assignment_id, bool)
        or not isinstance(assignment_id, int)
        or not 1 <= assignment_id <= MAX_ID
    ):
        raise NotFound(f"no assignment {assignment_id!r} for {annotator.username}")
