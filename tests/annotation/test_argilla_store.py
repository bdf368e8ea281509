"""Argilla responses as the store's votes (no server): Store.record_external_vote and the mapping of an
Argilla response to a vote (annotation/argilla.py)."""

from __future__ import annotations

import pytest

from glmwb.annotation.agreement import agreement_report
from glmwb.annotation.argilla import RMSuggestion, _item_id, _vote
from glmwb.annotation.export import export_records
from glmwb.annotation.store import NotFound, Store, StoreError
from tests.annotation.conftest import make_items


@pytest.fixture
def items_store(sqlite_url):
    with Store(sqlite_url) as s:
        s.add_items(make_items(3, overlap=2))
        yield s


def test_same_response_twice_adds_nothing_and_a_change_keeps_both_versions(items_store):
    s = items_store
    first = s.record_external_vote("ann@argilla", 1, "A", key="argilla:k1xxxxxx", rationale="A is right")
    again = s.record_external_vote("ann@argilla", 1, "A", key="argilla:k1xxxxxx", rationale="A is right")
    assert first.created and not again.created and again.vote_id == first.vote_id
    changed = s.record_external_vote("ann@argilla", 1, "B", key="argilla:k2xxxxxx")
    back = s.record_external_vote("ann@argilla", 1, "A", key="argilla:k1xxxxxx")  # A -> B -> A: a new version
    assert changed.created and back.created
    history = [(v.choice, v.retracted) for v in s.votes(include_retracted=True) if v.item_id == 1]
    assert history == [("A", True), ("B", True), ("A", False)]
    active = [v for v in s.votes() if v.item_id == 1]
    assert [(v.annotator, v.choice, v.uid) for v in active] == [("ann@argilla", "A", "argilla:k1xxxxxx.2")]
    assert s.annotator("ann@argilla").role == "external"


def test_a_withdrawn_judgement_is_retracted_and_kept(items_store):
    s = items_store
    s.record_external_vote("ann@argilla", 2, "B", key="argilla:w1xxxxxx")
    assert s.retract_external_vote("ann@argilla", 2) is True
    assert s.retract_external_vote("ann@argilla", 2) is False  # nothing active any more
    assert s.retract_external_vote("nobody@argilla", 2) is False
    assert [v.retracted for v in s.votes(include_retracted=True)] == [True] and s.votes() == []
    again = s.record_external_vote("ann@argilla", 2, "B", key="argilla:w1xxxxxx")  # submitted again
    assert again.created and again.uid == "argilla:w1xxxxxx.1"


def test_external_votes_count_in_export_and_agreement(items_store):
    s = items_store
    letters = {i.item_id: [r.model for r in i.responses] for i in s.items().values()}
    for item_id, models in letters.items():
        good = "AB"[models.index("model-a")]
        s.record_external_vote("ann@argilla", item_id, good, key=f"argilla:ann{item_id}xx")
        s.record_external_vote("bob@argilla", item_id, good, key=f"argilla:bob{item_id}xx", ratings={})
    rows = export_records(s).rows
    assert len(rows) == 3
    assert all(r["chosen"][-1]["content"].startswith("good answer") for r in rows)
    assert all(r["rejected"][-1]["content"].startswith("bad answer") for r in rows)
    assert all(r["provenance"]["annotators"] == ["ann@argilla", "bob@argilla"] for r in rows)
    report = agreement_report(s.votes())
    assert (report.annotators, report.items_multi) == (2, 3)
    assert report.percent_agreement == pytest.approx(1.0)
    assert set(report.per_annotator) == {"ann@argilla", "bob@argilla"}


def test_refusals(items_store):
    with pytest.raises(NotFound):
        items_store.record_external_vote("ann@argilla", 99, "A", key="argilla:zzzzzzzz")
    with pytest.raises(StoreError, match="answers A, B"):
        items_store.record_external_vote("ann@argilla", 1, "C", key="argilla:zzzzzzzz")
    with pytest.raises(StoreError, match="annotator name"):
        items_store.record_external_vote("a b", 1, "A", key="argilla:zzzzzzzz")


def test_response_values_to_a_vote():
    values = {
        "preference": {"value": "B"},
        "helpfulness_a": {"value": 2},
        "helpfulness_b": {"value": 5},
        "rationale": {"value": "B answers"},
    }
    assert _vote(values) == ("B", {"helpfulness": {"A": 2, "B": 5}}, "B answers")
    assert _item_id("item-12") == 12 and _item_id("other-1") is None and _item_id("item-x") is None
    rm = RMSuggestion(reward_a=0.0, reward_b=2.0, agent="rm")
    assert rm.preference == "B" and rm.score == pytest.approx(1 / (1 + 2.718281828**-2.0))
