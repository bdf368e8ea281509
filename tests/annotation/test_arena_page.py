"""The arena app as people use it, in headless Chromium: sign in with an annotator account, an anonymous
battle streams two answers (a tiny GLM in-process behind the batching generator, and the same model
behind our OpenAI-compatible server, paced so that its stream takes a while), a vote before both finish is
refused, the vote lands in the store with the right models and display order, the names appear only after
the vote, the leaderboard shows the models, a leaked identity is stored but not counted, named mode with
two turns and a regeneration, and the rate limit. Also, over HTTP: a signed-out client gets nothing."""

from __future__ import annotations

import time

import httpx
import pytest

from glmwb.annotation.guard import LoginGate
from glmwb.annotation.store import Store
from glmwb.pretrain.chat_server import openai_chat_app
from glmwb.pretrain.chat_sources import BatchingGenerator, LocalChatModel, OpenAIChatModel, Sampling
from glmwb.ui.app import ServerSettings
from glmwb.ui.arena import Arena, ArenaConfig, ArenaModel, create_arena_app
from tests.annotation.conftest import ThreadServer, cheap_hasher, wait_text
from tests.tiny import one_thread  # noqa: F401 (autouse)

PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}
LOCAL, REMOTE = "tiny-local", "tiny-remote"
PROMPT = "How is the weather in Beijing today?"


@pytest.fixture(scope="module")
def arena_site(tmp_path_factory, tiny_glm_folder):
    tmp = tmp_path_factory.mktemp("arena")
    store = Store(f"sqlite:///{tmp / 'arena.db'}", password_hasher=cheap_hasher())
    for name, password in PASSWORDS.items():
        store.create_annotator(name, password)
    generator = BatchingGenerator(tiny_glm_folder, max_batch=8, max_wait_s=0.01)
    local = LocalChatModel(LOCAL, generator)
    # the remote model streams one piece per 0.1 s, so a vote can be clicked while it is still writing
    endpoint = ThreadServer(openai_chat_app({"tiny": local}, chunk_delay_s=0.1), health="/v1/models")
    remote = OpenAIChatModel(REMOTE, f"{endpoint.base_url}/v1", "tiny")
    config = ArenaConfig(
        sampling=Sampling(temperature=0.0, max_new_tokens=16), per_minute=3, per_day=50, seed=0,
        leaderboard_bootstrap=20,
    )  # fmt: skip
    arena = Arena(
        store, {LOCAL: ArenaModel(local), REMOTE: ArenaModel(remote, aliases=("TinyRemote",))}, config
    )
    server = ThreadServer(
        create_arena_app(store, arena, ServerSettings(gate=LoginGate(free_per_user_client=3)))
    )
    yield store, server.base_url, arena
    server.stop()
    endpoint.stop()
    generator.close()
    store.close()


def sign_in(browser, base: str, username: str):
    context = browser.new_context()
    page = context.new_page()
    page.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))
    page.goto(base)
    page.locator("input[type=password]").wait_for(timeout=30_000)
    page.locator("input[type=text]").first.fill(username)
    page.locator("input[type=password]").fill(PASSWORDS[username])
    page.keyboard.press("Enter")
    page.locator("#anon-prompt").wait_for(timeout=30_000)
    wait_text(page, "#header", username)
    return context, page


def send(page, prefix: str, text: str) -> None:
    page.locator(f"#{prefix}-prompt textarea").fill(text)
    page.locator(f"#{prefix}-send").click()


def arena_votes(store: Store, username: str) -> list:
    votes = [v for v in store.votes() if v.annotator == username]
    items = store.items([v.item_id for v in votes])
    return [(v, items[v.item_id]) for v in votes]


