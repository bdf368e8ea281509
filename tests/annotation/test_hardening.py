"""The annotation server probed as an attacker and a careless client would, on loopback: bodies that once
crashed a route (ids >= 2^63, lone surrogates, NaN, bytes that are not UTF-8) are 4xx; a vote id resent after
its undo is refused; ratings are bounded; bodies are refused before they are read; sessions expire and end
with a new password or a sign-out; exports go to admins only; uploads are refused; a flood of wrong sign-ins
runs at most ``max_concurrent`` password checks, backs off, and does not lock out someone who signed in from
their client before. And (marked ``browser``) a page served from another 127.0.0.1 port, open in the
browser where the admin is signed in, tries to act as the admin: nothing changes in the store."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text, update

from glmwb.annotation.assign import AssignmentPolicy
from glmwb.annotation.export import export_records, write_records
from glmwb.annotation.guard import LoginGate
from glmwb.annotation.schema import Session
from glmwb.annotation.store import NewItem, NewResponse, Store
from glmwb.ui.annotator import PageConfig
from glmwb.ui.app import ServerSettings, create_app
from tests.annotation.conftest import (
    ThreadServer,
    bearer_login,
    cheap_hasher,
    free_port,
    make_items,
    page_client,
)

PASSWORDS = {
    "root": "root-password",
    "alice": "alice-password",
    "bob": "bob-password",
    "erin": "erin-password",
}
SECRET = "admins-task-text-5b2f"
TTL = timedelta(hours=2)
SE = Session.__table__


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardened")
    store = Store(
        f"sqlite:///{tmp / 'annotation.db'}",
        password_hasher=cheap_hasher(),
        policy=AssignmentPolicy(gold_rate=0),
    )
    for name, password in PASSWORDS.items():
        store.create_annotator(name, password, role="admin" if name == "root" else "annotator")
    spoof = NewItem(
        "bidi",
        [{"role": "user", "content": f"What is 7 + 5? ({SECRET})"}],
        [NewResponse("7 + 5 = \u202e21\u202c", "m1"), NewResponse("7 + 5 = 12", "m2")],
        overlap=4,
        priority=10.0,
    )
    store.add_items([spoof, *make_items(30, overlap=4)])
    settings = ServerSettings(page=PageConfig(export_dir=tmp / "exports"), session_ttl=TTL)
    server = ThreadServer(create_app(store, settings))
    yield store, server.base_url, tmp
    server.stop()
    store.close()


def api_login(base: str, username: str) -> dict[str, str]:
    return bearer_login(base, username, PASSWORDS[username])


def page_session(base: str, username: str) -> httpx.Client:
    return page_client(base, username, PASSWORDS[username])


def raw(base: str, head: str, chunks: list[bytes] = (), read_timeout: float = 10.0) -> tuple[int, str]:
    """Send a request byte by byte (a Content-Length the body never fills, or chunks); the status and body
    of the answer, which may come before the body is sent."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head.encode())
        try:
            for c in chunks:
                s.sendall(c)
        except OSError:  # the server answered and closed: fine
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = s.recv(65536)
                if not more:
                    break
                data += more
            header, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", header, re.I)
            while length and len(body) < int(length.group(1)):
                more = s.recv(65536)
                if not more:
                    break
                body += more
        except ConnectionResetError:
            header, _, body = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), body.decode(errors="replace")


