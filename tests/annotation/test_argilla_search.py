"""The SQL search engine inside a real argilla-server (annotation/argilla_sql_search.py), through the REST
endpoints Argilla's web page and SDK call: per-user response-status filters, text search, metadata /
suggestion / response filters, sorting, dataset progress, per-user metrics, metadata metrics. Every
expected answer is computed from what the test itself wrote (responses, metadata, suggestions)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from glmwb.annotation.argilla import RMSuggestion, connect, push
from glmwb.annotation.store import Store
from tests.annotation.conftest import argilla_respond, argilla_user, make_items

N = 6


@pytest.fixture(scope="module")
def ds(local_argilla, tmp_path_factory):
    """6 items pushed with suggestions; ann: submitted 1-3 (A, A, B), draft 4; bob: submitted 1-2, discarded 5."""
    client = connect(local_argilla.url, local_argilla.api_key)
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('search') / 'a.db'}")
    store.add_items(make_items(N, overlap=2))
    rewards = {i: (float(i), float(10 - 3 * i)) for i in range(1, N + 1)}  # B better for 1, 2; A for 3..6
    sugg = {i: RMSuggestion(a, b, "rm-odd" if i % 2 else "rm-even") for i, (a, b) in rewards.items()}
    name = f"search-{uuid.uuid4().hex[:8]}"
    push(client, store, name, "argilla", suggestions=sugg)
    dataset_id = str(client.datasets(name=name, workspace="argilla").id)
    owner = {"X-Argilla-Api-Key": local_argilla.api_key}
    listed = httpx.get(
        f"{local_argilla.url}/api/v1/datasets/{dataset_id}/records?limit=100", headers=owner
    ).json()
    rid = {int(r["external_id"].split("-")[1]): r["id"] for r in listed["items"]}
    ann = argilla_user(local_argilla, client, "ann", "ann-password-1")
    bob = argilla_user(local_argilla, client, "bob", "bob-password-1")
    url = local_argilla.url
    for i, choice in ((1, "A"), (2, "A"), (3, "B")):
        argilla_respond(url, ann["api_key"], rid[i], {"preference": choice})
    argilla_respond(url, ann["api_key"], rid[4], {"preference": "tie"}, status="draft")
    for i in (1, 2):
        argilla_respond(url, bob["api_key"], rid[i], {"preference": "A"})
    argilla_respond(url, bob["api_key"], rid[5], {}, status="discarded")
    yield {
        "url": url, "id": dataset_id, "ann": ann, "bob": bob, "owner": owner, "store": store,
        "rewards": rewards, "sugg": sugg,
    }  # fmt: skip
    store.close()


def search(ds, who: str, body: dict, limit: int = 100) -> tuple[list[int], int]:
    key = ds["owner"] if who == "owner" else {"X-Argilla-Api-Key": ds[who]["api_key"]}
    r = httpx.post(
        f"{ds['url']}/api/v1/me/datasets/{ds['id']}/records/search?limit={limit}", json=body, headers=key
    )
    assert r.status_code == 200, r.text
    data = r.json()
    return [int(x["record"]["external_id"].split("-")[1]) for x in data["items"]], data["total"]


def terms(scope: dict, *values) -> dict:
    return {"filters": {"and": [{"type": "terms", "scope": scope, "values": list(values)}]}}


STATUS = {"entity": "response", "property": "status"}


def test_per_user_response_status_filters(ds):
    assert sorted(search(ds, "ann", terms(STATUS, "pending"))[0]) == [5, 6]
    assert sorted(search(ds, "ann", terms(STATUS, "submitted"))[0]) == [1, 2, 3]
    assert sorted(search(ds, "ann", terms(STATUS, "draft"))[0]) == [4]
    assert sorted(search(ds, "ann", terms(STATUS, "pending", "draft"))[0]) == [4, 5, 6]
    assert sorted(search(ds, "bob", terms(STATUS, "pending"))[0]) == [3, 4, 6]
    assert sorted(search(ds, "bob", terms(STATUS, "discarded"))[0]) == [5]
    record_status = {"entity": "record", "property": "status"}
    assert sorted(search(ds, "owner", terms(record_status, "completed"))[0]) == [1, 2]  # min_submitted 2


def test_response_value_filter_is_per_user(ds):
    pref = {"entity": "response", "question": "preference"}
    assert sorted(search(ds, "ann", terms(pref, "A"))[0]) == [1, 2]
    assert sorted(search(ds, "ann", terms(pref, "B"))[0]) == [3]
    assert sorted(search(ds, "bob", terms(pref, "B"))[0]) == []


def test_text_search(ds):
    items = ds["store"].items()
    prompt = {items[i].prompt[0]["content"]: i for i in items}  # "question 2" is item 3's prompt
    assert search(ds, "owner", {"query": {"text": {"q": "question 2"}}}) == ([prompt["question 2"]], 1)
    assert search(ds, "owner", {"query": {"text": {"q": "ANSWER 4"}}}) == ([prompt["question 4"]], 1)
    assert search(ds, "owner", {"query": {"text": {"q": "question"}}})[1] == N
    assert search(ds, "owner", {"query": {"text": {"q": "nowhere"}}}) == ([], 0)
    a_is_good = sorted(i for i, it in items.items() if it.responses[0].text.startswith("good"))
    found = search(ds, "owner", {"query": {"text": {"q": "good", "field": "response_a"}}})[0]
    assert sorted(found) == a_is_good


def test_metadata_filters_sorting_and_paging(ds):
    item_id = {"entity": "metadata", "metadata_property": "item_id"}
    body = {"filters": {"and": [{"type": "range", "scope": item_id, "ge": 2, "le": 4}]}}
    assert sorted(search(ds, "owner", body)[0]) == [2, 3, 4]
    assert search(ds, "owner", {"sort": [{"scope": item_id, "order": "desc"}]})[0] == [6, 5, 4, 3, 2, 1]
    page = search(ds, "owner", {"sort": [{"scope": item_id, "order": "asc"}]}, limit=2)
    assert page == ([1, 2], N)  # a page, with the total
    models = {i: it.responses[0].model for i, it in ds["store"].items().items()}
    model_a = {"entity": "metadata", "metadata_property": "model_a"}
    got = search(ds, "owner", terms(model_a, "model-a"))[0]
    assert sorted(got) == sorted(i for i, m in models.items() if m == "model-a")


def test_suggestion_filters_and_sort(ds):
    agent = {"entity": "suggestion", "question": "preference", "property": "agent"}
    assert sorted(search(ds, "owner", terms(agent, "rm-odd"))[0]) == [1, 3, 5]
    value = {"entity": "suggestion", "question": "preference", "property": "value"}
    prefers_a = [i for i, x in sorted(ds["sugg"].items()) if x.preference == "A"]
    assert len(prefers_a) not in (0, N) and sorted(search(ds, "owner", terms(value, "A"))[0]) == prefers_a
    score = {"entity": "suggestion", "question": "preference", "property": "score"}
    expected = sorted(ds["sugg"], key=lambda i: ds["sugg"][i].score)
    assert search(ds, "owner", {"sort": [{"scope": score, "order": "asc"}]})[0] == expected


def test_progress_and_metrics(ds):
    url, did = ds["url"], ds["id"]
    progress = httpx.get(f"{url}/api/v1/datasets/{did}/progress", headers=ds["owner"]).json()
    assert (progress["total"], progress["completed"], progress["pending"]) == (N, 2, N - 2)
    ann = httpx.get(
        f"{url}/api/v1/me/datasets/{did}/metrics", headers={"X-Argilla-Api-Key": ds["ann"]["api_key"]}
    )
    got = ann.json()["responses"] if "responses" in ann.json() else ann.json()
    assert {k: got[k] for k in ("submitted", "draft", "discarded", "pending")} == {
        "submitted": 3, "draft": 1, "discarded": 0, "pending": 2,
    }  # fmt: skip
    props = httpx.get(f"{url}/api/v1/me/datasets/{did}/metadata-properties", headers=ds["owner"]).json()[
        "items"
    ]
    by_name = {p["name"]: p["id"] for p in props}
    m = httpx.get(
        f"{url}/api/v1/metadata-properties/{by_name['item_id']}/metrics", headers=ds["owner"]
    ).json()
    assert (m["min"], m["max"]) == (1, N)
    m = httpx.get(
        f"{url}/api/v1/metadata-properties/{by_name['model_a']}/metrics", headers=ds["owner"]
    ).json()
    models = [it.responses[0].model for it in ds["store"].items().values()]
    assert m["total"] == N and {v["term"]: v["count"] for v in m["values"]} == {
        k: models.count(k) for k in set(models)
    }


def test_a_changed_distribution_is_applied_by_the_background_worker(ds):
    """Last in this file (it changes the dataset): min_submitted 2 -> 1 is a job for argilla-server's rq
    worker, which recomputes every record's status through the search engine."""
    import time

    url, did = ds["url"], ds["id"]
    body = {"distribution": {"strategy": "overlap", "min_submitted": 1}}
    r = httpx.patch(f"{url}/api/v1/datasets/{did}", json=body, headers=ds["owner"])
    assert r.status_code == 200, r.text
    record_status = {"entity": "record", "property": "status"}
    deadline = time.monotonic() + 60
    while sorted(search(ds, "owner", terms(record_status, "completed"))[0]) != [1, 2, 3]:
        assert time.monotonic() < deadline, "the worker did not update the records' status"
        time.sleep(0.5)