def test_signed_out_clients_get_nothing(arena_site):
    store, base, _ = arena_site
    anonymous = httpx.Client(base_url=base, timeout=30)
    for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join")]:
        r = anonymous.request(method, path, json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert r.status_code == 401, (path, r.status_code)
    page = anonymous.get("/")
    assert page.status_code == 200 and LOCAL not in page.text and REMOTE not in page.text
    assert store.counts()["votes"] == 0


@pytest.mark.browser
def test_an_anonymous_battle_in_the_browser(arena_site, browser, shots):
    store, base, arena = arena_site
    context, page = sign_in(browser, base, "alice")
    page.get_by_role("tab", name="Leaderboard").click()
    wait_text(page, "#leaderboard", "No counted votes yet")
    page.get_by_role("tab", name="Battle").click()
    send(page, "anon", PROMPT)
    # the answers grow while the models write: sample the page as it streams
    seen = {"A": set(), "B": set()}
    page.locator("#anon-answer-A .glmwb-assistant").first.wait_for(timeout=30_000)
    refused = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for k in seen:
            seen[k].add(page.locator(f"#anon-answer-{k}").inner_text())
        status = page.locator("#anon-status").inner_text()
        if "both answered" in status:
            break
        if not refused and "answering" in status:
            page.locator("#anon-vote-A").click()  # too early: the remote model is still writing
            wait_text(page, "#anon-status", "Refused: both answers must be complete")
            refused = True
            assert store.counts()["votes"] == 0
        time.sleep(0.05)
    assert refused, "the battle finished before a vote could be tried"
    wait_text(page, "#anon-status", "Turn 1: both answered")
    assert max(len(s) for s in seen.values()) >= 3  # several partial answers were shown: streamed
    page.screenshot(path=shots / "alice-battle.png", full_page=True)
    # names hidden until the vote
    for k in "AB":
        assert page.locator(f"#anon-name-{k}").inner_text().strip() == f"Model {k}"
    body = page.locator("body").inner_text()
    assert LOCAL not in body and REMOTE not in body
    answers = {k: page.locator(f"#anon-answer-{k} .glmwb-assistant").last.inner_text() for k in "AB"}

    page.locator("body").click(position={"x": 5, "y": 5})  # leave the prompt box: keys vote outside it
    page.keyboard.press("2")  # B is better
    wait_text(page, "#anon-status", r"Saved: B is better .*counted for the leaderboard")
    shown = {k: page.locator(f"#anon-name-{k}").inner_text().split(":")[-1].strip() for k in "AB"}
    assert set(shown.values()) == {LOCAL, REMOTE}
    page.screenshot(path=shots / "alice-voted.png", full_page=True)
    ((vote, item),) = arena_votes(store, "alice")
    assert vote.choice == "B"
    assert [r.model for r in item.responses] == [shown["A"], shown["B"]]  # display order as shown
    for r in item.responses:
        assert r.text in answers[r.letter]
        assert r.sampling == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16}
    by_model = {r.model: r for r in item.responses}
    assert by_model[LOCAL].chat_template_sha256 == arena.models[LOCAL].source.chat_template_sha256
    assert by_model[REMOTE].checkpoint.endswith("/v1#tiny")
    meta = item.meta["arena"]
    assert (meta["left"], meta["right"], meta["mode"], meta["counted"]) == (
        shown["A"],
        shown["B"],
        "anonymous",
        True,
    )
    assert item.prompt == [{"role": "user", "content": PROMPT}]
    assert set(meta["tokens"]) == {"A", "B"} and 0 < min(meta["tokens"].values()) <= 16
    # a second vote on the same battle is refused
    page.locator("#anon-vote-A").click()
    wait_text(page, "#anon-status", "voted on this battle already")
    assert len(arena_votes(store, "alice")) == 1

    # the leaderboard shows both models
    page.get_by_role("tab", name="Leaderboard").click()
    page.locator("#leaderboard-refresh").click()
    board = wait_text(page, "#leaderboard", "1 counted votes")
    assert board.index(shown["B"]) < board.index(shown["A"])  # the winner ranks first
    page.locator("#leaderboard-plot img").wait_for(timeout=30_000)
    page.screenshot(path=shots / "alice-leaderboard.png", full_page=True)

    # a prompt that names a model: the vote is stored, not counted
    page.get_by_role("tab", name="Battle").click()
    send(page, "anon", f"Are you {REMOTE}?")
    wait_text(page, "#anon-status", "Turn 1: both answered.* stored but not counted")
    page.locator("#anon-vote-tie").click()
    wait_text(page, "#anon-status", f"stored but not counted: the user named {REMOTE}")
    (_, leaked) = arena_votes(store, "alice")[-1]
    assert leaked.meta["arena"]["counted"] is False and leaked.meta["arena"]["leaked"] is True
    context.close()


