"""The annotation store's JSON API (FastAPI): votes, skips, undo, progress, admin statistics.

``glmwb annotate`` serves it together with the Gradio annotator page (``ui/app.py`` mounts the page at ``/``
on this app). ``/api/v1/...`` is JSON for scripts, load tests and other front ends, authenticated by a
bearer token from ``POST /api/v1/login``:

  ==========================  ===================================================================
  POST /api/v1/login          {username, password} -> {token, username, role}
  POST /api/v1/logout         revoke the token
  GET  /api/v1/next           -> {task: {assignment_id, item_id, prompt, responses: [{letter, text}]}
                              | null}
  POST /api/v1/votes          {uid, assignment_id, choice, strength?, ratings?, rationale?, time_spent_s?,
                              guideline_version?, next?} -> 201 {vote_id, ..., duplicate: false}; the
                              same uid again -> 200 {..., duplicate: true} (idempotent: retry freely);
                              with next: true, also {next: task | null}
  POST /api/v1/skip           {assignment_id}
  POST /api/v1/undo           -> {undone: {...} | null}
  GET  /api/v1/progress       the caller's counts
  GET  /api/v1/admin/overview admins: totals and per-annotator counts
  GET  /api/v1/admin/agreement admins: the agreement report
  GET  /api/v1/health         no auth: {"ok": true} (start-up probe)
  ==========================  ===================================================================

A vote's response is sent after its transaction committed: an acknowledged vote is on disk.
Errors: 400 bad request, 401 no / bad token, 403 not an admin, 404 not yours or not there (the same answer
for both: nobody learns what others have), 409 conflict (a vote exists; undo first), 429 too many failed
sign-ins. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, Field

from glmwb.annotation.agreement import agreement_report
from glmwb.annotation.store import AnnotatorInfo, Conflict, NotFound, Store, StoreError


class LoginThrottle:
    """At most ``max_failures`` failed sign-ins per username in ``window_s``; then refuse until they age out."""

    def __init__(self, max_failures: int = 10, window_s: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def blocked(self, username: str) -> bool:
        with self._lock:
            q = self._failures[username]
            while q and q[0] < time.monotonic() - self.window_s:
                q.popleft()
            return len(q) >= self.max_failures

    def failed(self, username: str) -> None:
        with self._lock:
            self._failures[username].append(time.monotonic())


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class VoteIn(BaseModel):
    uid: str = Field(min_length=8, max_length=64)
    assignment_id: int
    choice: str
    ratings: dict[str, dict[str, int]] = Field(default_factory=dict)
    strength: str | None = None  # a winner's: negligible / slight / clear / strong (better)
    rationale: str = ""
    time_spent_s: float | None = None
    guideline_version: str = Field(default="", max_length=64)
    next: bool = False  # also answer with the caller's next task (saves a round trip)


class AssignmentIn(BaseModel):
    assignment_id: int


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


def api_router(store: Store, throttle: LoginThrottle) -> APIRouter:
    """The JSON API; include it in an app whose ``state.store`` is ``store``."""
    router = APIRouter(prefix="/api/v1")

    @router.get("/health")
    def health() -> dict:
        return {"ok": True}

    @router.post("/login")
    def login(body: LoginIn) -> dict:
        if throttle.blocked(body.username):
            raise HTTPException(429, "too many failed sign-ins; wait a few minutes")
        who = store.authenticate(body.username, body.password)
        if who is None:
            throttle.failed(body.username)
            raise HTTPException(401, "wrong username or password")
        return {"token": store.create_session(who), "username": who.username, "role": who.role}

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


def create_api_app(store: Store, throttle: LoginThrottle | None = None) -> FastAPI:
    """A FastAPI app serving the JSON API on ``store`` (the annotator page is mounted on it by ui/app.py)."""
    app = FastAPI(title="glm-workbench annotation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.include_router(api_router(store, throttle or LoginThrottle()))
    return app
