"""Assignment rules: N distinct annotators per item, never twice to one annotator (also under concurrency),
gold items mixed in at the configured rate, priority order."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

import pytest

from glmwb.annotation.assign import AssignmentPolicy, priority_from_scores
from glmwb.annotation.store import Store
from tests.annotation.conftest import cheap_hasher, make_items


def drain(store: Store, annotator, limit: int = 10_000) -> list[int]:
    """Judge everything this annotator is given; the item ids in order."""
    seen = []
    while len(seen) < limit:
        task = store.next_task(annotator)
        if task is None:
            break
        seen.append(task.item_id)
        store.submit_vote(
            annotator, task.assignment_id, "A", uid=f"vote-{annotator.id:04d}-{task.assignment_id:06d}"
        )
    return seen


def test_each_item_gets_overlap_distinct_annotators_never_twice(store):
    store.policy = AssignmentPolicy(gold_rate=0.0)
    store.add_items(make_items(12, overlap=3))
    people = [store.create_annotator(f"user{i}", f"password-{i}") for i in range(5)]
    seen = {p.username: drain(store, p) for p in people}
    for name, items in seen.items():
        assert len(items) == len(set(items)), f"{name} got an item twice"
    per_item = Counter(i for items in seen.values() for i in items)
    assert set(per_item.values()) == {3} and len(per_item) == 12
    assert sum(map(len, seen.values())) == 36
    assert all(store.next_task(p) is None for p in people)  # nothing left
    assert store.overview()["complete_items"] == 12


def test_per_item_overlap(store):
    store.policy = AssignmentPolicy(gold_rate=0.0)
    store.add_items(make_items(2, overlap=1, prefix="one") + make_items(2, overlap=4, prefix="four"))
    people = [store.create_annotator(f"user{i}", f"password-{i}") for i in range(5)]
    per_item = Counter(i for p in people for i in drain(store, p))
    assert sorted(per_item.values()) == [1, 1, 4, 4]


def test_concurrent_annotators_never_exceed_overlap(store):
    """Many threads asking at once: the unique (item, slot) and (item, annotator) constraints hold."""
    store.policy = AssignmentPolicy(gold_rate=0.0)
    store.add_items(make_items(10, overlap=2))
    people = [store.create_annotator(f"user{i}", f"password-{i}") for i in range(8)]
    seen: dict[str, list[int]] = defaultdict(list)
    errors = []
    barrier = threading.Barrier(len(people))

    def work(p) -> None:
        barrier.wait()
        try:
            seen[p.username] = drain(store, p)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    per_item = Counter(i for items in seen.values() for i in items)
    assert len(per_item) == 10 and set(per_item.values()) == {2}
    for items in seen.values():
        assert len(items) == len(set(items))
    assert store.counts()["votes"] == 20


def test_gold_items_are_mixed_in_at_the_rate(sqlite_store):
    store = sqlite_store
    store.policy = AssignmentPolicy(gold_rate=0.25, seed=1)
    store.add_items(make_items(200, overlap=1, gold_every=5))  # 40 gold items, 160 regular
    alice = store.create_annotator("alice", "password-1")
    items = store.items()
    seen = drain(store, alice, limit=120)
    gold = [i for i in seen if items[i].gold_choice is not None]
    assert 0.15 < len(gold) / len(seen) < 0.35  # ~25 %
    assert len(set(gold)) == len(gold)
    # gold items take no slot: another annotator can get the same gold items
    bob = store.create_annotator("bob", "password-2")
    store.policy = AssignmentPolicy(gold_rate=1.0)
    assert items[store.next_task(bob).item_id].gold_choice is not None


def test_gold_items_stop_when_the_real_work_runs_out(sqlite_store):
    store = sqlite_store
    store.policy = AssignmentPolicy(gold_rate=0.5)
    store.add_items(
        make_items(4, overlap=1, prefix="r") + make_items(20, overlap=1, prefix="g", gold_every=1)
    )
    alice = store.create_annotator("alice", "password-1")
    items = store.items()
    seen = drain(store, alice)
    assert sum(items[i].gold_choice is None for i in seen) == 4
    assert items[seen[-1]].gold_choice is None  # no gold item once no regular one is left


def test_priority_order(store):
    store.policy = AssignmentPolicy(gold_rate=0.0)
    ids = store.add_items(make_items(6, overlap=1))
    store.set_priorities({ids[4]: 5.0, ids[2]: 1.0, ids[5]: -1.0})
    alice = store.create_annotator("alice", "password-1")
    assert drain(store, alice) == [ids[4], ids[2], ids[0], ids[1], ids[3], ids[5]]


def test_closed_items_are_not_assigned(store):
    ids = store.add_items(make_items(3, overlap=1))
    store.set_status(ids[:2], "closed")
    alice = store.create_annotator("alice", "password-1")
    assert drain(store, alice) == [ids[2]]


def test_priority_from_scores():
    assert priority_from_scores([0.9, 0.1]) == pytest.approx(-0.8)
    assert priority_from_scores([0.5, 0.52]) > priority_from_scores([0.9, 0.1])  # closer: sooner
    assert priority_from_scores([1.0, 1.0, 1.0], kind="spread") == 0.0
    assert priority_from_scores([0.0, 2.0], kind="spread") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        priority_from_scores([1.0])


def test_gold_turn_is_deterministic_and_near_the_rate():
    policy = AssignmentPolicy(gold_rate=0.1, seed=7)
    turns = [policy.gold_turn(3, n) for n in range(5000)]
    assert turns == [policy.gold_turn(3, n) for n in range(5000)]
    assert 0.08 < sum(turns) / len(turns) < 0.12
    with pytest.raises(ValueError):
        AssignmentPolicy(gold_rate=1.5)


def test_a_second_server_process_shares_the_limits(sqlite_url):
    """Two Store objects on one SQLite file (as two server processes would be) still give each item to at
    most `overlap` annotators."""
    a = Store(sqlite_url, password_hasher=cheap_hasher(), policy=AssignmentPolicy(gold_rate=0))
    b = Store(sqlite_url, password_hasher=cheap_hasher(), policy=AssignmentPolicy(gold_rate=0))
    a.add_items(make_items(5, overlap=2))
    people = [a.create_annotator(f"user{i}", f"password-{i}") for i in range(4)]
    seen = [drain(a if i % 2 else b, p) for i, p in enumerate(people)]
    per_item = Counter(i for items in seen for i in items)
    assert set(per_item.values()) == {2} and len(per_item) == 5
    a.close()
    b.close()