@pytest.mark.browser
def test_named_mode_two_turns_regenerate_and_the_rate_limit(arena_site, browser, shots):
    store, base, _ = arena_site
    context, page = sign_in(browser, base, "bob")
    page.get_by_role("tab", name="Named").click()
    send(page, "named", PROMPT)
    wait_text(page, "#named-status", "Turn 1: both answered")
    assert page.locator("#named-name-A").inner_text().endswith(LOCAL)  # named: shown from the start
    send(page, "named", "And tomorrow?")  # the next turn goes to both
    wait_text(page, "#named-status", "Turn 2: both answered")
    for k in "AB":
        assert page.locator(f"#named-answer-{k} .glmwb-user").count() == 2
        assert page.locator(f"#named-answer-{k} .glmwb-assistant").count() == 2
    page.locator("#named-regenerate").click()  # the third prompt of this minute
    wait_text(page, "#named-status", "Turn 2 again: both answered")
    assert page.locator("#named-answer-A .glmwb-assistant").count() == 2
    send(page, "named", "One more?")
    wait_text(page, "#named-status", "Rate limit: at most 3 prompts a minute")
    assert page.locator("#named-answer-A .glmwb-user").count() == 2  # the refused prompt went nowhere
    page.screenshot(path=shots / "bob-named.png", full_page=True)
    page.locator("#named-vote-A").click()
    wait_text(page, "#named-status", "a named battle, so it does not count")
    ((vote, item),) = arena_votes(store, "bob")
    meta = item.meta["arena"]
    assert (meta["mode"], meta["turns"], meta["regenerations"], meta["counted"]) == ("named", 2, 1, False)
    assert [r.model for r in item.responses] == [LOCAL, REMOTE] and vote.choice == "A"
    context.close()


def test_the_annotator_pages_protections_hold_here_too(arena_site):
    """The arena is mounted as the annotator page is (ui/app.py): a cross-origin request, an oversized
    body, an upload or a file read gets the same answer from both servers."""
    from glmwb.ui.app import create_app

    store, arena_base, _ = arena_site
    annotator = ThreadServer(create_app(store))
    try:
        answers = {}
        for name, base in (("annotator", annotator.base_url), ("arena", arena_base)):
            client = httpx.Client(base_url=base, timeout=30)
            other = {"Origin": "http://localhost:1"}  # another local port
            probes = [
                client.post(
                    "/login", data={"username": "carol", "password": PASSWORDS["carol"]}, headers=other
                ),
                client.post("/api/v1/login", content=b'{"username": "' + b"x" * 2_000_000 + b'"}'),
            ]
            client.post("/login", data={"username": "carol", "password": PASSWORDS["carol"]})
            probes += [
                client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "s"},
                            headers=other),
                client.post("/gradio_api/upload", files={"files": ("x.txt", b"x" * 5_000_000)}),
                client.get("/gradio_api/file=/etc/passwd"),
            ]  # fmt: skip
            answers[name] = [(r.status_code, r.headers.get("access-control-allow-origin")) for r in probes]
            client.close()
        assert answers["arena"] == answers["annotator"]
    finally:
        annotator.stop()
