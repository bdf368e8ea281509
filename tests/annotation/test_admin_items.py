"""The Admin tab's item browser and disputes: item states (unit), and in headless Chromium an admin finds
items by search and filters, opens one to see every vote and rationale, sees disputed items first and asks
for one more vote with one click. Screenshots go to ``build/test-artifacts/``."""

from __future__ import annotations

from datetime import datetime

import pytest

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.browse import find_items, item_state, item_states
from glmwb.annotation.guard import LoginGate
from glmwb.annotation.store import ItemInfo, NewItem, NewResponse, ResponseInfo, Store, StoreError, VoteRow
from glmwb.ui.annotator import PageConfig
from glmwb.ui.app import ServerSettings, create_app
from tests.annotation.conftest import ThreadServer, artifact, cheap_hasher, wait_text


def _item(item_id: int, gold: str | None = None, overlap: int = 2, status: str = "open") -> ItemInfo:
    responses = [ResponseInfo(k, k, f"answer {k}", f"model-{k}", None, {}, None) for k in "AB"]
    return ItemInfo(item_id, f"p{item_id}", [{"role": "user", "content": f"q{item_id}"}], {}, "", responses,
                    gold, "", {}, overlap, status)  # fmt: skip


def _vote(item_id: int, who: str, choice: str, gold: str | None = None) -> VoteRow:
    return VoteRow(
        0, f"{who}-{item_id}", item_id, who, choice, {}, "", None, "", datetime(2026, 1, 1), False, gold
    )


def test_item_states_and_disputed_first():
    items = {i: _item(i) for i in (1, 2, 3, 4)} | {5: _item(5, gold="A"), 6: _item(6, status="closed")}
    votes = [_vote(1, "x", "A"), _vote(1, "y", "A"), _vote(2, "x", "A"), _vote(2, "y", "tie"), _vote(3, "x", "B"),
             _vote(5, "x", "B", "A"), _vote(5, "y", "A", "A")]  # fmt: skip
    states = item_states(items, votes)
    assert {i: s.state for i, s in states.items()} == {
        1: "complete",
        2: "disputed",
        3: "open",
        4: "open",
        5: "disputed",
        6: "closed",
    }
    assert states[2].reason == "split: A 1, tie 1" and states[5].reason == "1 of 2 against gold A"
    assert find_items(items, states) == [2, 5, 1, 3, 4, 6]  # disputed first
    assert find_items(items, states, state="open", annotator="x") == [3]
    assert find_items(items, states, gold="gold") == [5] and find_items(items, states, query="Q4") == [4]
    assert item_state(_item(7), []).state == "open"


PASSWORDS = {"x1": "x1-password", "x2": "x2-password", "x3": "x3-password", "root": "root-password"}


@pytest.fixture(scope="module")
def admin_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    store = Store(
        f"sqlite:///{tmp / 'a.db'}", password_hasher=cheap_hasher(), policy=AssignmentPolicy(gold_rate=0)
    )
    people = {
        n: store.create_annotator(n, p, role="admin" if n == "root" else "annotator")
        for n, p in PASSWORDS.items()
    }
    split = NewItem("split", [{"role": "user", "content": "Which is faster?"}],
                    [NewResponse("the alpha answer", "m-alpha"), NewResponse("the beta answer", "m-beta")],
                    overlap=2, priority=3.0, shuffle=False)  # fmt: skip
    agreed = NewItem("agreed", [{"role": "user", "content": "Name an animal"}],
                     [NewResponse("a zebra", "m-gamma"), NewResponse("a rock", "m-gamma2")],
                     overlap=2, priority=2.0, shuffle=False)  # fmt: skip
    pending = NewItem(
        "pending",
        [{"role": "user", "content": "Anything"}],
        [NewResponse("one", "m-gamma"), NewResponse("two", "m-gamma2")],
        overlap=3,
        priority=1.0,
    )
    ids = store.add_items([split, agreed, pending])
    for who, choices in (("x1", ["A", "A", "tie"]), ("x2", ["B", "A"])):
        for n, choice in enumerate(choices):
            task = store.next_task(people[who])
            store.submit_vote(people[who], task.assignment_id, choice, uid=f"{who}-vote-{n}",
                              rationale=f"{who} thinks {choice} <b>bold</b>")  # fmt: skip
    server = ThreadServer(
        create_app(
            store,
            ServerSettings(
                page=PageConfig(export_dir=tmp / "e", import_dir=tmp_path_factory.getbasetemp()),
                gate=LoginGate(),
            ),
        )
    )
    yield store, server.base_url, dict(zip(("split", "agreed", "pending"), ids, strict=True))
    server.stop()
    store.close()


