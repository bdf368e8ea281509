"""The annotation store's JSON API (FastAPI): votes, skips, undo, progress, admin statistics.

``glmwb annotate`` serves it together with the Gradio annotator page (``ui/app.py`` mounts the page at ``/``
on this app). ``/api/v1/...`` is JSON for scripts, load tests and other front ends, authenticated by a
bearer token from ``POST /api/v1/login``:

  ==========================  ===================================================================
  POST /api/v1/login          {username, password} -> {token, username, role} (and a known-device
                              cookie: see annotation/guard.py's LoginGate)
  POST /api/v1/logout         revoke the token
  GET  /api/v1/next           -> {task: {assignment_id, item_id, prompt, responses: [{letter, text}]}
                              | null}
  POST /api/v1/votes          {uid, assignment_id, choice, strength?, ratings?, rationale?, time_spent_s?,
                              guideline_version?, next?} -> 201 {vote_id, ..., duplicate: false}; the
                              same uid again -> 200 {..., duplicate: true} (idempotent: retry freely),
                              or 409 once that vote was undone (a new vote needs a new uid); with
                              next: true, also {next: task | null}
  POST /api/v1/skip           {assignment_id}
  POST /api/v1/undo           -> {undone: {...} | null}
  GET  /api/v1/progress       the caller's counts
  GET  /api/v1/admin/overview admins: totals and per-annotator counts
  GET  /api/v1/admin/agreement admins: the agreement report
  GET  /api/v1/health         no auth: {"ok": true} (start-up probe)
  ==========================  ===================================================================

A vote's response is sent after its transaction committed: an acknowledged vote is on disk.
Errors: 400 bad request (also: a JSON body with NaN / Infinity, a lone surrogate or not UTF-8), 401 no / bad
token, 403 not an admin, or a request another web page made (``annotation/guard.py``), 404 not yours or not
there (the same answer for both: nobody learns what others have), 409 conflict (a vote exists; undo first;
or the vote id was undone), 413 a body over its limit (4 KiB for sign-in, 256 KiB otherwise), 422 a field of
the wrong type or out of range (ids are 1 .. 2^63 - 1), 429 too many failed sign-ins (``Retry-After``), 503
too many sign-ins being checked at once. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field, StrictInt

from glmwb.annotation.agreement import agreement_report
from glmwb.annotation.guard import (
    GateBusy,
    GuardPolicy,
    LoginGate,
    RequestGuard,
    client_address,
    install_error_handlers,
    retry_after,
)
from glmwb.annotation.store import (
    MAX_RATING_ATTRIBUTES,
    MAX_RATIONALE,
    AnnotatorInfo,
    Conflict,
    NotFound,
    Store,
    StoreError,
)

MAX_ID = 2**63 - 1  # ids are 64-bit signed integers in both databases
LOGIN_BODY_LIMIT = 4 * 1024
API_POLICY = GuardPolicy(body_limits=(("/api/v1/login", LOGIN_BODY_LIMIT),))


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


Rating = Annotated[StrictInt, Field(ge=1, le=5)]  # StrictInt: `true` and "5" are not ratings


class VoteIn(BaseModel):
    uid: str = Field(min_length=8, max_length=64)
    assignment_id: int = Field(ge=1, le=MAX_ID)
    choice: str = Field(max_length=16)
    ratings: dict[str, dict[str, Rating]] = Field(default_factory=dict, max_length=MAX_RATING_ATTRIBUTES)
    strength: str | None = Field(
        default=None, max_length=16
    )  # a winner's: negligible / slight / clear / strong
    rationale: str = Field(default="", max_length=MAX_RATIONALE)
    time_spent_s: float | None = Field(default=None, ge=0, lt=10**7, allow_inf_nan=False)
    guideline_version: str = Field(default="", max_length=64)
    next: bool = False  # also answer with the caller's next task (saves a round trip)


class AssignmentIn(BaseModel):
    assignment_id: int = Field(ge=1, le=MAX_ID)


def device_cookie_name(store: Store) -> str:
    """The known-device cookie's name: one per store (two stores served on one host, whose cookies are
    shared across ports, do not clash). Knowing it gains nothing: its value is an HMAC under a secret of the
    server process."""
    from sqlalchemy.engine import make_url

    where = make_url(store.url).render_as_string(hide_password=True)
    return "known-device-" + hashlib.sha256(where.encode()).hexdigest()[:16]


async def sign_in(
    store: Store, gate: LoginGate, username: str, password: str, request: Request, response: Response
) -> AnnotatorInfo:
    """The account for this username and password, through the gate: 429 while this (username, client),
    this client or this username backs off (or this known device, when the request carries the cookie of
    one), 503 while too many checks wait, 401 for a wrong pair. A success sets the known-device cookie."""
    name = device_cookie_name(store)
    device = gate.known_device(request.cookies.get(name), username)
    client = client_address(request)
    wait = gate.wait_s(username, client, device)
    if wait > 0:
        await asyncio.sleep(min(wait, gate.pause_s))
        raise HTTPException(
            429, f"too many failed sign-ins; try again in {math.ceil(wait)} s", headers=retry_after(wait)
        )

    def check() -> AnnotatorInfo | None | float:
        # On the check's own thread, one check after another: asked again when its turn comes (the attempts
        # queued behind a failure back off too), and the outcome is counted before the next check starts.
        late = gate.wait_s(username, client, device)
        if late > 0:
            return late
        who = store.authenticate(username, password)
        if who is None:
            gate.failed(username, client, device)
        else:
            gate.succeeded(username, client, device)
        return who

    try:
        who = await gate.check(check)
    except GateBusy:
        raise HTTPException(
            503, "too many sign-ins are being checked; try again in a moment", headers=retry_after(1)
        ) from None
    if isinstance(who, float):
        await asyncio.sleep(min(who, gate.pause_s))
        raise HTTPException(
            429, f"too many failed sign-ins; try again in {math.ceil(who)} s", headers=retry_after(who)
        )
    if who is None:
        raise HTTPException(401, "wrong username or password")
    if device is None:
        response.set_cookie(name, gate.device_cookie(username), max_age=90 * 86400, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return who


def _error(e: StoreError) -> HTTPException:
    code = 404 if isinstance(e, NotFound) else 409 if isinstance(e, Conflict) else 400
    return HTTPException(status_code=code, detail=str(e))


def _store(request: Request) -> Store:
    return request.app.state.store


def current_annotator(request: Request) -> AnnotatorInfo:
    """The bearer token's annotator, else 401."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    who = _store(request).annotator_for_token(token.strip()) if scheme.lower() == "bearer" else None
    if who is None:
        raise HTTPException(401, "sign in first: POST /api/v1/login", headers={"WWW-Authenticate": "Bearer"})
    return who


