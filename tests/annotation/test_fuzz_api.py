"""A seeded fuzz test of the vote API (the whole server: guard, routes, store): thousands of random requests
(valid ones, valid ones with one to three fields made odd, raw bytes, odd content types, huge and deep bodies,
someone else's or no token). Never a 5xx; every refused request leaves the store as it was; and after every
request the store's invariants hold: one active vote per assignment at most, each vote its assignment's
annotator's, an assignment is done exactly when it has an active vote, ratings within their bounds, no text
that is not Unicode, and as many active votes as 201s minus undos."""

from __future__ import annotations

import json
import random
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.guard import LoginGate
from glmwb.annotation.schema import Assignment, Vote
from glmwb.annotation.store import MAX_RATING_ATTRIBUTES, MAX_RATIONALE, Store
from glmwb.ui.app import ServerSettings, create_app
from tests.annotation.conftest import cheap_hasher, make_items

N_REQUESTS = 2000
USERS = {"u0": "password-0", "u1": "password-1", "u2": "password-2"}
AS, VO = Assignment.__table__, Vote.__table__
_ODD = [
    None, True, False, 0, -1, 1, 2, 5, 6, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308,
    "", " ", "A", "B", "C", "tie", "both_bad", "a" * 65, "x" * 20_000, "\ud800", "\udfff\ud800", "\u202e21",
    "fuzz-vote-1", "ÄÖÜ-é", "null", "NaN", [], [1], {}, {"A": 5}, {"x": {"A": 5}}, {"x": {"A": True}},
    {"x": {"Z": 1}}, {"x": {"A": "5"}}, {f"a{i}": {"A": 1} for i in range(40)}, {"": {"A": 1}},
]  # fmt: skip
_RAW = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b'"\\ud800"', b"\xff\xfe", b"{", b"[]", b"null", b"{}",
        b"[" * 5000 + b"]" * 5000, b'{"a":' * 200 + b"1" + b"}" * 200]  # fmt: skip
_CONTENT_TYPES = ["application/json", "text/plain", None, "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", "application/merge-patch+json", "application/json; charset=latin-1"]  # fmt: skip
_FIELDS = [
    "uid",
    "assignment_id",
    "choice",
    "ratings",
    "strength",
    "rationale",
    "time_spent_s",
    "guideline_version",
    "next",
]


def invariants(store: Store) -> dict[str, int]:
    """Check the store's invariants; returns the counts a refused request must not change."""
    with store.engine.begin() as c:
        per_assignment = c.execute(
            select(VO.c.assignment_id, func.count())
            .where(VO.c.retracted_at.is_(None))
            .group_by(VO.c.assignment_id)
        ).all()
        assert all(n == 1 for _, n in per_assignment), per_assignment
        active = {a for a, _ in per_assignment}
        mismatched = c.execute(
            select(func.count())
            .select_from(VO.join(AS, AS.c.id == VO.c.assignment_id))
            .where((AS.c.annotator_id != VO.c.annotator_id) | (AS.c.item_id != VO.c.item_id))
        ).scalar_one()
        assert mismatched == 0
        done = {a for (a,) in c.execute(select(AS.c.id).where(AS.c.status == "done"))}
        assert done == active, done ^ active
        for ratings, rationale, version, strength, choice in c.execute(
            select(VO.c.ratings, VO.c.rationale, VO.c.guideline_version, VO.c.strength, VO.c.choice)
        ):
            assert len(ratings) <= MAX_RATING_ATTRIBUTES and len(rationale) <= MAX_RATIONALE
            for attribute, per_letter in ratings.items():
                assert attribute.isprintable() and 0 < len(attribute) <= 64
                assert all(k in "ABCD" and type(v) is int and 1 <= v <= 5 for k, v in per_letter.items())
            for t in (rationale, version, *ratings):
                assert not re.search("[\ud800-\udfff]", t)
            assert strength is None or choice in "ABCD"
        votes = c.execute(select(func.count()).select_from(VO)).scalar_one()
    return {"votes": votes, "active": len(active), **store.counts()}


