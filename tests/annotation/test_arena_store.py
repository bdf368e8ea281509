"""Arena battles in the annotation store: stored with their vote and full provenance in display order,
exported by the store's export as valid preference records with the right chosen / rejected; identity
leaks and named battles are stored but not counted; multi-turn battles are not exported as pairs; the
rate limiter and the pair draw."""

from __future__ import annotations

import json
import random

import pytest

from glmwb.annotation.arena import (
    ArenaBattle,
    BattleSide,
    RateLimiter,
    draw_pair,
    identity_leaks,
)
from glmwb.annotation.export import export_records, write_records
from glmwb.annotation.preference_data import read_preferences
from glmwb.annotation.records import PreferenceRecord
from glmwb.annotation.store import Store
from tests.annotation.conftest import cheap_hasher, make_items

SHA = "ab" * 32


def side(model: str, turns: list[tuple[str, str]], temperature: float = 0.7) -> BattleSide:
    messages = []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return BattleSide(
        model=model,
        checkpoint=f"/models/{model}",
        chat_template_sha256=SHA,
        sampling={"temperature": temperature, "top_p": 1.0, "max_new_tokens": 64},
        messages=messages,
        finish_reasons=["stop"],
    )


def battle(i: int, left: str, right: str, question: str = "What is 2+2?", mode: str = "anonymous", **kw):
    return ArenaBattle(
        battle_id=f"b{i:04d}",
        user="alice",
        mode=mode,
        left=side(left, [(question, f"left answer {i}")]),
        right=side(right, [(question, f"right answer {i}")], temperature=0.0),
        **kw,
    )


@pytest.fixture
def arena_store(db_url):
    """An SQLite file, then a fresh PostgreSQL database (``db_url``)."""
    store = Store(db_url, password_hasher=cheap_hasher())
    store.create_annotator("alice", "alice-password")
    store.create_annotator("bob", "bob-password")
    yield store
    store.close()


def test_a_vote_is_a_preference_record_with_the_right_chosen_and_rejected(arena_store, tmp_path):
    alice = arena_store.annotator("alice")
    choices = ["B", "A", "tie", "both_bad"]
    for i, choice in enumerate(choices):
        receipt = arena_store.record_judged_item(
            alice,
            battle(i, "m-left", "m-right").to_item(),
            choice,
            uid=f"arena-vote-{i:04d}",
            time_spent_s=3.5,
        )
        assert receipt.created and receipt.choice == choice
    rows = export_records(arena_store, mode="all").rows
    assert len(rows) == 4
    by_label = {r["provenance"]["label"]: r for r in rows}
    b = by_label["B"]  # right won: chosen is the right answer, rejected the left one
    assert b["chosen"][0]["content"] == "right answer 0" and b["rejected"][0]["content"] == "left answer 0"
    assert b["provenance"]["models"] == ["m-right", "m-left"] and b["provenance"]["letters"] == ["B", "A"]
    assert b["provenance"]["checkpoints"] == ["/models/m-right", "/models/m-left"]
    assert json.loads(b["provenance"]["sampling"][0])["temperature"] == 0.0
    assert b["provenance"]["chat_template_sha256"] == [SHA, SHA]
    assert b["annotator"] == "alice" and b["tie"] is False
    arena = json.loads(b["provenance"]["arena"])
    assert (arena["left"], arena["right"], arena["mode"]) == ("m-left", "m-right", "anonymous")
    assert arena["counted"] is True and arena["leaked"] is False and arena["voted_at"] >= arena["started_at"]
    a = by_label["A"]
    assert a["chosen"][0]["content"] == "left answer 1" and a["provenance"]["models"] == ["m-left", "m-right"]
    assert by_label["tie"]["tie"] is True and by_label["both_bad"]["tie"] is True
    # the export's file is read back by the preference reader the trainers use
    path = write_records(rows, tmp_path / "arena.jsonl")
    records = read_preferences(path).records
    assert len(records) == 4 and all(isinstance(r, PreferenceRecord) for r in records)
    # beside an annotator's vote on a regular item, in one Parquet file
    arena_store.add_items(make_items(1, prefix="regular"))
    task = arena_store.next_task(arena_store.annotator("bob"))
    arena_store.submit_vote(arena_store.annotator("bob"), task.assignment_id, "A", uid="regular-vote-1")
    mixed = export_records(arena_store, mode="all").rows
    assert sorted(r["provenance"]["arena"] == "" for r in mixed) == [False] * 4 + [True]
    assert len(read_preferences(write_records(mixed, tmp_path / "mixed.parquet")).records) == 5
    assert records[0].prompt == ({"role": "user", "content": "What is 2+2?"},)
    (vote,) = [v for v in arena_store.votes() if v.choice == "B"]
    assert vote.annotator == "alice" and vote.time_spent_s == 3.5


def test_display_order_is_kept_and_arena_items_are_never_assigned(arena_store):
    alice = arena_store.annotator("alice")
    for i in range(12):  # a seeded shuffle would flip some of twelve
        left, right = ("x", "y") if i % 2 else ("y", "x")
        item = battle(i, left, right).to_item()
        receipt = arena_store.record_judged_item(alice, item, "A", uid=f"arena-order-{i:04d}")
        stored = arena_store.items([receipt.item_id])[receipt.item_id]
        assert [r.model for r in stored.responses] == [left, right]
        assert [r.text for r in stored.responses] == [f"left answer {i}", f"right answer {i}"]
        assert stored.batch == "arena"
    bob = arena_store.annotator("bob")
    assert arena_store.next_task(bob) is None  # closed: the arena's battles are not annotation work
    arena_store.add_items(make_items(1))
    assert arena_store.next_task(bob) is not None