def test_similarity_search(local_argilla):
    import argilla as rg

    client = connect(local_argilla.url, local_argilla.api_key)
    settings = rg.Settings(
        fields=[rg.TextField(name="text")],
        questions=[rg.LabelQuestion(name="label", labels=["x", "y"])],
        vectors=[rg.VectorField(name="v", dimensions=2)],
    )
    name = f"vectors-{uuid.uuid4().hex[:8]}"
    dataset = rg.Dataset(name=name, workspace="argilla", settings=settings, client=client).create()
    vectors = {"east": [1.0, 0.0], "north-east": [1.0, 1.0], "north": [0.0, 1.0], "west": [-1.0, 0.1]}
    dataset.records.log([rg.Record(id=k, fields={"text": k}, vectors={"v": v}) for k, v in vectors.items()])
    url = f"{local_argilla.url}/api/v1/me/datasets/{dataset.id}/records/search"
    owner = {"X-Argilla-Api-Key": local_argilla.api_key}

    def ids(vector_query: dict) -> list[str]:
        r = httpx.post(url, json={"query": {"vector": {"name": "v", **vector_query}}}, headers=owner)
        assert r.status_code == 200, r.text
        return [x["record"]["external_id"] for x in r.json()["items"]]

    assert ids({"value": [1.0, 0.2]}) == [
        "east",
        "north-east",
        "north",
        "west",
    ]  # by cosine, most similar first
    assert ids({"value": [1.0, 0.2], "order": "least_similar"})[0] == "west"
    by_id = {r.id: r._server_id for r in dataset.records}
    assert ids({"record_id": str(by_id["north"])}) == ["north-east", "west", "east"]  # itself left out
