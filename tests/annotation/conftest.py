"""Fixtures for the annotation tests: stores (SQLite files, fresh PostgreSQL databases), a cheap password
hasher, servers on loopback (in a thread, or as a subprocess that a test may kill), headless Chromium.

PostgreSQL: ``GLMWB_TEST_PG_URL`` (``.ci/run`` starts the server and exports it; default
postgresql+psycopg://glmwb:glmwb@127.0.0.1:5432/glmwb_test). Each test gets a database of its own, made
from that URL's role (which needs CREATEDB) and dropped afterwards. Tests marked ``postgres`` *fail* when
the server cannot be reached: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from glmwb.annotation.store import NewItem, NewResponse, Store

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("GLMWB_TEST_PG_URL", "postgresql+psycopg://glmwb:glmwb@127.0.0.1:5432/glmwb_test")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def cheap_hasher():
    """argon2id with small parameters: the tests create dozens of accounts (hashes carry their parameters,
    so a server with the default hasher verifies them)."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_items(n: int, overlap: int = 3, prefix: str = "p", gold_every: int = 0, **kw) -> list[NewItem]:
    items = []
    for i in range(n):
        gold = 0 if gold_every and i % gold_every == gold_every - 1 else None
        items.append(
            NewItem(
                prompt_uid=f"{prefix}{i}",
                prompt=[{"role": "user", "content": f"question {i}"}],
                responses=[
                    NewResponse(f"good answer {i}", "model-a"),
                    NewResponse(f"bad answer {i}", "model-b"),
                ],
                overlap=overlap,
                gold=gold,
                **kw,
            )
        )
    return items


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'annotation.db'}"


def _pg_admin_url() -> str:
    return PG_URL


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for this test (dropped afterwards)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(PG_URL)
    name = f"glmwb_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any failure here means no server
        pytest.fail(
            f"PostgreSQL is not reachable at {base.render_as_string(hide_password=True)} ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). Start it as .ci/run does (pg_ctlcluster 15 main start; a role with "
            "CREATEDB) or set GLMWB_TEST_PG_URL."
        )
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(admin, name)
        admin.dispose()


def _drop_database(admin, name: str, tries: int = 10) -> None:
    """Drop a test database. WITH (FORCE) ends our own lingering pooled sessions; when the server refuses it
    (InsufficientPrivilege: another role's process, e.g. an autovacuum worker, is on the database and the
    role lacks pg_signal_backend), a plain DROP DATABASE is tried, which cancels autovacuum itself; it is
    retried while the server still reports the database in use."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        return
    except DBAPIError:  # refused: fall through to the plain DROP below
        admin.dispose()
    for attempt in range(tries):
        with admin.connect() as c:
            try:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                return
            except DBAPIError:
                if attempt == tries - 1:
                    raise
        time.sleep(0.5)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """Each backend in turn: an SQLite file, a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotation.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    s = Store(db_url, password_hasher=cheap_hasher())
    yield s
    s.close()


@pytest.fixture
def sqlite_store(sqlite_url):
    s = Store(sqlite_url, password_hasher=cheap_hasher())
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    base_url: str,
    timeout_s: float = 60.0,
    process: subprocess.Popen | None = None,
    path: str = "/api/v1/health",
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was up")
        try:
            if httpx.get(f"{base_url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no server at {base_url} after {timeout_s} s")