def test_the_annotator_pages_undo_leaves_arena_votes_alone(arena_store):
    alice = arena_store.annotator("alice")
    arena_store.add_items(make_items(1))
    task = arena_store.next_task(alice)
    arena_store.submit_vote(alice, task.assignment_id, "B", uid="page-vote-0001")
    arena_store.record_judged_item(alice, battle(1, "x", "y").to_item(), "A", uid="arena-undo-0001")
    assert (
        arena_store.undo_last_vote(alice).uid == "page-vote-0001"
    )  # the newest on the page, not the arena's
    assert arena_store.undo_last_vote(alice) is None
    assert [v.uid for v in arena_store.votes()] == ["arena-undo-0001"]
    assert arena_store.next_task(alice).item_id == task.item_id


def test_the_same_vote_twice_is_stored_once(arena_store):
    alice = arena_store.annotator("alice")
    item = battle(1, "x", "y").to_item()
    first = arena_store.record_judged_item(alice, item, "A", uid="arena-once-0001")
    counts = arena_store.counts()
    again = arena_store.record_judged_item(alice, item, "A", uid="arena-once-0001")
    assert again.vote_id == first.vote_id and again.created is False
    assert arena_store.counts() == counts
    with pytest.raises(Exception, match="answers A, B"):
        arena_store.record_judged_item(alice, battle(2, "x", "y").to_item(), "C", uid="arena-once-0002")


def test_leaked_and_named_votes_are_stored_but_not_counted(arena_store):
    alice = arena_store.annotator("alice")
    cases = {
        "asked": battle(1, "glm-sft", "glm-dpo", question="Are you glm-sft?"),
        "named_itself": ArenaBattle(
            "b0002", "alice", "anonymous",
            side("glm-sft", [("hi", "Hello, I am GLM-SFT, your assistant.")]),
            side("glm-dpo", [("hi", "Hello!")]),
        ),
        "alias": ArenaBattle(
            "b0003", "alice", "anonymous",
            side("policy-r2", [("hi", "I am ChatGLM.")]), side("base", [("hi", "Hello there")]),
            aliases={"policy-r2": ["ChatGLM"]},
        ),
        "named": battle(4, "glm-sft", "glm-dpo", mode="named"),
        "clean": battle(5, "glm-sft", "glm-dpo", question="Is xglm-sfty a word?"),
    }  # fmt: skip
    ids = {}
    for n, (name, b) in enumerate(cases.items()):
        ids[name] = arena_store.record_judged_item(alice, b.to_item(), "A", uid=f"arena-leak-{n:04d}").item_id
    meta = {name: arena_store.items([i])[i].meta["arena"] for name, i in ids.items()}
    assert meta["asked"]["leaks"] == ["the user named glm-sft"] and not meta["asked"]["counted"]
    assert meta["named_itself"]["leaks"] == ["answer A named glm-sft"] and meta["named_itself"]["leaked"]
    assert meta["alias"]["leaks"] == ["answer A named policy-r2"]
    assert meta["named"]["mode"] == "named" and not meta["named"]["counted"] and not meta["named"]["leaked"]
    assert meta["clean"]["counted"] and meta["clean"]["leaks"] == []
    # stored votes all export (a leak changes the rating, not the preference)
    assert len(export_records(arena_store, mode="all").rows) == 5


def test_a_multi_turn_battle_is_stored_but_not_exported_as_a_pair(arena_store):
    alice = arena_store.annotator("alice")
    b = ArenaBattle(
        "b0009", "alice", "anonymous",
        side("x", [("first", "x one"), ("second", "x two")]),
        side("y", [("first", "y one"), ("second", "y two")]),
    )  # fmt: skip
    receipt = arena_store.record_judged_item(alice, b.to_item(), "B", uid="arena-multi-0001")
    stored = arena_store.items([receipt.item_id])[receipt.item_id]
    assert stored.meta["arena"]["turns"] == 2 and [r.text for r in stored.responses] == ["x two", "y two"]
    result = export_records(arena_store, mode="all")
    assert result.rows == [] and result.skipped["arena_multi_turn"] == 1


def test_identity_leaks_match_whole_names_only():
    names = {"glm-sft": ["GLM SFT"], "qa": []}
    assert identity_leaks(["I think you are glm-sft!"], {}, names) == ["the user named glm-sft"]
    assert identity_leaks(["glm-sfty or xglm-sft"], {"A": "qa"}, names) == []  # "qa" is too short
    assert identity_leaks([], {"B": "As glm sft, I..."}, names) == ["answer B named glm-sft"]


def test_rate_limiter_holds_per_minute_and_per_day():
    now = [1_000_000.0]
    limiter = RateLimiter(per_minute=3, per_day=5, clock=lambda: now[0])
    assert [limiter.take("alice") for _ in range(3)] == [None] * 3
    assert "at most 3 prompts a minute" in limiter.take("alice")
    assert limiter.take("bob") is None  # per user
    now[0] += 61
    assert [limiter.take("alice") for _ in range(2)] == [None] * 2
    now[0] += 61
    assert "daily cap" in limiter.take("alice")
    now[0] += 86_400
    assert limiter.take("alice") is None


def test_uniform_draw_covers_every_pair_in_both_orders():
    rng = random.Random(0)
    seen = {draw_pair(["a", "b", "c"], rng)[:2] for _ in range(300)}
    assert seen == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert draw_pair(["a", "b", "c"], rng)[2:] == (pytest.approx(1 / 3), 1.0)
    with pytest.raises(ValueError):
        draw_pair(["a"], rng)
