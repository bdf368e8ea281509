"""The request guards every server shares (annotation/guard.py), without a server: which browser requests
count as another page's, what a JSON body may not hold, how body limits are read, how sign-in failures back
off (with a fake clock), that the table of failures stays bounded, that password checks run at most
``max_concurrent`` at a time, and that the renderer shows bidirectional controls instead of obeying them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glmwb.annotation.guard import GateBusy, GuardPolicy, LoginGate, Refused, check_json, same_origin_verdict
from glmwb.ui.render import render_conversation, render_markdown

APP = "127.0.0.1:7860"


def verdict(method: str = "POST", policy: GuardPolicy | None = None, **headers: str) -> str | None:
    h = {"host": APP, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return same_origin_verdict(method, h, "http", policy or GuardPolicy())


@pytest.mark.parametrize(
    ("method", "headers", "refused"),
    [
        ("POST", {}, False),  # a program (curl, httpx): no browser headers, no browser cookies
        ("POST", {"origin": "http://127.0.0.1:7860"}, False),  # the page itself
        ("POST", {"origin": "http://127.0.0.1:7860", "sec_fetch_site": "same-origin"}, False),
        ("POST", {"origin": "http://127.0.0.1:18999"}, True),  # another port of the same host
        ("POST", {"origin": "http://localhost:7860"}, True),  # another name is another origin
        ("POST", {"origin": "https://127.0.0.1"}, True),  # port 443, not this one
        ("POST", {"origin": "http://evil.example"}, True),
        ("POST", {"origin": "null"}, True),  # a sandboxed frame or a file:// page
        ("GET", {"origin": "http://127.0.0.1:18999"}, True),  # a cross-origin fetch that would read
        ("OPTIONS", {"origin": "http://127.0.0.1:18999", "access_control_request_method": "POST"}, True),
        ("GET", {"sec_fetch_site": "same-site", "sec_fetch_mode": "cors"}, True),
        ("GET", {"sec_fetch_site": "cross-site", "sec_fetch_mode": "no-cors", "sec_fetch_dest": "script"}, True),
        ("GET", {"sec_fetch_site": "cross-site", "sec_fetch_mode": "navigate", "sec_fetch_dest": "iframe"}, True),
        ("GET", {"sec_fetch_site": "cross-site", "sec_fetch_mode": "navigate", "sec_fetch_dest": "document"}, False),
        ("POST", {"sec_fetch_site": "same-site", "sec_fetch_mode": "navigate"}, True),  # a form post
        ("GET", {"sec_fetch_site": "same-origin", "sec_fetch_mode": "cors"}, False),
        ("GET", {"sec_fetch_site": "none", "sec_fetch_mode": "navigate"}, False),  # typed into the address bar
        ("POST", {"referer": "http://127.0.0.1:18999/attack.html"}, True),  # an old browser: Referer only
        ("POST", {"referer": "http://127.0.0.1:7860/"}, False),
    ],
)  # fmt: skip
def test_requests_from_other_pages_are_refused_with_a_reason(method, headers, refused) -> None:
    reason = verdict(method, **headers)
    assert (reason is not None) == refused, reason
    if refused:
        assert "Origin" in reason or "Sec-Fetch-Site" in reason or "Referer" in reason


def test_trusted_origins_and_hosts() -> None:
    proxy = GuardPolicy(trusted_origins=("https://annotate.example",))
    assert verdict(policy=proxy, origin="https://annotate.example") is None
    assert verdict(policy=proxy, origin="https://annotate.example:443") is None  # the default port, explicit
    assert verdict(policy=proxy, origin="http://annotate.example") is not None
    loop = GuardPolicy(trusted_hosts=("127.0.0.1", "localhost"))
    assert verdict(policy=loop) is None
    h = {"host": "rebound.example:7860", "origin": "http://rebound.example:7860"}  # DNS rebinding
    assert "Host" in same_origin_verdict("POST", h, "http", loop)
    assert (
        same_origin_verdict(
            "POST", {"host": "[::1]:7860", "origin": "http://[::1]:7860"}, "http", GuardPolicy()
        )
        is None
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"time_spent_s": NaN}', "NaN"),
        (b'{"x": [1, Infinity]}', "Infinity"),
        (b'{"x": -Infinity}', "-Infinity"),
        (b'{"x": 1e400}', "not finite"),
        (b'{"rationale": "\\ud800"}', "lone surrogate (U+D800)"),
        (b'{"ratings": {"\\udfff": {"A": 1}}}', "a key in $.ratings holds a lone surrogate"),
        (b'{"a": "\\udc00\\ud800"}', "lone surrogate"),  # reversed pair: two lone halves
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{nope", "not valid JSON"),
        (b'{"id": ' + b"9" * 5000 + b"}", "not valid JSON"),  # more digits than Python converts
        (b"[" * 100 + b"]" * 100, "nests deeper than 32"),
        (b"[" * 100_000 + b"]" * 100_000, "nests"),
    ],
)
def test_json_bodies_that_would_crash_a_route_are_refused_by_name(body, message) -> None:
    with pytest.raises(Refused) as e:
        check_json(body)
    assert e.value.status == 400 and message in e.value.reason


def test_clean_json_passes() -> None:
    check_json('{"rationale": "7 + 5 = 12 \U0001f600 你好", "n": [1, 2.5, -3e10, null, true]}'.encode())
    check_json(b'"\\ud83d\\ude00"')  # an escaped surrogate *pair* is one character


def test_body_limits_take_the_longest_prefix() -> None:
    p = GuardPolicy(max_body=100, body_limits=(("/api/", 50), ("/api/v1/login", 10)))
    assert [p.body_limit(x) for x in ("/x", "/api/v1/votes", "/api/v1/login", "/api/v1/login/")] == [
        100,
        50,
        10,
        10,
    ]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_failures_back_off_per_user_and_client_not_globally() -> None:
    clock = Clock()
    gate = LoginGate(free_per_user_client=3, free_per_client=6, free_per_user=9, base_delay_s=1, max_delay_s=8,
                     forget_after_s=100, clock=clock)  # fmt: skip
    for _ in range(3):
        assert gate.wait_s("root", "10.0.0.9") == 0
        gate.failed("root", "10.0.0.9")
    assert gate.wait_s("root", "10.0.0.9") == 1  # the 3rd failure: wait 1 s, then 2, 4, 8, 8 ...
    assert gate.wait_s("root", "10.0.0.1") == 0  # the admin elsewhere is not locked out
    assert gate.wait_s("alice", "10.0.0.9") == 0
    clock.t += 1
    gate.failed("root", "10.0.0.9")
    assert gate.wait_s("root", "10.0.0.9") == 2
    for _ in range(10):
        clock.t += 10
        gate.failed("root", "10.0.0.9")
    assert gate.wait_s("root", "10.0.0.9") == 8  # capped at max_delay_s
    assert gate.wait_s("root", "10.0.0.1") == 8  # 14 failures of one name: the name backs off everywhere
    assert gate.wait_s("alice", "10.0.0.9") == 8  # ... and so does the address that tried it
    assert gate.wait_s("alice", "10.0.0.2") == 0
    clock.t += 200  # forgotten after forget_after_s
    assert gate.wait_s("root", "10.0.0.9") == 0 and gate.entries() == 0


def test_a_known_device_is_not_locked_out_by_someone_else_on_the_same_address() -> None:
    clock = Clock()
    gate = LoginGate(free_per_user_client=2, free_per_client=2, free_per_user=2, max_delay_s=60, clock=clock)
    cookie = gate.device_cookie("root")  # root signed in from this browser before
    for _ in range(10):
        gate.failed("root", "127.0.0.1")  # an attacker on the same loopback address
    assert gate.wait_s("root", "127.0.0.1") == 60
    device = gate.known_device(cookie, "root")
    assert device is not None and gate.wait_s("root", "127.0.0.1", device) == 0
    assert gate.known_device(cookie, "alice") is None  # issued for root only
    assert gate.known_device(cookie[:-1] + ("0" if cookie[-1] != "0" else "1"), "root") is None  # forged
    assert LoginGate().known_device(cookie, "root") is None  # another server's secret
    for _ in range(3):
        gate.failed("root", "127.0.0.1", device)  # wrong passwords from the device itself still back off
    assert gate.wait_s("root", "127.0.0.1", device) > 0


def test_the_failure_table_stays_bounded() -> None:
    gate = LoginGate(max_entries=1000)
    for i in range(20_000):
        gate.failed(f"user{i}", f"10.0.{i % 250}.{i % 7}")
    assert gate.entries() == 1000


def test_password_checks_run_at_most_max_concurrent_at_once_and_the_queue_is_bounded() -> None:
    gate = LoginGate(max_concurrent=2, max_waiting=10)
    release = threading.Event()

    def slow_check(i: int) -> int:
        release.wait(10)
        return i

    async def flood() -> list:
        tasks = [asyncio.ensure_future(gate.check(slow_check, i)) for i in range(40)]
        await asyncio.sleep(0.3)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    t = time.perf_counter()
    out: list = []  # asyncio.run in a thread of its own: the browser tests' Playwright holds this thread's loop
    runner = threading.Thread(target=lambda: out.append(asyncio.run(flood())))
    runner.start()
    runner.join(30)
    (results,) = out
    done = [r for r in results if isinstance(r, int)]
    busy = [r for r in results if isinstance(r, GateBusy)]
    assert len(done) == 12 and len(busy) == 28  # 2 running + 10 waiting; the rest answered at once
    assert gate.peak_running == 2 and time.perf_counter() - t < 5


def test_bidirectional_controls_are_shown_not_obeyed() -> None:
    spoof = "7 + 5 = \u202e21\u202c"  # displays as "7 + 5 = 12"
    html = render_markdown(spoof)
    assert "\u202e" not in html and "\u202c" not in html
    assert "7 + 5 = ⟦U+202E RLO⟧21⟦U+202C PDF⟧" in html
    for c in "\u061c\u200e\u200f\u202a\u202b\u202d\u2066\u2067\u2068\u2069":
        assert c not in render_markdown(f"a{c}b") and f"U+{ord(c):04X}" in render_markdown(f"a{c}b")
    convo = render_conversation([{"role": "user", "content": "x \u2067y\u2069"}])
    assert "\u2067" not in convo and "⟦U+2067 RLI⟧" in convo
    assert (
        render_markdown("שלום عربي 你好") == "<p>שלום عربي 你好</p>\n"
    )  # right-to-left text itself is left alone
