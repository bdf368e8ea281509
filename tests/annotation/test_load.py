"""The server under load and under a crash, on loopback, against SQLite and PostgreSQL.

- Load: 50 annotators at once submit 2,000 votes through ``glmwb annotate`` (a child process), resending
  about 10 % of them with the same vote id; exactly 2,000 are stored, none twice. Throughput is printed.
- Crash: the server is killed with SIGKILL mid-load; every vote it acknowledged is in the database; after a
  restart, resending every vote that was sent (same ids) completes the set without a duplicate.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import text

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.loadtest import resubmit, run_load
from glmwb.annotation.store import Store
from tests.annotation.conftest import ServerProcess, cheap_hasher, make_items


def populate(url: str, annotators: int, items: int, overlap: int = 3) -> list[tuple[str, str]]:
    store = Store(url, password_hasher=cheap_hasher())
    accounts = [(f"user{i:02d}", f"password-{i:02d}") for i in range(annotators)]
    for name, password in accounts:
        store.create_annotator(name, password)
    store.add_items(make_items(items, overlap=overlap))
    store.close()
    return accounts


# Each backend meets the load in one test and the crash in the other in the default suite (`make test`); the
# other two pairings run with the slow tests (`make test-all`).
LOAD_ON = [
    pytest.param("sqlite", marks=pytest.mark.slow),
    pytest.param("postgres", marks=pytest.mark.postgres),
]
CRASH_ON = ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])]


def stored_votes(url: str) -> list:
    store = Store(url, password_hasher=cheap_hasher(), policy=AssignmentPolicy(gold_rate=0))
    try:
        return store.votes(include_retracted=True)
    finally:
        store.close()


@pytest.mark.parametrize("db_url", LOAD_ON, indirect=True)
def test_50_annotators_submit_2000_votes(db_url, tmp_path, capsys):
    accounts = populate(db_url, annotators=50, items=700)  # 2,100 slots for 2,000 votes
    server = ServerProcess(db_url, tmp_path / "server.log")
    try:
        result = run_load(server.base_url, accounts, total_votes=2000, resubmit_rate=0.1)
    finally:
        server.stop()
    backend = db_url.split(":", 1)[0].split("+")[0]
    with capsys.disabled():
        print(f"\n[load, {backend}] 50 annotators: {result.summary()}")
    (tmp_path / "load.json").write_text(
        json.dumps({"backend": backend, "votes": len(result.acknowledged), "seconds": result.seconds})
    )
    assert not result.errors, result.errors
    assert len(result.acknowledged) == 2000 and len(result.attempts) == 2000
    assert result.resubmits > 100 and result.duplicate_answers == result.resubmits
    votes = stored_votes(db_url)
    assert len(votes) == 2000  # exactly: no resend stored a second vote
    assert {v.uid for v in votes} == result.acknowledged
    per_assignment = Counter((v.item_id, v.annotator) for v in votes)
    assert max(per_assignment.values()) == 1  # one vote per (item, annotator)
    assert len({v.annotator for v in votes}) == 50
    assert result.seconds < 120, f"2,000 votes took {result.seconds:.0f} s"


@pytest.mark.parametrize("db_url", CRASH_ON, indirect=True)
def test_server_killed_mid_load_loses_no_acknowledged_vote(db_url, tmp_path, capsys):
    accounts = populate(db_url, annotators=20, items=700)
    log = tmp_path / "server.log"
    server = ServerProcess(db_url, log)
    stop = threading.Event()
    out = {}
    loader = threading.Thread(
        target=lambda: out.update(result=run_load(server.base_url, accounts, 2000, stop=stop, timeout_s=10))
    )
    loader.start()
    watcher = Store(db_url, password_hasher=cheap_hasher())
    deadline = time.monotonic() + 90
    while watcher.counts()["votes"] < 300 and time.monotonic() < deadline and loader.is_alive():
        time.sleep(0.05)
    assert loader.is_alive(), "the load finished before the kill: not a crash mid-load"
    server.kill()  # SIGKILL while votes are in flight
    stop.set()
    loader.join(timeout=60)
    watcher.close()
    result = out["result"]
    acknowledged, sent = result.acknowledged, {a.uid for a in result.attempts}
    assert len(acknowledged) >= 100 and result.errors, "the clients should have seen the server die"

    votes = stored_votes(db_url)  # a fresh engine: SQLite recovers its WAL here
    stored = {v.uid for v in votes}
    missing = acknowledged - stored
    assert not missing, f"{len(missing)} acknowledged votes lost"
    assert stored <= sent and len(votes) == len(stored)  # nothing invented, nothing twice
    if db_url.startswith("sqlite"):
        check = Store(db_url, password_hasher=cheap_hasher())
        with check.engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        check.close()

    restarted = ServerProcess(db_url, log)  # sessions live in the database: the same tokens still work
    try:
        codes = resubmit(restarted.base_url, result.attempts)
    finally:
        restarted.stop()
    assert set(codes) <= {200, 201}, codes
    assert codes[200] == len(stored) and codes[201] == len(sent) - len(stored)
    final = stored_votes(db_url)
    assert {v.uid for v in final} == sent and len(final) == len(sent)
    backend = db_url.split(":", 1)[0].split("+")[0]
    with capsys.disabled():
        print(
            f"\n[crash, {backend}] killed with {len(acknowledged)} votes acknowledged, {len(sent)} sent: "
            f"all {len(acknowledged)} acknowledged were stored ({len(stored)} stored in all); "
            f"after a restart {codes[201]} resent votes were stored, {codes[200]} answered as duplicates"
        )
