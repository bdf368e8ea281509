"""The store: accounts and tokens, items and display order, idempotent votes, undo, skip, ownership, the
database's own constraints, migrations = models, SQLite durability settings. Each runs on SQLite and
(marked postgres) on a fresh PostgreSQL database."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.exc import IntegrityError

from glmwb.annotation.schema import Annotator, Base, Vote
from glmwb.annotation.store import Conflict, NewItem, NewResponse, NotFound, Store, StoreError
from tests.annotation.conftest import cheap_hasher, make_items


def test_accounts_hash_passwords_and_authenticate(store):
    alice = store.create_annotator("alice", "correct horse")
    assert alice.role == "annotator" and not alice.is_admin
    with store._read() as s:  # noqa: SLF001 - look at what is really stored
        stored = s.scalar(select(Annotator.password_hash).where(Annotator.username == "alice"))
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert store.authenticate("alice", "correct horse") == alice
    assert store.authenticate("alice", "wrong password") is None
    assert store.authenticate("nobody", "correct horse") is None
    with pytest.raises(Conflict):
        store.create_annotator("alice", "another one")
    with pytest.raises(StoreError):
        store.create_annotator("bob", "short")
    with pytest.raises(StoreError):
        store.create_annotator("bad name!", "long enough")
    store.set_active("alice", False)
    assert store.authenticate("alice", "correct horse") is None
    store.create_annotator("labeller", None, role="external")
    assert store.authenticate("labeller", "") is None


def test_tokens_are_stored_hashed_and_expire(store):
    alice = store.create_annotator("alice", "password-1")
    token = store.create_session(alice)
    assert store.annotator_for_token(token) == alice
    with store._read() as s:  # noqa: SLF001
        digests = list(s.execute(text("SELECT token_sha256 FROM sessions")).scalars())
    assert digests and token not in digests
    assert store.annotator_for_token(token + "x") is None
    assert store.annotator_for_token("") is None
    old = store.create_session(alice, ttl=timedelta(seconds=-1))
    assert store.annotator_for_token(old) is None
    store.revoke_session(token)
    assert store.annotator_for_token(token) is None
    fresh = store.create_session(alice)
    store.set_password("alice", "password-2")  # a new password signs every session out
    assert store.annotator_for_token(fresh) is None


def test_display_order_is_random_recorded_and_fixed(store):
    ids = store.add_items(make_items(40, overlap=2), seed=3)
    items = store.items(ids)
    firsts = Counter(items[i].responses[0].text.startswith("good") for i in ids)
    assert firsts[True] > 5 and firsts[False] > 5  # both orders occur
    for i in ids:
        assert [r.letter for r in items[i].responses] == ["A", "B"]
        assert {r.model for r in items[i].responses} == {"model-a", "model-b"}
    a, b = store.create_annotator("a", "password-a"), store.create_annotator("b", "password-b")
    ta, tb = store.next_task(a), store.next_task(b)
    assert ta.item_id == tb.item_id and ta.responses == tb.responses  # the same order for everyone
    assert ta.responses == [r.text for r in items[ta.item_id].responses]
    # the draw is seeded: the same items and seed give the same order in another store
    other = Store("sqlite://", password_hasher=cheap_hasher())
    again = other.items(other.add_items(make_items(40, overlap=2), seed=3))
    assert [r.responses[0].text for r in again.values()] == [items[i].responses[0].text for i in ids]
    other.close()


def test_items_need_two_to_four_answers(store):
    one = NewItem("p", [{"role": "user", "content": "q"}], [NewResponse("a", "m")])
    with pytest.raises(StoreError, match="2 to 4"):
        store.add_items([one])
    four = NewItem("p4", [{"role": "user", "content": "q"}], [NewResponse(f"a{i}", "m") for i in range(4)])
    (item_id,) = store.add_items([four])
    assert [r.letter for r in store.items([item_id])[item_id].responses] == ["A", "B", "C", "D"]


def test_vote_is_idempotent_and_one_per_assignment(store):
    store.add_items(make_items(3))
    alice = store.create_annotator("alice", "password-1")
    task = store.next_task(alice)
    first = store.submit_vote(alice, task.assignment_id, "B", uid="vote-0001", rationale="B is right")
    assert first.created and first.choice == "B"
    again = store.submit_vote(alice, task.assignment_id, "B", uid="vote-0001")
    assert not again.created and again.vote_id == first.vote_id
    with pytest.raises(Conflict, match="undo"):
        store.submit_vote(alice, task.assignment_id, "A", uid="vote-0002")
    assert store.counts()["votes"] == 1
    (vote,) = store.votes()
    assert (vote.annotator, vote.choice, vote.rationale, vote.uid) == (
        "alice",
        "B",
        "B is right",
        "vote-0001",
    )


def test_concurrent_duplicate_submits_store_one_vote(store):
    store.add_items(make_items(2))
    alice = store.create_annotator("alice", "password-1")
    task = store.next_task(alice)
    results, errors = [], []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        try:
            results.append(store.submit_vote(alice, task.assignment_id, "A", uid="same-vote-id"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.created for r in results) == 1 and len({r.vote_id for r in results}) == 1
    assert store.counts()["votes"] == 1


def test_nobody_reads_or_votes_on_what_is_not_theirs(store):
    store.add_items(make_items(2))
    alice = store.create_annotator("alice", "password-1")
    mallory = store.create_annotator("mallory", "password-2")
    task = store.next_task(alice)
    with pytest.raises(NotFound):
        store.task(mallory, task.assignment_id)
    with pytest.raises(NotFound):
        store.submit_vote(mallory, task.assignment_id, "A", uid="mallory-01")
    with pytest.raises(NotFound):
        store.skip(mallory, task.assignment_id)
    store.submit_vote(alice, task.assignment_id, "A", uid="alice-vote-1")
    assert store.undo_last_vote(mallory) is None  # undo only ever touches one's own votes
    # a vote id someone else used cannot be replayed into another's vote
    own = store.next_task(mallory)
    with pytest.raises(Conflict, match="taken"):
        store.submit_vote(mallory, own.assignment_id, "A", uid="alice-vote-1")
    assert [(v.annotator, v.choice) for v in store.votes()] == [("alice", "A")]


def test_bad_votes_are_refused(store):
    store.add_items(make_items(1))
    alice = store.create_annotator("alice", "password-1")
    task = store.next_task(alice)
    for kwargs, message in [
        ({"choice": "C"}, "answers A, B"),
        ({"choice": "maybe"}, "choice must be"),
        ({"uid": "short"}, "vote id"),
        ({"ratings": {"helpfulness": {"A": 9}}}, "1..5"),
        ({"ratings": {"helpfulness": {"Z": 3}}}, "no answer"),
        ({"time_spent_s": -1.0}, "time_spent_s"),
        ({"time_spent_s": float("nan")}, "time_spent_s"),
        ({"time_spent_s": True}, "time_spent_s"),
        ({"rationale": "why \ud800"}, "lone surrogate"),
        ({"rationale": "x" * 10_001}, "longer than 10,000"),
        ({"guideline_version": "v\udfff"}, "lone surrogate"),
        ({"ratings": {"helpfulness": {"A": True}}}, "1..5"),
        ({"ratings": {f"a{i}": {"A": 1} for i in range(33)}}, "at most 32"),
        ({"ratings": {"\ud800": {"A": 1}}}, "printable"),
        ({"ratings": {"tab\there": {"A": 1}}}, "printable"),
    ]:
        args = {"choice": "A", "uid": "valid-uid-1", **kwargs}
        with pytest.raises(StoreError, match=message):
            store.submit_vote(alice, task.assignment_id, args.pop("choice"), **args)
    assert store.counts()["votes"] == 0
    for assignment_id in (2**63, -1, 0, True, "1"):  # ids the database cannot hold: nobody's assignment
        with pytest.raises(NotFound):
            store.submit_vote(alice, assignment_id, "A", uid="valid-uid-2")
        with pytest.raises(NotFound):
            store.skip(alice, assignment_id)
    assert (
        store.authenticate("\ud800", "password-1") is None and store.authenticate("alice", "\udc00") is None
    )
    assert store.annotator("\ud800") is None and store.annotator_for_token("\ud800") is None
    with pytest.raises(StoreError, match="lone surrogate"):
        store.set_password("alice", "password-\ud800")


def test_a_vote_id_resent_after_its_undo_is_refused(store):
    store.add_items(make_items(1))
    alice = store.create_annotator("alice", "password-1")
    task = store.next_task(alice)
    store.submit_vote(alice, task.assignment_id, "A", uid="vote-then-undo")
    store.undo_last_vote(alice)
    with pytest.raises(Conflict, match="was undone"):
        store.submit_vote(alice, task.assignment_id, "A", uid="vote-then-undo")
    assert store.votes() == []  # the undo stands
    again = store.submit_vote(alice, task.assignment_id, "B", uid="vote-after-undo")
    with pytest.raises(Conflict, match="was undone"):  # also while another vote is active
        store.submit_vote(alice, task.assignment_id, "A", uid="vote-then-undo")
    assert [v.uid for v in store.votes()] == [again.uid]


def test_undo_keeps_the_vote_and_gives_the_item_back(store):
    store.add_items(make_items(3))
    alice = store.create_annotator("alice", "password-1")
    first = store.next_task(alice)
    store.submit_vote(
        alice, first.assignment_id, "A", uid="vote-first", ratings={"helpful": {"A": 5, "B": 1}}
    )
    second = store.next_task(alice)
    assert second.item_id != first.item_id
    undone = store.undo_last_vote(alice)
    assert undone.uid == "vote-first"
    assert store.next_task(alice).assignment_id == first.assignment_id  # the undone item comes back first
    assert store.votes() == []
    (kept,) = store.votes(include_retracted=True)
    assert kept.retracted and kept.ratings == {"helpful": {"A": 5, "B": 1}}
    revote = store.submit_vote(alice, first.assignment_id, "B", uid="vote-again")
    assert revote.created
    assert [(v.uid, v.choice) for v in store.votes()] == [("vote-again", "B")]
    assert store.undo_last_vote(alice).uid == "vote-again"
    assert store.undo_last_vote(alice) is None
    assert store.counts()["votes"] == 2  # nothing is ever deleted


def test_skip_puts_the_item_at_the_end(store):
    store.add_items(make_items(3, overlap=1))
    alice = store.create_annotator("alice", "password-1")
    t1 = store.next_task(alice)
    store.skip(alice, t1.assignment_id)
    seen = []
    for n in range(2):
        t = store.next_task(alice)
        assert t.item_id != t1.item_id
        seen.append(t.item_id)
        store.submit_vote(alice, t.assignment_id, "A", uid=f"vote-skip-{n}")
    back = store.next_task(alice)
    assert back.item_id == t1.item_id  # only then the skipped one
    assert store.progress(alice) == {"votes": 2, "pending": 1, "skipped": 0, "available": 0}
    store.submit_vote(alice, back.assignment_id, "A", uid="vote-skip-2")
    with pytest.raises(Conflict):  # a judged item cannot be skipped (undo first)
        store.skip(alice, back.assignment_id)


def test_release_stale_frees_slots(store):
    store.add_items(make_items(1, overlap=1))
    a = store.create_annotator("a", "password-a")
    b = store.create_annotator("b", "password-b")
    assert store.next_task(a) is not None
    assert store.next_task(b) is None  # the only slot is taken
    assert store.release_stale(timedelta(seconds=-1)) == 1
    assert store.next_task(b) is not None


def test_database_refuses_a_second_active_vote_and_a_reused_uid(store):
    """The guarantees hold below the Python code: raw inserts that break them fail."""
    store.add_items(make_items(1))
    alice = store.create_annotator("alice", "password-1")
    task = store.next_task(alice)
    store.submit_vote(alice, task.assignment_id, "A", uid="vote-raw-1")
    row = {
        "assignment_id": task.assignment_id,
        "item_id": task.item_id,
        "annotator_id": alice.id,
        "choice": "B",
        "ratings": {},
        "rationale": "",
        "guideline_version": "",
        "created_at": Vote.created_at.default.arg(None),
    }
    for uid in ("vote-raw-2", "vote-raw-1"):  # second active vote; reused uid
        with pytest.raises(IntegrityError), store.engine.begin() as conn:
            conn.execute(insert(Vote).values(uid=uid, **row))
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(Vote).values(uid="vote-raw-3", **{**row, "choice": "maybe"}))
    assert store.counts()["votes"] == 1


def test_migrations_create_the_models_schema(db_url):
    """`upgrade head` and the models agree (Alembic's autogenerate finds nothing to change)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = Store(db_url, password_hasher=cheap_hasher())
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert diff == [], diff
    assert version == "0002"
    store.close()
    Store(db_url, password_hasher=cheap_hasher()).close()  # opening again is a no-op upgrade


def test_migrations_match_create_all_on_sqlite(tmp_path):
    """Same tables, columns, indexes (with their partial predicates) and constraints, compared as SQL."""
    migrated = Store(f"sqlite:///{tmp_path / 'm.db'}", password_hasher=cheap_hasher())
    created = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(created)

    def schema(engine) -> dict[str, str]:
        with engine.connect() as c:
            rows = c.execute(text("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")).all()
        return {name: " ".join(sql.split()) for name, sql in rows if name != "alembic_version"}

    def normalise(sql: str) -> tuple[str, list[str]]:
        """(head, sorted top-level clauses): the two write the same clauses in different orders."""
        sql = sql.replace(" ,", ",").replace("( ", "(").replace(" )", ")")
        head, _, body = sql.partition("(")
        clauses, depth, current = [], 0, ""
        for ch in body[: body.rindex(")")]:
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                clauses.append(current.strip())
                current = ""
            else:
                current += ch
        # a table that a migration rebuilt (SQLite batch mode: copy, drop, rename) has its name quoted
        return head.strip().replace('"', ""), sorted([*clauses, current.strip()])

    a, b = schema(migrated.engine), schema(created)
    assert set(a) == set(b)
    for name in a:
        assert normalise(a[name]) == normalise(b[name]), name
    migrated.close()


def test_sqlite_is_wal_and_fsyncs_every_commit(sqlite_store):
    with sqlite_store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_vote_strength_checked_stored_and_kept_by_migrations(db_url):
    """A winner may say how much better it is; a tie may not; unknown levels are refused (by the store and by
    the database). Migrating down to 0001 and up again keeps every vote."""
    from alembic import command
    from alembic.config import Config

    from glmwb.annotation.store import MIGRATIONS, migrate

    store = Store(db_url, password_hasher=cheap_hasher())
    store.add_items(make_items(3, overlap=1))
    alice = store.create_annotator("alice", "password-1")
    for uid, choice, strength, error in (
        ("vote-s-0001", "A", "huge", "strength must be one of negligible, slight, clear, strong"),
        ("vote-s-0002", "tie", "slight", "not with choice 'tie'"),
    ):
        with pytest.raises(StoreError, match=error):
            store.submit_vote(alice, store.next_task(alice).assignment_id, choice, uid=uid, strength=strength)
    for i, (choice, strength) in enumerate((("B", "clear"), ("A", None), ("tie", None))):
        task = store.next_task(alice)
        store.submit_vote(alice, task.assignment_id, choice, uid=f"vote-ok-{i:04d}", strength=strength)
    assert [(v.choice, v.strength) for v in store.votes()] == [("B", "clear"), ("A", None), ("tie", None)]
    row = {
        "assignment_id": 1, "item_id": 1, "annotator_id": alice.id, "choice": "A", "ratings": {},
        "rationale": "", "guideline_version": "", "retracted_at": store.votes()[0].created_at,
    }  # fmt: skip
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(Vote).values(uid="vote-raw-9", strength="huge", **row))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM votes")).scalar() == 3
    migrate(store.engine)
    assert [(v.choice, v.strength) for v in store.votes()] == [("B", None), ("A", None), ("tie", None)]
    store.close()
