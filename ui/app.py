"""The annotation server: the store's JSON API (annotation/server.py) with the Gradio annotator page
(ui/annotator.py) mounted at ``/``, behind a sign-in checked against the store.

    glmwb annotate --db sqlite:///runs/annotation.db --host 127.0.0.1 --port 7860

Binds to 127.0.0.1 unless told otherwise. What protects the page (``docs/annotation.md``, "Protections"):

- ``annotation.guard.RequestGuard`` in front of everything: requests another web page made are refused (403,
  with the reason), bodies are bounded (4 KiB for sign-in, 256 KiB otherwise), JSON bodies must be clean,
  uploads are refused (the page has none), and no page may frame this one.
- Sign-in is this server's ``POST /login`` (Gradio's login form posts there): through the same
  ``LoginGate`` as the API's sign-in (bounded password checks, back-off per user and client). A session is
  a row of the store's ``sessions`` table (only its SHA-256 is stored) that expires after
  ``ServerSettings.session_ttl`` and ends at sign-out, when the password changes or the account is disabled;
  the browser holds it in an HttpOnly, SameSite=Strict cookie. Gradio reads it through ``StoreTokens``.
- ``PageSessionGate``: every Gradio route needs that session except the sign-in page's shell and static
  files, so routes Gradio leaves open (``/gradio_api/reset``, ``/cancel``, streams, ...) answer 401 too.
- Exports are written outside Gradio's allowed paths (and in its blocked paths) and served only to admins
  by ``GET /admin/exports/NAME``.

``mount_page`` puts any Gradio page of the workbench (this one, the arena of ``ui/arena.py``) behind all of
this, so a protection added there holds for both.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from glmwb.annotation.guard import GuardPolicy, LoginGate, loopback
from glmwb.annotation.server import LOGIN_BODY_LIMIT, create_api_app, sign_in
from glmwb.annotation.store import SESSION_TTL, AnnotatorInfo, Store
from glmwb.ui.annotator import EXPORT_NAME, PageConfig

# What a browser without a session may fetch: the sign-in page's shell and its static files.
PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/theme.css", "/favicon.ico", "/robots.txt",
                          "/manifest.json", "/gradio_api/theme.css"})  # fmt: skip
PUBLIC_PREFIXES = ("/static/", "/assets/", "/svelte/")
OWN_PREFIXES = ("/api/v1/", "/admin/exports/")  # routes of this server that check sign-in themselves


@dataclass
class ServerSettings:
    ui: bool = True  # mount the Gradio page at /
    page: PageConfig | None = None  # None: defaults
    gate: LoginGate = field(default_factory=LoginGate)
    session_ttl: timedelta = SESSION_TTL  # a page session's life (the API's tokens have the store's default)
    trusted_origins: tuple[str, ...] = ()  # where the page is served from besides its own address (a proxy)
    trusted_hosts: tuple[str, ...] = ()  # Host names to answer to; empty: any (serve() sets loopback names)


def page_policy(settings: ServerSettings) -> GuardPolicy:
    return GuardPolicy(
        body_limits=(("/api/v1/login", LOGIN_BODY_LIMIT), ("/login", LOGIN_BODY_LIMIT)),
        refused=(("/gradio_api/upload", "the annotator page takes no uploads"),),
        trusted_origins=settings.trusted_origins,
        trusted_hosts=settings.trusted_hosts,
    )


class StoreTokens:
    """What Gradio keeps in ``App.tokens`` (session token -> username), read from the store's sessions: an
    expired or revoked session (sign-out, new password, disabled account) is no session at all. Sessions
    are made only by this server's ``/login``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def lookup(self, token: Any) -> AnnotatorInfo | None:
        if not isinstance(token, str) or not token:
            return None
        who = self.store.annotator_for_token(token)
        return None if who is None or who.role == "external" else who

    def get(self, token: Any, default: Any = None) -> Any:
        who = self.lookup(token)
        return default if who is None else who.username

    def __getitem__(self, token: Any) -> str:
        who = self.lookup(token)
        if who is None:
            raise KeyError("no such session")
        return who.username

    def __contains__(self, token: Any) -> bool:
        return self.lookup(token) is not None

    def __setitem__(self, token: str, username: str) -> None:
        raise RuntimeError("page sessions are made by the server's POST /login, not by Gradio")

    def __delitem__(self, token: str) -> None:
        self.store.revoke_session(token)

    def keys(self) -> list[str]:
        return []  # the store keeps digests only


class PageSessionGate:
    """ASGI middleware: every path of the mounted page needs a live session (``PUBLIC_PATHS`` and
    ``PUBLIC_PREFIXES`` aside, GET / HEAD only; ``/login`` is POST), else 401."""

    def __init__(self, app: Any, tokens: StoreTokens, cookie_names: tuple[str, ...]) -> None:
        self.app, self.tokens, self.cookie_names = app, tokens, cookie_names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._public(scope) or self._signed_in(scope):
            await self.app(scope, receive, send)
            return
        await JSONResponse({"detail": "sign in first"}, status_code=401)(scope, receive, send)

    @staticmethod
    def _public(scope: dict) -> bool:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path.startswith(OWN_PREFIXES):
            return True
        if path in ("/login", "/login/"):
            return method == "POST"
        return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))

    def _signed_in(self, scope: dict) -> bool:
        token = session_cookie(scope, self.cookie_names)
        return token is not None and self.tokens.lookup(token) is not None