def test_bodies_that_crashed_routes_are_named_4xx(site) -> None:
    store, base, _ = site
    alice = api_login(base, "alice")
    task = httpx.get(f"{base}/api/v1/next", headers=alice).json()["task"]
    aid = task["assignment_id"]
    before = store.counts()
    vote = f'"uid": "fuzz-vote-0001", "assignment_id": {aid}, "choice": "A"'
    cases = [
        ("/api/v1/votes", '{"uid": "fuzz-vote-0001", "assignment_id": 9223372036854775808, "choice": "A"}', 422, "less than or equal to 9223372036854775807"),
        ("/api/v1/votes", '{"uid": "fuzz-vote-0001", "assignment_id": 9223372036854775807, "choice": "A"}', 404, "no assignment"),
        ("/api/v1/skip", '{"assignment_id": 99999999999999999999999}', 422, "assignment_id"),
        ("/api/v1/votes", "{" + vote + ', "rationale": "\\ud800"}', 400, "$.rationale holds a lone surrogate"),
        ("/api/v1/votes", '{"uid": "\\udfffabcdefgh", "assignment_id": 1, "choice": "A"}', 400, "lone surrogate"),
        ("/api/v1/votes", "{" + vote + ', "guideline_version": "v\\ud800"}', 400, "lone surrogate"),
        ("/api/v1/votes", "{" + vote + ', "ratings": {"\\ud800": {"A": 1}}}', 400, "lone surrogate"),
        ("/api/v1/votes", "{" + vote + ', "time_spent_s": NaN}', 400, "NaN"),
        ("/api/v1/votes", '{"uid": NaN, "assignment_id": 1, "choice": "A"}', 400, "NaN"),
        ("/api/v1/votes", "{" + vote + ', "time_spent_s": 1e999}', 400, "not finite"),
        ("/api/v1/votes", "{" + vote + ', "time_spent_s": -Infinity}', 400, "Infinity"),
        ("/api/v1/login", '{"username": "\\ud800", "password": "x"}', 400, "lone surrogate"),
        ("/api/v1/login", '{"username": "alice", "password": "\\udc00"}', 400, "lone surrogate"),
    ]  # fmt: skip
    for path, body, status, message in cases:
        r = httpx.post(
            f"{base}{path}", content=body.encode(), headers={**alice, "content-type": "application/json"}
        )
        assert r.status_code == status and message in r.text, (path, body, r.status_code, r.text[:300])
    for body, ctype in [
        (b"\xff\xfe\x00", "text/plain"),
        (b"\xff\xfe\x00", "application/json"),
        (b"\xff", None),
    ]:
        headers = {**alice, **({"content-type": ctype} if ctype else {})}
        r = httpx.post(f"{base}/api/v1/votes", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (body, ctype, r.status_code, r.text[:200])
    assert store.counts() == before


def test_a_vote_id_resent_after_its_undo_is_refused_and_nothing_is_active(site) -> None:
    store, base, _ = site
    bob = api_login(base, "bob")
    task = httpx.get(f"{base}/api/v1/next", headers=bob).json()["task"]
    body = {"uid": "undo-resend-0001", "assignment_id": task["assignment_id"], "choice": "B"}
    assert httpx.post(f"{base}/api/v1/votes", json=body, headers=bob).status_code == 201
    assert httpx.post(f"{base}/api/v1/votes", json=body, headers=bob).json()["duplicate"] is True
    assert httpx.post(f"{base}/api/v1/undo", headers=bob).json()["undone"]["uid"] == "undo-resend-0001"
    again = httpx.post(f"{base}/api/v1/votes", json=body, headers=bob)
    assert again.status_code == 409 and "was undone" in again.json()["detail"], again.text
    active = [v for v in store.votes() if v.annotator == "bob" and v.item_id == task["item_id"]]
    assert active == []  # the undo stands
    fresh = httpx.post(f"{base}/api/v1/votes", json={**body, "uid": "undo-resend-0002"}, headers=bob)
    assert fresh.status_code == 201
    assert [v.uid for v in store.votes() if v.annotator == "bob"] == ["undo-resend-0002"]
    httpx.post(f"{base}/api/v1/undo", headers=bob)


def test_ratings_are_bounded(site) -> None:
    store, base, _ = site
    erin = api_login(base, "erin")
    task = httpx.get(f"{base}/api/v1/next", headers=erin).json()["task"]
    body = {"uid": "ratings-bad-0001", "assignment_id": task["assignment_id"], "choice": "A"}
    for ratings, status in [
        ({"x": {"A": True}}, 422),  # true is not a rating
        ({"x": {"A": "5"}}, 422),
        ({"x": {"A": 5.0}}, 422),
        ({"x": {"A": 6}}, 422),
        ({"x": {"A": 0}}, 422),
        ({f"a{i}": {"A": 1} for i in range(33)}, 422),  # at most 32 attributes
        ({f"attribute{i}": {"A": 1} for i in range(200_000)}, 413),  # the body is over 256 KiB
        ({"x\n": {"A": 1}}, 400),  # attribute names are printable
        ({"x": {"Z": 1}}, 400),  # no answer Z
    ]:
        r = httpx.post(f"{base}/api/v1/votes", json={**body, "ratings": ratings}, headers=erin, timeout=60)
        assert r.status_code == status, (str(ratings)[:80], r.status_code, r.text[:200])
    assert not [v for v in store.votes() if v.annotator == "erin"]
    ok = {**body, "ratings": {f"a{i}": {"A": 5, "B": 1} for i in range(32)}}
    assert httpx.post(f"{base}/api/v1/votes", json=ok, headers=erin).status_code == 201
    httpx.post(f"{base}/api/v1/undo", headers=erin)


def test_bodies_are_refused_before_they_are_read(site) -> None:
    _, base, _ = site
    hundred_mb = 100 * 2**20
    for path, ctype in [("/api/v1/login", "application/json"), ("/login", "application/x-www-form-urlencoded"),
                        ("/api/v1/votes", "application/json"), ("/gradio_api/queue/join", "application/json")]:  # fmt: skip
        t = time.perf_counter()
        status, body = raw(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                                 f"Content-Length: {hundred_mb}\r\n\r\n", [b"{"])  # fmt: skip
        assert status == 413 and "104,857,600 bytes" in body, (path, status, body)
        assert time.perf_counter() - t < 5  # answered without waiting for the 100 MB
    # no length given: read up to the limit, then refused
    head = "POST /api/v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    status, body = raw(base, head, [chunk] * 64)
    assert status == 413 and "over 4,096 bytes" in body, body


def test_responses_forbid_framing(site) -> None:
    _, base, _ = site
    for path in ("/", "/api/v1/health"):
        r = httpx.get(f"{base}{path}")
        assert (
            r.headers["x-frame-options"] == "DENY"
            and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        )
        assert "access-control-allow-origin" not in r.headers
    # Gradio reflected any Origin, with credentials, when the Host was not a loopback name
    for origin in ("http://evil.example", "http://localhost:18999", "null"):
        r = page_session(base, "bob").get("/config", headers={"Origin": origin, "Host": "annotate.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, (origin, r.headers)
    preflight = httpx.options(f"{base}/gradio_api/queue/join", headers={
        "Origin": "http://127.0.0.1:18999", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert preflight.status_code == 403 and "access-control-allow-credentials" not in preflight.headers


def _session_cookie(client: httpx.Client) -> tuple[str, str]:
    (cookie,) = [c for c in client.cookies.jar if c.name.startswith("access-token")]
    return cookie.name, cookie.value


def test_page_sessions_expire_and_end_with_a_new_password_or_sign_out(site) -> None:
    store, base, _ = site
    client = httpx.Client(base_url=base, timeout=30)
    login = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
    set_cookie = ",".join(login.headers.get_list("set-cookie")).lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert f"max-age={int(TTL.total_seconds())}" in set_cookie
    assert client.get("/config").status_code == 200
    name, token = _session_cookie(client)
    digest = hashlib.sha256(token.encode()).hexdigest()
    with store.engine.begin() as c:  # the session row carries the page's lifetime ...
        made, ends = c.execute(
            select(SE.c.created_at, SE.c.expires_at).where(SE.c.token_sha256 == digest)
        ).one()
        assert abs((ends - made) - TTL) < timedelta(seconds=5)
        c.execute(update(SE).where(SE.c.token_sha256 == digest).values(expires_at=SE.c.created_at))
    assert client.get("/config").status_code == 401  # ... and once past it, the session is gone
    join = {"data": [], "fn_index": 0, "session_hash": "s"}
    assert client.post("/gradio_api/queue/join", json=join).status_code == 401

    client = page_session(base, "alice")
    api = api_login(base, "alice")
    assert client.get("/config").status_code == 200
    store.set_password("alice", "alice-new-password")  # e.g. `glmwb annotation set-password alice`
    assert client.get("/config").status_code == 401  # the page session ended ...
    assert httpx.get(f"{base}/api/v1/progress", headers=api).status_code == 401  # ... and the API token
    store.set_password("alice", PASSWORDS["alice"])

    client = page_session(base, "alice")
    name, token = _session_cookie(client)
    assert client.get("/logout").status_code == 302
    assert (
        httpx.get(f"{base}/config", cookies={name: token}).status_code == 401
    )  # revoked, not just forgotten


def test_exports_are_served_to_admins_only(site) -> None:
    store, base, tmp = site
    name = f"preferences-majority-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    path = write_records(export_records(store).rows, tmp / "exports" / name)
    path.write_text(path.read_text() + json.dumps({"marker": SECRET}) + "\n")
    annotator = page_session(base, "bob")
    for url in (f"/gradio_api/file={path.resolve()}", f"/gradio_api/file={path}", f"/file={path.resolve()}"):
        r = annotator.get(url)
        assert r.status_code in (403, 404) and SECRET not in r.text, (url, r.status_code)
    r = annotator.get(f"/admin/exports/{name}")
    assert r.status_code == 403 and SECRET not in r.text
    assert httpx.get(f"{base}/admin/exports/{name}").status_code == 401
    admin = page_session(base, "root")
    r = admin.get(f"/admin/exports/{name}")
    assert r.status_code == 200 and SECRET in r.text and "attachment" in r.headers["content-disposition"]
    assert admin.get("/admin/exports/..%2Fannotation.db").status_code == 404
    assert admin.get("/admin/exports/annotation.db").status_code == 404


def test_uploads_are_refused_even_when_signed_in(site) -> None:
    _, base, tmp = site
    client = page_session(base, "bob")
    r = client.post("/gradio_api/upload", files={"files": ("x.txt", b"x" * 1000)})
    assert r.status_code == 403 and "no uploads" in r.text
    assert client.post("/gradio_api/upload?upload_id=x", files={"files": ("x.txt", b"x")}).status_code == 403


class SlowCountingHasher:
    """cheap argon2id, plus a delay, counting how many verifications run at once."""

    def __init__(self, delay_s: float) -> None:
        self.inner, self.delay_s = cheap_hasher(), delay_s
        self.running = self.peak = self.calls = 0
        self.lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self.inner.hash(password)

    def verify(self, stored: str, password: str) -> bool:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay_s)
            return self.inner.verify(stored, password)
        finally:
            with self.lock:
                self.running -= 1


def test_a_flood_of_wrong_sign_ins_is_bounded_and_locks_out_no_known_client(tmp_path) -> None:
    hasher = SlowCountingHasher(0.1)
    store = Store(f"sqlite:///{tmp_path / 'a.db'}", password_hasher=hasher)
    store.create_annotator("root", "root-password", role="admin")
    store.create_annotator("alice", "alice-password")
    store.add_items(make_items(5))
    gate = LoginGate(max_concurrent=1, max_waiting=8)
    server = ThreadServer(create_app(store, ServerSettings(ui=False, gate=gate)))
    base = server.base_url
    try:
        admin = httpx.Client(base_url=base, timeout=60)  # root signed in from this client before
        assert (
            admin.post("/api/v1/login", json={"username": "root", "password": "root-password"}).status_code
            == 200
        )
        victim = api_login_with(base, "alice", "alice-password")
        codes: list[int] = []
        stop = threading.Event()

        def attacker(i: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    r = c.post("/api/v1/login", json={"username": "root", "password": f"guess-{i}-{n}"})
                    codes.append(r.status_code)

        threads = [threading.Thread(target=attacker, args=(i,)) for i in range(40)]
        calls_before = hasher.calls
        for t in threads:
            t.start()
        latencies = []
        t_end = time.perf_counter() + 4
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            assert httpx.get(f"{base}/api/v1/progress", headers=victim, timeout=60).status_code == 200
            latencies.append(time.perf_counter() - t0)
        for _ in range(3):  # (a 503 only while the queue is full, at the start of the flood)
            during = admin.post("/api/v1/login", json={"username": "root", "password": "root-password"})
            if during.status_code != 503:
                break
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        assert set(codes) <= {401, 429, 503} and codes.count(429) + codes.count(503) > codes.count(401)
        assert hasher.peak == 1  # one password check at a time, however many arrive
        assert hasher.calls - calls_before <= 12  # 5 free tries, then one per back-off period (1, 2 s ...)
        assert statistics.median(latencies) < 0.5, latencies
        assert during.status_code == 200, during.text  # the admin's own client is not locked out
        assert (
            httpx.post(
                f"{base}/api/v1/login", json={"username": "root", "password": "root-password"}
            ).status_code
            == 429
        )
        assert gate.entries() <= 3
    finally:
        server.stop()
        store.close()


def api_login_with(base: str, username: str, password: str) -> dict[str, str]:
    r = httpx.post(f"{base}/api/v1/login", json={"username": username, "password": password})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


# --------------------------------------------------------------------------------------------------------
# In a real browser: another page on another 127.0.0.1 port tries to act as the signed-in admin.


ATTACK = """<!doctype html><html><body><form id="f" method="POST" target="sink"></form>
<iframe name="sink"></iframe><iframe id="framed"></iframe><script>
const APP = "%(app)s", results = {};
async function attempt(name, f) {
  try { const r = await f(); results[name] = r.type === "opaque" ? "opaque" : r.status + " " + (await r.text()).slice(0, 300); }
  catch (e) { results[name] = "blocked: " + e; }
}
(async () => {
  const join = (data, fn, session) => JSON.stringify({data: data, fn_index: fn, session_hash: session,
                                                      trigger_id: %(trigger)s, event_data: null});
  new EventSource(APP + "/gradio_api/queue/data?session_hash=attack1", {withCredentials: true});
  await attempt("config", () => fetch(APP + "/config", {credentials: "include"}));
  await attempt("join_cors", () => fetch(APP + "/gradio_api/queue/join", {method: "POST", credentials: "include",
      headers: {"Content-Type": "application/json"}, body: join(%(create)s, %(fn)d, "attack1")}));
  await attempt("join_simple", () => fetch(APP + "/gradio_api/queue/join", {method: "POST", credentials: "include",
      mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: join(%(create2)s, %(fn)d, "attack2")}));
  await attempt("vote_api", () => fetch(APP + "/api/v1/votes", {method: "POST", credentials: "include",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({uid: "csrf-vote-001", assignment_id: 1, choice: "A"})}));
  await attempt("upload", () => fetch(APP + "/gradio_api/upload", {method: "POST", credentials: "include",
      mode: "no-cors", body: new FormData()}));
  const f = document.getElementById("f");  // a plain form post: no CORS at all
  f.action = APP + "/login";
  for (const [k, v] of [["username", "mallory"], ["password", "mallory-password"]]) {
    const i = document.createElement("input"); i.name = k; i.value = v; f.appendChild(i);
  }
  f.submit();
  document.getElementById("framed").src = APP + "/";
  await new Promise(r => setTimeout(r, 4000));  // give the queue time to run what it accepted
  try { results.framed = document.getElementById("framed").contentDocument ? "readable" : "not readable"; }
  catch (e) { results.framed = "not readable"; }
  window.done = true;
})();
</script></body></html>"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _dependency_of(config: dict, elem_id: str) -> tuple[int, int]:
    """(fn_index, trigger id) of the click handler of the component with ``elem_id``."""
    (component,) = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    for i, d in enumerate(config["dependencies"]):
        if any(t[0] == component for t in d["targets"]):
            return d.get("id", i), component
    raise AssertionError(f"no handler for #{elem_id}")


@pytest.mark.browser
def test_a_page_on_another_port_cannot_act_as_the_signed_in_admin(site, browser, tmp_path) -> None:
    store, base, _ = site
    config = page_session(base, "root").get("/config").json()
    fn, trigger = _dependency_of(config, "admin-create")
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / "attack.html").write_text(ATTACK % {
        "app": base, "fn": fn, "trigger": trigger,
        "create": json.dumps(["mallory", "mallory-password", "admin"]),
        "create2": json.dumps(["mallory2", "mallory-password", "admin"]),
    })  # fmt: skip
    evil_port = free_port()
    handler = lambda *a, **kw: _Quiet(*a, directory=str(evil_dir), **kw)  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", evil_port), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(base)  # the admin signs in, as usual
        page.locator("input[type=password]").wait_for(timeout=30_000)
        page.locator("input[type=text]").first.fill("root")
        page.locator("input[type=password]").fill(PASSWORDS["root"])
        page.keyboard.press("Enter")
        page.locator("#answer-A").wait_for(timeout=30_000)
        # the spoofing answer shows its control characters, in the stored order
        deadline, shown = time.monotonic() + 20, ""
        while "U+202E" not in shown and time.monotonic() < deadline:
            shown = page.locator("#answer-A").inner_text() + page.locator("#answer-B").inner_text()
            time.sleep(0.1)
        assert "\u202e" not in shown and "⟦U+202E RLO⟧21⟦U+202C PDF⟧" in shown
        accounts, counts = store.annotators(), store.counts()
        with store.engine.begin() as c:
            sessions = c.execute(text("SELECT count(*) FROM sessions")).scalar_one()

        attacker = context.new_page()  # same browser, same cookies: 127.0.0.1's cookies ignore the port
        attacker.goto(f"http://127.0.0.1:{evil_port}/attack.html")
        attacker.wait_for_function("window.done === true", timeout=30_000)
        results = attacker.evaluate("results")
        time.sleep(1)
        assert store.annotators() == accounts, results  # no account made, by any route
        assert store.counts() == counts and store.annotator("mallory") is None
        with store.engine.begin() as c:
            assert c.execute(text("SELECT count(*) FROM sessions")).scalar_one() == sessions  # no login CSRF
        assert SECRET not in json.dumps(results)  # nothing of the admin's page was read
        for name in ("config", "join_cors", "vote_api"):
            assert results[name].startswith("blocked") or results[name].startswith("403"), results
        assert results["framed"] == "not readable"
        # the admin's own page still works: the same action from the real page goes through
        page.get_by_role("tab", name="Admin").click()
        page.get_by_text("New account").click()
        page.get_by_label("username").fill("frank")
        page.get_by_label("password (8+ characters)").fill("frank-password")
        page.locator("#admin-create").click()
        deadline = time.monotonic() + 20
        while store.annotator("frank") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.annotator("frank") is not None
        context.close()
    finally:
        evil.shutdown()
        evil.server_close()


@pytest.mark.browser
def test_the_admin_downloads_an_export_through_the_link(site, browser, tmp_path) -> None:
    _, base, tmp = site
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(base)
    page.locator("input[type=password]").wait_for(timeout=30_000)
    page.locator("input[type=text]").first.fill("root")
    page.locator("input[type=password]").fill(PASSWORDS["root"])
    page.keyboard.press("Enter")
    page.locator("#answer-A").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Admin").click()
    page.locator("#admin-export").click()
    link = page.locator("#admin-export-status a")
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    name = download.value.suggested_filename
    assert re.fullmatch(r"preferences-majority-\d{8}-\d{6}(-\d+)?\.jsonl", name)
    assert Path(download.value.path()).read_bytes() == (tmp / "exports" / name).read_bytes()
    context.close()
