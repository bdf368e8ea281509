"""The annotation server as people and programs use it: the JSON API over HTTP, unauthenticated clients
against every Gradio and API route, and (marked ``browser``) the annotator page in headless Chromium: two
annotators sign in and vote by mouse and keyboard, undo and skip, model output with <script> / <img
onerror> shows as text, and the admin tab. One server (uvicorn in a thread, on loopback) for the module;
screenshots are kept under ``build/test-artifacts/<test name>/``."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.guard import LoginGate
from glmwb.annotation.store import NewItem, NewResponse, Store
from glmwb.ui.annotator import PageConfig
from glmwb.ui.app import ServerSettings, create_app
from tests.annotation.conftest import (
    ThreadServer,
    bearer_login,
    cheap_hasher,
    make_items,
    page_client,
    wait_text,
)

XSS_A = '<script>window.__pwned = "script"</script>**bold** answer'
XSS_B = (
    '<img src="x" onerror="window.__pwned = \'img\'"> and [a link](javascript:alert(1)) ${window.__pwned=1}'
)
SECRET = "secret-item-text-7c1e"
PASSWORDS = {
    "alice": "alice-password",
    "bob": "bob-password",
    "carol": "carol-password",
    "dave": "dave-password",
    "root": "root-password",
}
FOUR = ["first answer", "second answer", "third answer", "fourth answer"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    store = Store(
        f"sqlite:///{tmp / 'annotation.db'}",
        password_hasher=cheap_hasher(),
        policy=AssignmentPolicy(gold_rate=0),
    )
    for name, password in PASSWORDS.items():
        store.create_annotator(name, password, role="admin" if name == "root" else "annotator")
    xss = NewItem(
        "xss",
        [{"role": "user", "content": f"Say hello ({SECRET})"}],
        [NewResponse(XSS_A, "m1"), NewResponse(XSS_B, "m2")],
        overlap=3,
        priority=10.0,  # first for everyone
    )
    four = NewItem(
        "four",
        [{"role": "user", "content": "Four answers"}],
        [NewResponse(t, "m") for t in FOUR],
        overlap=4,
        priority=5.0,
    )
    store.add_items([xss, four, *make_items(12, overlap=2)])
    settings = ServerSettings(
        page=PageConfig(export_dir=tmp / "exports"), gate=LoginGate(free_per_user_client=3, base_delay_s=60)
    )
    server = ThreadServer(create_app(store, settings))
    yield store, server.base_url, tmp
    server.stop()
    store.close()


def login(base_url: str, username: str) -> dict[str, str]:
    return bearer_login(base_url, username, PASSWORDS[username])


def gradio_session(base_url: str, username: str) -> httpx.Client:
    return page_client(base_url, username, PASSWORDS[username])


def test_api_vote_round_trip(site):
    store, base, _ = site
    alice, bob = login(base, "alice"), login(base, "bob")
    task = httpx.get(f"{base}/api/v1/next", headers=alice).json()["task"]
    assert [r["letter"] for r in task["responses"]] == ["A", "B"]
    body = {"uid": "api-vote-0001", "assignment_id": task["assignment_id"], "choice": "B", "rationale": "why"}
    for wrong, field in (
        ({"strength": "huge"}, "strength must be one of"),
        ({"choice": "tie", "strength": "clear"}, "winner"),
    ):
        r = httpx.post(f"{base}/api/v1/votes", json={**body, **wrong, "uid": "api-vote-bad0"}, headers=alice)
        assert r.status_code == 400 and field in r.json()["detail"], r.text
    body["strength"] = "clear"
    first = httpx.post(f"{base}/api/v1/votes", json=body, headers=alice)
    assert first.status_code == 201 and first.json()["duplicate"] is False
    again = httpx.post(f"{base}/api/v1/votes", json=body, headers=alice)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["vote_id"] == first.json()["vote_id"]
    assert [v.strength for v in store.votes() if v.uid == "api-vote-0001"] == ["clear"]
    other = httpx.post(f"{base}/api/v1/votes", json={**body, "uid": "api-vote-0002"}, headers=alice)
    assert other.status_code == 409
    stolen = httpx.post(f"{base}/api/v1/votes", json={**body, "uid": "api-vote-0003"}, headers=bob)
    assert stolen.status_code == 404  # someone else's assignment: not found, whatever it is
    bad = httpx.post(
        f"{base}/api/v1/votes", json={**body, "uid": "api-vote-0004", "choice": "Z"}, headers=alice
    )
    assert bad.status_code in (400, 409)
    undone = httpx.post(f"{base}/api/v1/undo", headers=alice).json()["undone"]
    assert undone["uid"] == "api-vote-0001"
    assert (
        httpx.get(f"{base}/api/v1/next", headers=alice).json()["task"]["assignment_id"]
        == task["assignment_id"]
    )
    revote = {**body, "uid": "api-vote-0005", "choice": "A", "next": True}
    r = httpx.post(f"{base}/api/v1/votes", json=revote, headers=alice)
    assert r.status_code == 201 and r.json()["next"]["assignment_id"] != task["assignment_id"]
    assert httpx.get(f"{base}/api/v1/progress", headers=alice).json()["votes"] == 1
    assert httpx.get(f"{base}/api/v1/admin/overview", headers=alice).status_code == 403
    admin = login(base, "root")
    assert httpx.get(f"{base}/api/v1/admin/overview", headers=admin).json()["votes"] >= 1
    assert "krippendorff_alpha" in httpx.get(f"{base}/api/v1/admin/agreement", headers=admin).json()
    # clean up: this test's votes must not disturb the browser tests' expectations
    for headers in (alice,):
        while httpx.post(f"{base}/api/v1/undo", headers=headers).json()["undone"]:
            pass
    httpx.post(f"{base}/api/v1/logout", headers=bob)
    assert httpx.get(f"{base}/api/v1/next", headers=bob).status_code == 401


def test_unauthenticated_clients_can_neither_read_nor_write(site):
    store, base, _ = site
    before = store.counts()
    # the Gradio routes work for a signed-in session (so the 401s below are the guard, not broken routes)
    signed_in = gradio_session(base, "alice")
    config = signed_in.get("/config")
    signed_in.close()
    assert config.status_code == 200
    fn_indices = [i for i, d in enumerate(config.json()["dependencies"]) if d.get("backend_fn")]
    assert fn_indices
    anonymous = httpx.Client(base_url=base, timeout=30)
    forged = {"Authorization": "Bearer not-a-token"}
    for method, path, kwargs in [
        ("GET", "/api/v1/next", {}),
        ("GET", "/api/v1/next", {"headers": forged}),
        ("POST", "/api/v1/votes", {"json": {"uid": "anon-vote-1", "assignment_id": 1, "choice": "A"}}),
        ("POST", "/api/v1/votes", {"json": {"uid": "anon-vote-2", "assignment_id": 1, "choice": "A"}, "headers": forged}),
        ("POST", "/api/v1/undo", {}),
        ("POST", "/api/v1/skip", {"json": {"assignment_id": 1}}),
        ("GET", "/api/v1/progress", {}),
        ("GET", "/api/v1/admin/overview", {}),
        ("GET", "/api/v1/admin/agreement", {}),
        ("GET", "/config", {}),
        ("GET", "/gradio_api/info", {}),
        ("GET", "/gradio_api/openapi.json", {}),
        ("GET", "/gradio_api/queue/data?session_hash=anon", {}),
        ("GET", "/gradio_api/file=/etc/passwd", {}),
        ("POST", "/gradio_api/upload", {"files": {"files": ("x.txt", b"x")}}),  # 403: no uploads at all
        ("POST", "/gradio_api/reset", {"json": {"event_id": "x"}}),  # routes Gradio leaves open
        ("POST", "/gradio_api/cancel", {"json": {"session_hash": "anon", "fn_index": 0, "event_id": "x"}}),
        ("POST", "/gradio_api/stream/x", {"json": {"data": []}}),
        ("GET", "/gradio_api/token", {}),
        ("GET", "/gradio_api/user", {}),
        ("GET", "/gradio_api/startup-events", {}),
    ] + [
        ("POST", "/gradio_api/queue/join", {"json": {"data": [None] * 3, "fn_index": i, "session_hash": "anon"}})
        for i in fn_indices
    ] + [
        ("POST", f"/gradio_api/run/{name}", {"json": {"data": []}}) for name in ("vote", "predict", "on_load")
    ]:  # fmt: skip
        r = anonymous.request(method, path, **kwargs)
        expected = 403 if path.startswith("/gradio_api/upload") else 401
        assert r.status_code == expected, (method, path, r.status_code, r.text[:200])
        assert SECRET not in r.text
    page = anonymous.get("/")  # the page shell is the sign-in form, with no item in it
    assert page.status_code == 200 and SECRET not in page.text and "auth_required" in page.text
    assert store.counts() == before


def test_failed_sign_ins_are_throttled(site):
    _, base, _ = site
    for _ in range(3):
        r = httpx.post(f"{base}/api/v1/login", json={"username": "carol", "password": "wrong-password"})
        assert r.status_code == 401
    r = httpx.post(f"{base}/api/v1/login", json={"username": "carol", "password": PASSWORDS["carol"]})
    assert r.status_code == 429  # even the right password, until the back-off ends (60 s here)
    assert "try again in" in r.json()["detail"] and int(r.headers["retry-after"]) > 50
    # the page's sign-in shares the gate (a 400: what Gradio's form shows as "incorrect credentials")
    r = httpx.post(f"{base}/login", data={"username": "carol", "password": PASSWORDS["carol"]})
    assert r.status_code == 400 and "too many failed sign-ins" in r.json()["detail"]


# --------------------------------------------------------------------------------------------------------
# In a real browser.


def sign_in(browser, base: str, username: str, shots: Path):
    context = browser.new_context()
    page = context.new_page()
    page.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))
    page.goto(base)
    page.locator("input[type=password]").wait_for(timeout=30_000)
    page.screenshot(path=shots / f"{username}-0-sign-in.png")
    page.locator("input[type=text]").first.fill(username)
    page.locator("input[type=password]").fill(PASSWORDS[username])
    page.keyboard.press("Enter")
    page.locator("#answer-A").wait_for(timeout=30_000)
    wait_text(page, "#header", username)
    return context, page


def shown(store: Store, username: str):
    """The task the page shows this annotator (their pending assignment; asking does not create one)."""
    return store.next_task(store.annotator(username))


def votes_of(store: Store, username: str) -> list[tuple[int, str]]:
    return [(v.item_id, v.choice) for v in store.votes() if v.annotator == username]


@pytest.mark.browser
def test_two_annotators_vote_in_the_browser(site, browser, shots):
    store, base, _ = site
    ctx_a, alice = sign_in(browser, base, "alice", shots)
    ctx_b, bob = sign_in(browser, base, "bob", shots)

    # The first item for both is the one with script in its answers: shown as text, nothing runs.
    for page in (alice, bob):
        a_text = page.locator("#answer-A").inner_text()
        b_text = page.locator("#answer-B").inner_text()
        assert {"<script>" in a_text + b_text, "onerror=" in a_text + b_text} == {True}
        assert page.locator("#answer-A script, #answer-B script, #answer-A img, #answer-B img").count() == 0
        assert page.locator("#answer-A a[href^='javascript'], #answer-B a[href^='javascript']").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert SECRET in page.locator("#prompt").inner_text()
    alice.screenshot(path=shots / "alice-1-item.png", full_page=True)
    first_a, first_b = shown(store, "alice"), shown(store, "bob")
    assert first_a.item_id == first_b.item_id
    assert alice.locator("#answer-A").inner_text().strip().startswith(first_a.responses[0].split("**")[0][:8])

    # alice: a rating, a rationale, then the keyboard: "1" = A is better
    alice.get_by_text("Ratings (optional)").first.click()
    alice.locator("#rate-A-helpfulness").get_by_text("5").click()
    alice.locator("#rationale textarea").fill("A answers the question")
    alice.locator("body").click(
        position={"x": 5, "y": 5}
    )  # leave the text box: shortcuts are off while typing
    alice.keyboard.press("1")
    wait_text(alice, "#status", rf"Saved: item {first_a.item_id}, A is better")
    # after the choice, "how much better" (optional) amends the vote just saved
    alice.locator("#strength").get_by_text("clearly").click()
    wait_text(alice, "#status", rf"Saved: item {first_a.item_id}, A is clearly better")
    # bob: the mouse, "B is better"
    bob.locator("#vote-B").click()
    wait_text(bob, "#status", rf"Saved: item {first_b.item_id}, B is better")

    second_a, second_b = shown(store, "alice"), shown(store, "bob")
    alice.keyboard.press("3")  # tie
    wait_text(alice, "#status", rf"item {second_a.item_id}, a tie")
    bob.keyboard.press("4")  # both bad
    wait_text(bob, "#status", rf"item {second_b.item_id}, both bad")
    assert votes_of(store, "alice") == [(first_a.item_id, "A"), (second_a.item_id, "tie")]
    assert votes_of(store, "bob") == [(first_b.item_id, "B"), (second_b.item_id, "both_bad")]
    (first_vote,) = [v for v in store.votes() if v.annotator == "alice" and v.choice == "A"]
    assert (
        first_vote.ratings == {"helpfulness": {"A": 5}} and first_vote.rationale == "A answers the question"
    )
    assert first_vote.strength == "clear"  # and the page cleared it: bob's and alice's later votes have none
    assert {v.strength for v in store.votes() if v.vote_id != first_vote.vote_id} == {None}
    assert first_vote.time_spent_s > 0 and first_vote.guideline_version == PageConfig().version

    # undo (u) takes back alice's tie and shows that item again; skip (s) moves past it
    alice.keyboard.press("u")
    wait_text(alice, "#status", rf"Undid your vote on item {second_a.item_id}")
    assert shown(store, "alice").item_id == second_a.item_id
    assert votes_of(store, "alice") == [(first_a.item_id, "A")]
    alice.keyboard.press("s")
    wait_text(alice, "#status", rf"Skipped item {second_a.item_id}")
    assert shown(store, "alice").item_id != second_a.item_id
    assert "1 votes" in alice.locator("#header").inner_text()
    alice.screenshot(path=shots / "alice-2-after.png", full_page=True)
    bob.screenshot(path=shots / "bob-2-after.png", full_page=True)
    # annotators have no admin tab
    assert alice.get_by_role("tab", name="Admin").count() == 0
    ctx_a.close()
    ctx_b.close()


@pytest.mark.browser
def test_admin_tab_progress_agreement_export(site, browser, shots):
    store, base, tmp = site
    context, page = sign_in(browser, base, "root", shots)
    page.get_by_role("tab", name="Admin").click()
    page.locator("#admin-refresh").click()
    wait_text(page, "#admin-overview", r"votes")
    overview = page.locator("#admin-overview").inner_text()
    assert "alice" in overview and "bob" in overview
    wait_text(page, "#admin-agreement", "Krippendorff")
    page.locator("#admin-export").click()
    wait_text(page, "#admin-export-status", r"\d+ rows from \d+ items")
    page.screenshot(path=shots / "root-admin.png", full_page=True)
    exported = list((tmp / "exports").glob("preferences-majority-*.jsonl"))
    assert len(exported) == 1
    from glmwb.annotation.preference_data import read_preferences

    assert len(read_preferences(exported[0]).records) >= 1
    context.close()


@pytest.mark.browser
def test_signed_out_browser_sees_only_the_sign_in_form(site, browser, shots):
    _, base, _ = site
    context = browser.new_context()
    page = context.new_page()
    page.goto(base)
    page.locator("input[type=password]").wait_for(timeout=30_000)
    time.sleep(1)
    assert SECRET not in page.content() and page.locator("#answer-A").count() == 0
    page.locator("input[type=text]").first.fill("alice")
    page.locator("input[type=password]").fill("not-her-password")
    page.keyboard.press("Enter")
    time.sleep(1.5)
    assert page.locator("#answer-A").count() == 0 and SECRET not in page.content()
    page.screenshot(path=shots / "wrong-password.png", full_page=True)
    context.close()


@pytest.mark.browser
def test_an_item_with_four_answers(site, browser, shots):
    store, base, _ = site
    context, page = sign_in(browser, base, "dave", shots)
    while len(shown(store, "dave").responses) != 4:  # judge (B) until the four-answer item comes up
        item = shown(store, "dave").item_id
        page.keyboard.press("2")
        wait_text(page, "#status", rf"Saved: item {item}, B is better")
    task = shown(store, "dave")
    for letter in "ABCD":
        assert page.locator(f"#answer-{letter}").is_visible() and page.locator(f"#vote-{letter}").is_visible()
    assert sorted(page.locator(f"#answer-{k}").inner_text().strip() for k in "ABCD") == sorted(FOUR)
    page.screenshot(path=shots / "dave-four.png", full_page=True)
    page.locator("#vote-D").click()
    wait_text(page, "#status", rf"Saved: item {task.item_id}, D is better")
    assert (task.item_id, "D") in votes_of(store, "dave")
    assert not page.locator("#vote-C").is_visible()  # the next item has two answers again
    context.close()