class ServerProcess:
    """``glmwb annotate`` as a child process on a free loopback port; ``kill()`` is SIGKILL."""

    def __init__(self, db: str, log: Path, ui: bool = True) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "glmwb.recipes.cli", "annotate", "--db", db, "--port", str(self.port)]
        args += ["--gold-rate", "0"] + ([] if ui else ["--no-ui"])
        self.log = log.open("ab")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_healthy(self.base_url, process=self.process)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown handlers, no flushing
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class ThreadServer:
    """The app (``create_app``) served by uvicorn in a thread of the test process, on loopback."""

    def __init__(self, app, health: str = "/api/v1/health") -> None:
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.base_url, path=health)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, through playwright (no browser download is possible here)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def tiny_glm_folder(tiny_tokenizer, tmp_path_factory):
    """A tiny random GLM saved with the tiny tokenizer as a Hugging Face folder."""
    import torch

    from glmwb.pretrain.config import GLMConfig
    from glmwb.pretrain.hf import save_pretrained
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.tokenizer import turn_terminator_ids

    torch.manual_seed(0)
    cfg = GLMConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_ids=tuple(turn_terminator_ids(tiny_tokenizer)),
    )
    folder = tmp_path_factory.mktemp("tiny_glm")
    return save_pretrained(GLM(cfg).eval(), folder, tokenizer=tiny_tokenizer)


def bearer_login(base_url: str, username: str, password: str) -> dict[str, str]:
    """Sign in through the JSON API; the Authorization header of the token it gives."""
    import httpx

    r = httpx.post(f"{base_url}/api/v1/login", json={"username": username, "password": password})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


def page_client(base_url: str, username: str, password: str):
    """An HTTP client signed in to the page (its session cookie set by ``POST /login``)."""
    import httpx

    client = httpx.Client(base_url=base_url, timeout=30)
    r = client.post("/login", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return client


def wait_text(page, selector: str, pattern: str, timeout_s: float = 30.0) -> str:
    """Poll a browser page until ``selector``'s text matches ``pattern``; its text then."""
    import re
    import time

    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{selector} never matched {pattern!r}; last text: {text!r}")


# -- Argilla ---------------------------------------------------------------------------------------------------
ARGILLA_KEY = "glmwb.test.owner.key"
ARGILLA_PASSWORD = "owner-password-1"


@pytest.fixture(scope="session")
def local_argilla(tmp_path_factory):
    """One local Argilla server for the session (annotation/argilla_local.py: argilla-server in its own venv,
    SQLite, Redis, the workbench's SQL search engine); the venv is made on first use (.ci/services does)."""
    from glmwb.annotation.argilla_local import start

    home = tmp_path_factory.mktemp("argilla")
    venv = REPO / ".venv-argilla-server"
    server = start(home, port=free_port(), venv=venv, api_key=ARGILLA_KEY, password=ARGILLA_PASSWORD)
    yield server
    server.stop()


def argilla_user(server, client, username: str, password: str, workspace: str = "argilla") -> dict[str, str]:
    """An annotator in Argilla (created once), a member of ``workspace``: {"id", "api_key", "username"}."""
    import warnings

    import argilla as rg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not found": then it is made
        user = client.users(username)
    if user is None:
        user = rg.User(username=username, password=password, role="annotator", client=client).create()
        client.workspaces(workspace).add_user(user)
    owner = {"X-Argilla-Api-Key": server.api_key}
    key = httpx.get(f"{server.url}/api/v1/users/{user.id}", headers=owner).json()["api_key"]  # not in the SDK
    return {"id": str(user.id), "api_key": key, "username": username}


def argilla_respond(url: str, api_key: str, record_id: str, values: dict, status: str = "submitted"):
    """One user's response to one record through Argilla's REST API (what its web page sends)."""
    body = {"values": {q: {"value": v} for q, v in values.items()}, "status": status}
    r = httpx.post(
        f"{url}/api/v1/records/{record_id}/responses", json=body, headers={"X-Argilla-Api-Key": api_key}
    )
    assert r.status_code == 201, r.text
    return r.json()


ARTIFACTS = REPO / "build" / "test-artifacts"  # gitignored (build/): screenshots kept after the run


def artifact(name: str) -> Path:
    """Where a browser test keeps a screenshot: ``build/test-artifacts/<name>.png`` (made if missing)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


@pytest.fixture
def shots(request) -> Path:
    """A browser test's screenshot folder: ``build/test-artifacts/<test name>/`` (kept after the run)."""
    folder = ARTIFACTS / request.node.name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