@pytest.mark.timeout(900)
def test_thousands_of_random_requests_never_a_5xx_and_the_store_stays_whole(tmp_path) -> None:
    store = Store(
        f"sqlite:///{tmp_path / 'a.db'}", password_hasher=cheap_hasher(), policy=AssignmentPolicy(gold_rate=0)
    )
    for name, password in USERS.items():
        store.create_annotator(name, password)
    store.add_items(make_items(60, overlap=3))
    store.add_items(make_items(5, overlap=3, prefix="four"))  # more items (two answers each)
    gate = LoginGate(free_per_user_client=10**6, free_per_client=10**6, free_per_user=10**6, pause_s=0)
    client = TestClient(create_app(store, ServerSettings(ui=False, gate=gate)), raise_server_exceptions=False)
    tokens = {}
    for name, password in USERS.items():
        tokens[name] = client.post("/api/v1/login", json={"username": name, "password": password}).json()[
            "token"
        ]
    rng = random.Random(20261206)
    known: dict[str, list[int]] = {name: [] for name in USERS}  # assignment ids each user was shown
    uids: list[str] = []
    created = undone = 0
    codes: dict[int, int] = {}
    before = invariants(store)

    def valid_vote(user: str) -> dict:
        ids = known[user] or [1]
        uid = rng.choice(uids) if uids and rng.random() < 0.2 else f"fz-{rng.getrandbits(40):x}"
        uids.append(uid)
        body = {
            "uid": uid,
            "assignment_id": rng.choice(ids),
            "choice": rng.choice(["A", "B", "tie", "both_bad"]),
        }
        if rng.random() < 0.3:
            body["ratings"] = {"helpfulness": {"A": rng.randint(1, 5)}}
        if rng.random() < 0.3 and body["choice"] in "AB":
            body["strength"] = rng.choice(["negligible", "slight", "clear", "strong"])
        if rng.random() < 0.2:
            body["next"] = True
        return body

    for i in range(N_REQUESTS):
        user = rng.choice(list(USERS))
        r_auth = rng.random()
        headers = {"Authorization": f"Bearer {tokens[user]}"} if r_auth < 0.85 else (
            {"Authorization": "Bearer forged"} if r_auth < 0.92 else {})  # fmt: skip
        route = rng.choices(
            ["votes", "skip", "undo", "next", "progress", "login", "admin"], [50, 10, 10, 15, 5, 5, 5]
        )[0]
        method, path, body = "POST", f"/api/v1/{route}", None
        if route == "votes":
            body = valid_vote(user)
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                field = rng.choice(_FIELDS + ["extra"])
                if rng.random() < 0.15:
                    body.pop(field, None)
                else:
                    body[field] = rng.choice(_ODD)
        elif route == "skip":
            body = {"assignment_id": rng.choice(known[user] or [1, 2**63, -1])}
            if rng.random() < 0.3:
                body["assignment_id"] = rng.choice(_ODD)
        elif route == "login":
            body = {
                "username": rng.choice([*USERS, *_ODD[:30]]),
                "password": rng.choice(["x", "password-0", *_ODD[:30]]),
            }
        elif route in ("next", "progress"):
            method = "GET"
        elif route == "admin":
            method, path = "GET", rng.choice(["/api/v1/admin/overview", "/api/v1/admin/agreement"])
        # the encoding: JSON (allowing NaN / Infinity, lone surrogates), or raw bytes, with a random type
        kind = rng.random()
        if body is not None and kind < 0.85:
            content = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode(
                "utf-8", "surrogatepass"
            )
        elif body is not None or kind > 0.95:
            content = rng.choice(_RAW)
        else:
            content = None
        ctype = "application/json" if rng.random() < 0.8 else rng.choice(_CONTENT_TYPES)
        h = {**headers, **({"content-type": ctype} if ctype and content is not None else {})}
        r = client.request(method, path, content=content, headers=h)
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        assert r.status_code < 500, (
            i,
            method,
            path,
            content[:300] if content else None,
            r.status_code,
            r.text[:300],
        )
        if r.headers.get("content-type", "").startswith("application/json"):
            r.json()  # always a readable answer
        if route == "next" and r.status_code == 200 and r.json()["task"]:
            known[user].append(r.json()["task"]["assignment_id"])
        if route == "votes" and r.status_code in (200, 201) and r.json().get("next"):
            known[user].append(r.json()["next"]["assignment_id"])
        created += route == "votes" and r.status_code == 201
        undone += route == "undo" and r.status_code == 200 and r.json()["undone"] is not None
        after = invariants(store) if (i % 10 == 0 or r.status_code < 300) else None
        if after is not None and r.status_code >= 400:
            assert after == before, (
                i,
                method,
                path,
                content[:200] if content else None,
                r.status_code,
            )  # no partial write
        if after is not None:
            before = after
    final = invariants(store)
    assert final["active"] == created - undone
    assert (
        codes.get(201, 0) > 50
        and codes.get(409, 0) > 0
        and codes.get(400, 0) > 100
        and codes.get(422, 0) > 100
    ), codes
    print(
        f"[fuzz] {N_REQUESTS} requests: {dict(sorted(codes.items()))}; {created} votes stored, {undone} undone"
    )
    store.close()