Caller = Annotated[AnnotatorInfo, Depends(current_annotator)]


def current_admin(who: Caller) -> AnnotatorInfo:
    if not who.is_admin:
        raise HTTPException(403, "admins only")
    return who


Admin = Annotated[AnnotatorInfo, Depends(current_admin)]


def api_router(store: Store, gate: LoginGate) -> APIRouter:
    """The JSON API; include it in an app whose ``state.store`` is ``store``."""
    router = APIRouter(prefix="/api/v1")

    @router.get("/health")
    def health() -> dict:
        return {"ok": True}

    @router.post("/login")
    async def login(body: LoginIn, request: Request, response: Response) -> dict:
        who = await sign_in(store, gate, body.username, body.password, request, response)
        token = await anyio.to_thread.run_sync(store.create_session, who)
        return {"token": token, "username": who.username, "role": who.role}

    @router.post("/logout")
    def logout(request: Request, who: Caller) -> dict:
        store.revoke_session(request.headers["authorization"].partition(" ")[2].strip())
        return {"ok": True}

    @router.get("/next")
    def next_task(who: Caller) -> dict:
        task = store.next_task(who)
        return {"task": None if task is None else task.to_dict()}

    @router.post("/votes")
    def vote(body: VoteIn, response: Response, who: Caller) -> dict:
        try:
            receipt = store.submit_vote(
                who,
                body.assignment_id,
                body.choice,
                uid=body.uid,
                ratings=body.ratings,
                strength=body.strength,
                rationale=body.rationale,
                time_spent_s=body.time_spent_s,
                guideline_version=body.guideline_version,
            )
        except StoreError as e:
            raise _error(e) from None
        response.status_code = 201 if receipt.created else 200
        if not body.next:
            return receipt.to_dict()
        task = store.next_task(who)
        return {**receipt.to_dict(), "next": None if task is None else task.to_dict()}

    @router.post("/skip")
    def skip(body: AssignmentIn, who: Caller) -> dict:
        try:
            store.skip(who, body.assignment_id)
        except StoreError as e:
            raise _error(e) from None
        return {"ok": True}

    @router.post("/undo")
    def undo(who: Caller) -> dict:
        receipt = store.undo_last_vote(who)
        return {"undone": None if receipt is None else receipt.to_dict()}

    @router.get("/progress")
    def progress(who: Caller) -> dict:
        return store.progress(who)

    @router.get("/admin/overview")
    def overview(who: Admin) -> dict:
        return store.overview()

    @router.get("/admin/agreement")
    def agreement(who: Admin) -> dict:
        return agreement_report(store.votes()).to_dict()

    return router


def create_api_app(
    store: Store,
    gate: LoginGate | None = None,
    policy: GuardPolicy | None = None,
    inner: Sequence[tuple[type, dict[str, Any]]] = (),
) -> FastAPI:
    """A FastAPI app serving the JSON API on ``store`` (the annotator page is mounted on it by ui/app.py),
    behind ``RequestGuard(policy)`` (default ``API_POLICY``), the outermost middleware; ``inner`` middleware
    (class, keyword arguments) run after it, in the order given."""
    app = FastAPI(title="glm-workbench annotation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.gate = gate or LoginGate()
    app.include_router(api_router(store, app.state.gate))
    install_error_handlers(app)
    for cls, kwargs in reversed(inner):
        app.add_middleware(cls, **kwargs)
    app.add_middleware(RequestGuard, policy=policy or API_POLICY)
    return app