def session_cookie(scope_or_request: Any, names: tuple[str, ...]) -> str | None:
    """The session token from the request's cookies (the first of ``names`` present)."""
    if isinstance(scope_or_request, dict):
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope_or_request).cookies
    else:
        cookies = scope_or_request.cookies
    for name in names:
        if cookies.get(name):
            return cookies[name]
    return None


def _page_routes(
    app: FastAPI, store: Store, settings: ServerSettings, config: PageConfig, names: tuple[str, ...]
) -> None:
    """Sign-in, sign-out and the admins' export downloads, on the parent app (before the page is mounted,
    so that they answer instead of Gradio's own ``/login`` and ``/logout``). ``names``: the cookie names
    Gradio reads a session from, in its order; the last is the one set here."""
    cookie = names[-1]
    ttl_s = int(settings.session_ttl.total_seconds())

    async def login(request: Request) -> JSONResponse:
        form = await request.form()  # at most LOGIN_BODY_LIMIT bytes: RequestGuard refused anything longer
        username, password = form.get("username"), form.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            return JSONResponse({"detail": "give a username and a password"}, status_code=400)
        response = JSONResponse({"success": True})
        try:
            who = await sign_in(store, settings.gate, username.strip(), password, request, response)
        except HTTPException as e:  # Gradio's sign-in form shows "incorrect credentials" for a 400 only
            return JSONResponse({"detail": e.detail}, status_code=400, headers=e.headers)
        token = await anyio.to_thread.run_sync(store.create_session, who, settings.session_ttl)
        response.set_cookie(cookie, token, max_age=ttl_s, path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")  # fmt: skip
        return response

    def logout(request: Request) -> RedirectResponse:
        token = session_cookie(request, names)
        if token:
            store.revoke_session(token)
        response = RedirectResponse(url="./", status_code=302)
        response.delete_cookie(cookie, path="/")
        return response

    def export_file(name: str, request: Request) -> FileResponse:
        token = session_cookie(request, names)
        who = store.annotator_for_token(token) if token else None
        if who is None:
            raise HTTPException(401, "sign in first")
        if not who.is_admin:
            raise HTTPException(403, "admins only")
        path = Path(config.export_dir) / name
        if not EXPORT_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no export {name!r}")
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    for path in ("/login", "/login/"):
        app.add_api_route(path, login, methods=["POST"], include_in_schema=False)
    app.add_api_route("/logout", logout, methods=["GET"], include_in_schema=False)
    app.add_api_route("/admin/exports/{name}", export_file, methods=["GET"], include_in_schema=False)


def mount_page(
    page, store: Store, settings: ServerSettings, page_config: PageConfig | None = None, **options
):
    """The JSON API with a Gradio page (the annotator page, the arena) mounted at ``/``, behind every
    protection of this module: the request guard, this server's sign-in and sessions, the session gate on
    every Gradio route, admin-only export downloads. Every page of the workbench is served through here."""
    import gradio as gr
    from gradio.routes import App as GradioApp
    from starlette.routing import Mount

    # Gradio reads the session from these cookies. Their names are random per process: cookies of a host go
    # to all its ports, so a page on another port that knew a name could plant a session of its own.
    cookie_id = secrets.token_urlsafe(16)
    names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
    tokens = StoreTokens(store)
    gate = (PageSessionGate, {"tokens": tokens, "cookie_names": names})
    app = create_api_app(store, settings.gate, page_policy(settings), inner=(gate,))
    _page_routes(app, store, settings, page_config or PageConfig(), names)

    async def refuse(username: str, password: str) -> bool:  # Gradio's own /login is shadowed by ours
        return False

    gr.mount_gradio_app(
        app,
        page,
        path="/",
        auth=refuse,
        auth_message="Sign in with the account your admin made for you. After several wrong passwords, "
        "sign-in pauses for a while.",
        footer_links=[],
        run_history=False,
        max_file_size="64kb",
        **options,
    )
    (gradio_app,) = [r.app for r in app.routes if isinstance(r, Mount) and isinstance(r.app, GradioApp)]
    gradio_app.cookie_id = cookie_id
    gradio_app.tokens = tokens
    return app


def create_app(store: Store, settings: ServerSettings | None = None) -> FastAPI:
    """The JSON API, and (``settings.ui``) the annotator page mounted at ``/``."""
    settings = settings or ServerSettings()
    if not settings.ui:
        return create_api_app(store, settings.gate, page_policy(settings))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from glmwb.ui.annotator import build_annotator_page, page_options

    page_config = settings.page or PageConfig()
    page = build_annotator_page(store, page_config)
    page.queue(default_concurrency_limit=16)
    return mount_page(page, store, settings, page_config, **page_options(page_config))


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def served_settings(host: str, settings: ServerSettings | None = None) -> ServerSettings:
    """``settings`` for a server on ``host``: on a loopback address it answers to loopback names only
    (a name that resolves to 127.0.0.1 elsewhere: DNS rebinding)."""
    settings = settings or ServerSettings()
    if loopback(host) and not settings.trusted_hosts:
        settings.trusted_hosts = _LOOPBACK_NAMES
    return settings


def serve(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 7860,
    settings: ServerSettings | None = None,
    log_level: str = "warning",
) -> None:
    import uvicorn

    app = create_app(store, served_settings(host, settings))
    print(
        f"annotation server on http://{host}:{port}/ (API under /api/v1), store {store.engine.url!r}",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
