"""Request guards shared by every HTTP server of the workbench: the annotation server (JSON API and the
annotator page, ``glmwb annotate``) and the reward scoring API (``glmwb serve-rewards``). Plain ASGI and
the standard library only (no Gradio, no store), so each server wraps itself in the same checks:

``RequestGuard`` (ASGI middleware, ``GuardPolicy``), before a request reaches a route:

- **Same origin.** A browser request that another page made is refused with 403 and the reason: an
  ``Origin`` that is not this server's own (scheme-less host:port compared with ``Host``, plus
  ``GuardPolicy.trusted_origins``), ``Origin: null``, ``Sec-Fetch-Site: same-site / cross-site`` (another
  port of the same host is *same-site*: cookies go along, so it must be refused too) unless it is a top-level
  navigation (``Sec-Fetch-Mode: navigate``, ``Sec-Fetch-Dest: document``, GET: following a link to the
  page), and, when a state-changing request carries neither header, a ``Referer`` from another origin.
  Programs (curl, httpx, the load tests) send none of these headers and pass; they have no browser's
  cookies to ride on. ``GuardPolicy.trusted_hosts`` (when set) also refuses any other ``Host`` (DNS
  rebinding).
- **Bounded bodies.** ``Content-Length`` over the route's limit is refused with 413 before a byte is
  read; a body without a length is read up to the limit and refused as soon as it passes it. Limits are per
  path prefix (``GuardPolicy.body_limits``), else ``max_body``.
- **Clean JSON.** A JSON body (``application/json``, ``*+json``, or no content type) must be UTF-8, must not
  hold ``NaN`` / ``Infinity`` or a number that overflows to them, lone surrogates (``"\\ud800"``) in any
  key or string, or nesting deeper than ``max_json_depth``: each is a 400 naming what and where
  (``$.ratings.x``), so that no route ever sees a value it would crash on.
- **Refused paths** (``GuardPolicy.refused``): e.g. the annotator page takes no uploads.
- Every response gets ``X-Frame-Options: DENY``, ``Content-Security-Policy: frame-ancestors 'none'``,
  ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: same-origin`` (no clickjacking in a frame).

``LoginGate``: password checks (argon2id, ~64 MiB each) run at most ``max_concurrent`` at a time on a pool of
their own, with at most ``max_waiting`` queued (more: 503 at once), so a flood of sign-ins cannot take the
CPU, the memory or the request threads from everyone else. Failures back off exponentially per
(username, client), per client and per username, each after its own number of free tries, up to
``max_delay_s``; the table of failures is bounded (least recently failed forgotten first) and forgets a key
``forget_after_s`` after its last failure.

``install_error_handlers(app)``: FastAPI's 422 lists each bad field's location, message and type, never the
input (which could be huge, or not encodable).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_SURROGATE = re.compile("[\ud800-\udfff]")
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


@dataclass(frozen=True)
class GuardPolicy:
    """What ``RequestGuard`` lets through (see the module docstring)."""

    max_body: int = 256 * 1024  # bytes, where no prefix in body_limits matches
    body_limits: tuple[tuple[str, int], ...] = ()  # (path prefix, bytes); the longest matching prefix wins
    trusted_origins: tuple[str, ...] = ()  # origins besides the server's own, e.g. "https://annotate.example"
    trusted_hosts: tuple[str, ...] = ()  # host names (no port) the server answers to; empty: any
    refused: tuple[tuple[str, str], ...] = ()  # (path prefix, reason): always 403
    max_json_depth: int = 32

    def body_limit(self, path: str) -> int:
        best, limit = -1, self.max_body
        for prefix, n in self.body_limits:
            if path.startswith(prefix) and len(prefix) > best:
                best, limit = len(prefix), n
        return limit


def loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


class Refused(Exception):
    """A request the guard refuses: ``status`` and a reason the client is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _netloc(url: str) -> tuple[str, str] | None:
    """(scheme, host:port with the default port made explicit) of an origin or URL; None if unparsable."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return parts.scheme.lower(), f"{host}:{port or _DEFAULT_PORTS.get(parts.scheme.lower(), '')}"


def _host_netloc(host_header: str, scheme: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        name, _, rest = host.partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return f"{name}]:{port or _DEFAULT_PORTS.get(scheme, '')}"
    name, _, port = host.partition(":")
    return f"{name}:{port or _DEFAULT_PORTS.get(scheme, '')}"


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def same_origin_verdict(method: str, headers: dict[str, str], scheme: str, policy: GuardPolicy) -> str | None:
    """Why a request must be refused as coming from another page (or another host name), or None."""
    host = headers.get("host", "")
    if policy.trusted_hosts and _host_name(host) not in policy.trusted_hosts:
        return f"Host {host!r} is not a name this server answers to ({', '.join(policy.trusted_hosts)})"
    own = _host_netloc(host, "https" if scheme in ("https", "wss") else "http")
    trusted = {_netloc(o) for o in policy.trusted_origins} - {None}

    def ours(url: str) -> bool:
        loc = _netloc(url)
        return loc is not None and (loc[1] == own or loc in trusted)

    origin = headers.get("origin")
    if origin is not None:
        if origin.strip() == "null":
            return "Origin null (a sandboxed frame or a local file) may not act on this server"
        if not ours(origin):
            return f"cross-origin request: Origin {origin} is not this server ({host})"
        return None
    site = headers.get("sec-fetch-site")
    if site in ("same-site", "cross-site"):
        navigation = (
            method == "GET"
            and headers.get("sec-fetch-mode") == "navigate"
            and headers.get("sec-fetch-dest", "document") == "document"
        )
        if not navigation:
            return f"cross-origin request (Sec-Fetch-Site: {site}) from another page"
        return None
    if method not in SAFE_METHODS and site is None:
        referer = headers.get("referer")
        if referer and not ours(referer):
            return f"cross-origin request: Referer {referer[:200]} is not this server ({host})"
    return None


def check_json(body: bytes, max_depth: int = 32) -> None:
    """Refuse (``Refused``, 400) a JSON body that is not UTF-8, not JSON, holds NaN / Infinity or a number
    that overflows to them, a lone surrogate, or nests deeper than ``max_depth``."""

    def constant(name: str) -> Any:
        raise Refused(400, f"the JSON body holds {name}; JSON numbers are finite")

    def number(text: str) -> float:
        x = float(text)
        if not math.isfinite(x):
            raise Refused(400, f"the JSON body holds the number {text[:40]}, which is not finite as a float")
        return x

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(400, f"the body is not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except Refused:
        raise
    except RecursionError:
        raise Refused(400, "the JSON body nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise Refused(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    stack: list[tuple[Any, str, int]] = [(value, "$", 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > max_depth:
            raise Refused(400, f"the JSON body nests deeper than {max_depth} levels (at {where[:200]})")
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                raise Refused(
                    400,
                    f"the text at {where[:200]} holds a lone surrogate (U+{ord(m.group()):04X}), not Unicode",
                )
        elif isinstance(v, dict):
            for k, x in v.items():
                m = _SURROGATE.search(k)
                if m:
                    raise Refused(
                        400,
                        f"a key in {where[:200]} holds a lone surrogate (U+{ord(m.group()):04X}), not Unicode",
                    )
                stack.append((x, f"{where}.{k[:64]}", depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v))


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # FastAPI parses a body without a content type as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _respond(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"detail": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: same-origin, body-size, JSON and refused-path checks, security headers."""

    def __init__(self, app: Any, policy: GuardPolicy | None = None) -> None:
        self.app = app
        self.policy = policy or GuardPolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        path = scope.get("path", "")
        reason = same_origin_verdict(method, headers, scope.get("scheme", "http"), self.policy)
        if reason is not None:
            await self._refuse(scope, send, 403, reason)
            return
        for prefix, why in self.policy.refused:
            if path.startswith(prefix):
                await self._refuse(scope, send, 403, why)
                return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._body(scope, headers, method, path, receive)
        except Refused as e:
            await _respond(send, e.status, e.reason)
            return
        await self.app(scope, receive, self._with_headers(send))

    async def _refuse(self, scope: Scope, send: Send, status: int, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        else:
            await _respond(send, status, reason)

    async def _body(self, scope: Scope, headers: dict[str, str], method: str, path: str, receive: Receive):
        """Read the body (bounded) and check it; returns a ``receive`` that replays it."""
        limit = self.policy.body_limit(path)
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise Refused(400, f"Content-Length {length[:40]!r} is not a number")
            if int(length) > limit:
                raise Refused(413, f"the request body has {int(length):,} bytes; at most {limit:,} here")
        elif method in SAFE_METHODS and "transfer-encoding" not in headers:
            return receive  # no body
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the request body is over {limit:,} bytes, the most allowed here")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers.get("content-type")):
            check_json(body, self.policy.max_json_depth)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return wrapped


# -----------------------------------------------------------------------------------------------------------
# Sign-in: bounded password checks, back-off per (user, client), client and user.
# -----------------------------------------------------------------------------------------------------------


class GateBusy(Exception):
    """Too many password checks are queued; the caller answers 503 with Retry-After."""


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


@dataclass
class LoginGate:
    """Password checks bounded in number, failures backed off in time (see the module docstring).

    Per key, the first ``free`` failures cost nothing; after the n-th failure beyond them the next try of
    that key waits ``base_delay_s * 2 ** n`` (at most ``max_delay_s``). Keys: (username, client) with
    ``free_per_user_client``; client alone with ``free_per_client`` (one address trying many names);
    username alone with ``free_per_user`` (many addresses trying one name).

    Known devices: a successful sign-in gets ``device_cookie(username)`` (an HMAC under a secret of this
    process); a later attempt for that username that presents it counts on (username, device) alone, so
    wrong passwords from elsewhere (the same loopback address included) cannot lock out someone who
    signed in from this browser or client before.

    An attempt refused for backing off is answered after ``pause_s`` (or its wait, if shorter): a client
    that waits for each answer, as browsers and scripts do, then cannot make the server answer refusals as
    fast as it can ask."""

    max_concurrent: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 4))
    max_waiting: int = 64  # waiting holds no thread and no memory to speak of
    free_per_user_client: int = 5
    free_per_client: int = 20
    free_per_user: int = 50
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    forget_after_s: float = 900.0
    max_entries: int = 10_000
    pause_s: float = 1.0  # a refused attempt is answered after this pause (at most its wait): no hammering
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._failures: OrderedDict[tuple[str, ...], _Failures] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="password-check")
        self._queued = 0  # checks submitted and not finished (running or waiting)
        self.peak_running = 0  # the most checks that ever ran at once (tests read it)
        self._running = 0
        self._secret = os.urandom(32)

    def device_cookie(self, username: str) -> str:
        """A value that marks its holder as a device that signed in as ``username`` before."""
        nonce = secrets.token_urlsafe(12)
        return f"{nonce}.{self._mac(username, nonce)}"

    def known_device(self, cookie: str | None, username: str) -> str | None:
        """The device id in ``cookie`` when it was issued for ``username`` by this gate, else None."""
        nonce, _, mac = (cookie or "").partition(".")
        if not nonce or len(cookie or "") > 100 or not hmac.compare_digest(mac, self._mac(username, nonce)):
            return None
        return nonce

    def _mac(self, username: str, nonce: str) -> str:
        message = f"{username}\0{nonce}".encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def _keys(
        self, username: str, client: str, device: str | None = None
    ) -> list[tuple[tuple[str, ...], int]]:
        if device is not None:
            return [(("user+device", username, device), self.free_per_user_client)]
        return [
            (("user+client", username, client), self.free_per_user_client),
            (("client", client), self.free_per_client),
            (("user", username), self.free_per_user),
        ]

    def _delay(self, entry: _Failures, free: int) -> float:
        over = entry.count - free
        if over < 0:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2.0**over)

    def wait_s(self, username: str, client: str, device: str | None = None) -> float:
        """Seconds until a sign-in of ``username`` from ``client`` (or a known ``device``) may be checked."""
        now = self.clock()
        with self._lock:
            wait = 0.0
            for key, free in self._keys(username, client, device):
                entry = self._failures.get(key)
                if entry is None:
                    continue
                if now - entry.last > self.forget_after_s:
                    del self._failures[key]
                    continue
                wait = max(wait, entry.last + self._delay(entry, free) - now)
            return max(0.0, wait)

    def failed(self, username: str, client: str, device: str | None = None) -> None:
        now = self.clock()
        with self._lock:
            for key, _ in self._keys(username, client, device):
                entry = self._failures.pop(key, None) or _Failures()
                if now - entry.last > self.forget_after_s:
                    entry.count = 0
                entry.count += 1
                entry.last = now
                self._failures[key] = entry  # most recent last
            while len(self._failures) > self.max_entries:
                self._failures.popitem(last=False)

    def succeeded(self, username: str, client: str, device: str | None = None) -> None:
        """A right password clears the failures of its (username, client), or of its (username, device) only
        when it came from a known device; never the client's or the user's (an attacker's own account must not
        reset them)."""
        with self._lock:
            for key, _ in self._keys(username, client, device)[:1]:
                self._failures.pop(key, None)

    def entries(self) -> int:
        with self._lock:
            return len(self._failures)

    async def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the password-check pool (the event loop and the request threads stay free);
        ``GateBusy`` when ``max_waiting`` checks wait already."""
        with self._lock:
            if self._queued >= self.max_concurrent + self.max_waiting:
                raise GateBusy
            self._queued += 1

        def run() -> Any:
            with self._lock:
                self._running += 1
                self.peak_running = max(self.peak_running, self._running)
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._running -= 1
                    self._queued -= 1

        try:
            future = self._pool.submit(run)
        except BaseException:
            with self._lock:
                self._queued -= 1
            raise
        return await asyncio.wrap_future(future)


def install_error_handlers(app: Any) -> None:
    """FastAPI's validation errors without the input echoed back (see the module docstring)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": [
                    x if isinstance(x, int) else _SURROGATE.sub("\ufffd", str(x)[:100])
                    for x in e.get("loc", ())
                ],
                "msg": _SURROGATE.sub("\ufffd", str(e.get("msg", "")))[:500],
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()[:50]
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    app.add_exception_handler(RequestValidationError, invalid)


def client_address(scope_or_request: Any) -> str:
    """The peer's address (a ``Request`` or an ASGI scope); "?" when unknown."""
    client = getattr(scope_or_request, "client", None)
    if client is None and isinstance(scope_or_request, dict):
        client = scope_or_request.get("client")
    if not client:
        return "?"
    host = client[0] if isinstance(client, (tuple, list)) else getattr(client, "host", None)
    return str(host or "?")


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