def choose(page, selector: str, option: str) -> None:
    page.locator(f"{selector} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def result_ids(page) -> list[int]:
    page.wait_for_timeout(300)
    text = page.locator("#items-results").inner_text()
    return [int(line.split("\t")[0]) for line in text.splitlines() if line.split("\t")[0].strip().isdigit()]


def admin_tab(browser, base: str):
    """A browser context signed in as the admin ``root``, on the Admin tab: (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(base)
    page.locator("input[type=text]").first.fill("root")
    page.locator("input[type=password]").fill(PASSWORDS["root"])
    page.keyboard.press("Enter")
    page.get_by_role("tab", name="Admin").click()
    return context, page


@pytest.mark.browser
def test_admin_item_browser_and_disputes(admin_site, browser):
    store, base, ids = admin_site
    context, page = admin_tab(browser, base)
    page.locator("#admin-refresh").click()
    wait_text(page, "#items-count", r"3 of 3 items match")
    disputes = wait_text(page, "#admin-disputes", r"split: A 1, B 1")
    assert "+ one more vote" in disputes and "Name an animal" not in disputes
    # agreement with its reading and why a statistic is n/a; the charts
    agreement = wait_text(page, "#admin-agreement", r"Landis")
    assert "0.000\tslight" in agreement and "-0.333\tpoor (worse than chance)" in agreement, agreement
    assert "n/a\tno two annotators have 5 items in common yet" in agreement
    names = page.locator("#chart-votes polyline.glmwb-series").evaluate_all(
        "ps => ps.map(p => p.dataset.name)"
    )
    assert names == ["x1", "x2"]
    points = page.locator("#chart-votes polyline[data-name=x1]").get_attribute("points").split()
    assert len(points) == 3  # x1's three votes
    assert page.locator("#chart-agreement polyline.glmwb-series").count() == 2
    page.locator("#admin-charts").screenshot(path=artifact("admin_agreement_charts"))
    assert result_ids(page)[0] == ids["split"]  # disputed first
    choose(page, "#items-state", "complete")
    page.locator("#items-search").click()
    wait_text(page, "#items-count", r"\b1 of 3 items match")
    assert result_ids(page) == [ids["agreed"]]
    choose(page, "#items-state", "any")
    page.locator("#items-query textarea, #items-query input").first.fill("ZEBRA")
    page.locator("#items-search").click()
    wait_text(page, "#items-count", r"\b1 of 3")
    assert result_ids(page) == [ids["agreed"]]  # found in an answer
    page.locator("#items-query textarea, #items-query input").first.fill("")
    choose(page, "#items-model", "m-alpha")
    choose(page, "#items-annotator", "x2")
    page.locator("#items-search").click()
    wait_text(page, "#items-count", r"\b1 of 3")
    assert result_ids(page) == [ids["split"]]
    # open it: every vote with its rationale (as text)
    page.locator("#items-results span").filter(has_text="Which is faster?").click()
    detail = wait_text(page, "#item-detail", r"x2 thinks B")
    assert "x1 thinks A <b>bold</b>" in detail and "m-alpha" in detail and "split: A 1, B 1" in detail
    page.screenshot(path=artifact("admin_item_browser"), full_page=True)
    # one click: one more vote for the disputed item, and the next annotator without it gets it
    page.locator("#admin-disputes span").filter(has_text="+ one more vote").click()
    wait_text(page, "#admin-dispute-status", rf"Item {ids['split']} now wants 3 votes")
    assert store.items([ids["split"]])[ids["split"]].overlap == 3
    assert store.next_task(store.annotator("x3")).item_id == ids["split"]
    page.screenshot(path=artifact("admin_disputes"), full_page=True)
    context.close()


@pytest.mark.browser
def test_admin_imports_tasks_with_the_clis_validation(admin_site, browser, tmp_path, capsys):
    import json

    from glmwb.recipes.cli import main

    store, base, _ = admin_site
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    rows = [{"prompt": f"imported question {i}", "responses": [f"yes {i}", {"text": f"no {i}", "model": "m-x"}]}
            for i in range(3)]  # fmt: skip
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad.write_text(
        json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "only one", "responses": ["one"]}) + "\n"
    )
    assert main(["annotation", "add-tasks", "--db", str(tmp_path / "cli.db"), "--responses", str(bad)]) == 2
    cli_error = capsys.readouterr().err.strip().removeprefix("glmwb: error: ")
    assert "needs at least two responses" in cli_error
    before = store.counts()["items"]
    context, page = admin_tab(browser, base)
    page.get_by_text("Import tasks").click()
    page.locator("#import-path textarea, #import-path input").first.fill(str(bad))
    page.locator("#import-button").click()
    shown = wait_text(page, "#import-status", r"Not imported")
    assert shown.strip() == f"Not imported: {cli_error}"  # the CLI's error, word for word
    assert store.counts()["items"] == before  # nothing written
    page.locator("#import-path textarea, #import-path input").first.fill(str(good))
    page.locator("#import-batch textarea, #import-batch input").first.fill("from-page")
    page.locator("#import-button").click()
    wait_text(page, "#import-status", rf"Added 3 items from {good}")
    page.screenshot(path=artifact("admin_import"), full_page=True)
    items = [i for i in store.items().values() if i.batch == "from-page"]
    assert sorted(i.prompt[0]["content"] for i in items) == [f"imported question {i}" for i in range(3)]
    assert {r.model for i in items for r in i.responses} == {"unknown", "m-x"} and {
        i.overlap for i in items
    } == {3}
    context.close()


def test_admin_handlers_refuse_annotators_and_the_store_refuses_what_is_not_allowed(sqlite_store, tmp_path):
    import json
    from types import SimpleNamespace

    import gradio as gr

    from glmwb.annotation.store import Conflict, NotFound
    from glmwb.ui.admin_import import SOURCES, ImportHandlers
    from glmwb.ui.admin_items import ItemsHandlers
    from glmwb.ui.annotator import AdminHandlers
    from tests.annotation.conftest import make_items

    store = sqlite_store
    alice, bob = (
        store.create_annotator("alice", "alice-password"),
        store.create_annotator("bob", "bob-password"),
    )
    store.create_annotator("root", "root-password", role="admin")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"prompt": "q", "responses": ["x", "y"]}) + "\n")
    admin_only = AdminHandlers(store, PageConfig(), None).admin_only
    imports, items = ImportHandlers(store, None, admin_only, tmp_path), ItemsHandlers(store, None, admin_only)
    as_alice, as_root = SimpleNamespace(username="alice"), SimpleNamespace(username="root")
    with pytest.raises(gr.Error, match="Admins only"):
        imports.run(SOURCES[0], str(answers), "", 2, 3, "", as_alice)
    with pytest.raises(gr.Error, match="Admins only"):
        items.search("", "any", "any", "any", "any", as_alice)
    assert store.counts()["items"] == 0
    assert imports.run(SOURCES[0], str(answers), "", 2, 3, "", as_root) == f"Added 1 items from {answers}."
    # the store: a change only of one's own vote on an open item; more votes only for open regular items
    task = store.next_task(alice)
    store.submit_vote(alice, task.assignment_id, "A", uid="alice-vote-1")
    with pytest.raises(NotFound):
        store.change_vote(bob, task.item_id, "B", uid="bob-change-1")
    with pytest.raises(StoreError, match="strength goes with a winner"):
        store.change_vote(alice, task.item_id, "tie", uid="alice-change-0", strength="clear")
    store.set_status([task.item_id], "closed")
    with pytest.raises(Conflict, match="closed"):
        store.change_vote(alice, task.item_id, "B", uid="alice-change-1")
    with pytest.raises(Conflict, match="closed"):
        store.add_votes_wanted(task.item_id)
    (gold_id,) = store.add_items(make_items(1, prefix="g", gold_every=1))
    with pytest.raises(Conflict, match="gold"):
        store.add_votes_wanted(gold_id)
    with pytest.raises(NotFound):
        store.add_votes_wanted(10**6)
    assert [v.choice for v in store.votes(include_retracted=True)] == ["A"]  # nothing changed


def test_import_from_a_datasets_folder(sqlite_store, tmp_path):
    from types import SimpleNamespace

    import datasets

    from glmwb.ui.admin_import import SOURCES, ImportHandlers
    from glmwb.ui.annotator import AdminHandlers

    store = sqlite_store
    store.create_annotator("root", "root-password", role="admin")
    rows = [{"prompt": f"问题 {i}", "responses": [f"答案 {i}", f"回答 {i}"]} for i in range(2)]
    folder = tmp_path / "answers"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    imports = ImportHandlers(store, None, AdminHandlers(store, PageConfig(), None).admin_only, tmp_path)
    assert imports.run(SOURCES[0], str(folder), "", 2, 2, "ds", SimpleNamespace(username="root")) == (
        f"Added 2 items from {folder}."
    )
    items = store.items().values()
    assert sorted(i.prompt[0]["content"] for i in items) == ["问题 0", "问题 1"] and {
        i.overlap for i in items
    } == {2}
    missing = imports.run(SOURCES[0], str(tmp_path / "nope"), "", 2, 2, "", SimpleNamespace(username="root"))
    assert missing == f"Not imported: no responses file or datasets folder at {tmp_path / 'nope'}"
    # nothing outside the import folder is read: not a path outside it, not a link or ``..`` that leads out
    (tmp_path / "out").symlink_to("/etc")
    root = SimpleNamespace(username="root")
    for outside in ("/etc/passwd", str(tmp_path / "out" / "passwd"), str(tmp_path / ".." / "x.jsonl")):
        refused = imports.run(SOURCES[0], outside, "", 2, 2, "", root)
        assert (
            refused
            == f"Not imported: {outside} is outside the import folder {tmp_path.resolve()}; put the file there first."
        )
    assert len(store.items()) == 2
