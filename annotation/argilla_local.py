"""A local Argilla server on one machine: argilla-server from PyPI in its own virtual environment, SQLite (or
PostgreSQL) and Redis, with the workbench's SQL search engine (annotation/argilla_sql_search.py) instead of
Elasticsearch or OpenSearch. ``glmwb argilla-server`` runs it; the end-to-end test starts one per session.

argilla-server pins an older FastAPI and pydantic-settings and its own SQLAlchemy stack, so it never shares
the workbench's environment: ``ensure_venv`` creates ``.venv-argilla-server`` (pip, the package index in
pip's configuration) with the versions in SERVER_REQUIREMENTS. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from glmwb.annotation.store import StoreError

# argilla-server 2.8.0 with the click its typer 0.9 works with (click >= 8.2 breaks typer 0.9's options) and
# its PostgreSQL drivers (its `postgresql` extra asks for psycopg2 built from source; the binary wheel is the
# same module).
SERVER_REQUIREMENTS = ("argilla-server==2.8.0", "click==8.1.8", "asyncpg==0.30.0", "psycopg2-binary==2.9.13")
ENGINE_SCRIPT = Path(__file__).with_name("argilla_sql_search.py")
DEFAULT_VENV = Path(".venv-argilla-server")
START_TIMEOUT_S = 120.0


class LocalArgillaError(StoreError):
    """The local Argilla server could not be set up or started; the message says what to do."""


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_ready(venv: Path) -> bool:
    """The environment has exactly SERVER_REQUIREMENTS (read from package metadata: no import, fast)."""
    py = _python(venv)
    if not py.exists():
        return False
    pins = dict(r.split("==") for r in SERVER_REQUIREMENTS)
    probe = f"import importlib.metadata as m; assert all(m.version(k) == v for k, v in {pins!r}.items())"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def ensure_venv(venv: Path = DEFAULT_VENV, quiet: bool = True) -> Path:
    """The server's virtual environment, created and installed on first use; returns its python."""
    venv = Path(venv)
    if venv_ready(venv):
        return _python(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(_python(venv)), "-m", "pip", "install", *(["-q"] if quiet else []), *SERVER_REQUIREMENTS]
    done = subprocess.run(pip, capture_output=quiet, text=True)
    if done.returncode != 0 or not venv_ready(venv):
        tail = (done.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise LocalArgillaError(f"installing {' '.join(SERVER_REQUIREMENTS)} into {venv} failed {tail}")
    return _python(venv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalArgilla:
    """A running local server: ``url`` and the owner's ``api_key``; ``stop()`` ends its processes."""

    url: str
    api_key: str
    username: str
    password: str
    home: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> LocalArgilla:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _env(home: Path, database_url: str | None, redis_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ARGILLA_HOME_PATH=str(home),
        ARGILLA_DATABASE_URL=database_url or f"sqlite:///{home / 'argilla.db'}",
        ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        ARGILLA_SEARCH_ENGINE="sql",
        ARGILLA_ENABLE_TELEMETRY="0",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def _wait_http(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise LocalArgillaError(
                f"argilla-server exited with code {process.returncode}: {' | '.join(tail)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise LocalArgillaError(f"argilla-server did not answer at {url} within {timeout:.0f} s (log: {log})")


def _start_redis(home: Path, port: int) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        raise LocalArgillaError("redis-server is not installed (Debian: apt-get install redis-server)")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(home), "--protected-mode", "yes"]
    log = open(home / "redis.log", "ab")  # noqa: SIM115 (the process keeps it)
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return p
        except OSError:
            time.sleep(0.1)
    p.terminate()
    raise LocalArgillaError(f"redis-server did not listen on 127.0.0.1:{port} (log: {home / 'redis.log'})")


def _run_cli(python: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(ENGINE_SCRIPT), *args], env=env, capture_output=True, text=True)


def _prepare(python: Path, env: dict[str, str], username: str, password: str, api_key: str) -> None:
    """Migrate the database and create the owner (kept when it exists), in one process."""
    done = _run_cli(
        python, env, "prepare", "--first-name", username, "--username", username,
        "--password", password, "--role", "owner", "--api-key", api_key, "--workspace", "argilla",
    )  # fmt: skip
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
        raise LocalArgillaError(
            f"migrating the Argilla database or creating its owner {username!r} failed: {tail}"
        )


def _owner_secrets(home: Path, username: str, password: str | None, api_key: str | None) -> tuple[str, str]:
    """The owner's password and API key: given, else the ones made for this data folder before (owner.json,
    readable by its user only), else new ones, saved there, so a restart prints the key that still works."""
    saved_file = home / "owner.json"
    saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
    if saved.get("username") != username:
        saved = {}
    password = password or saved.get("password") or secrets.token_urlsafe(12)
    api_key = api_key or saved.get("api_key") or "glmwb." + secrets.token_urlsafe(24)
    if not saved:
        fd = os.open(saved_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": username, "password": password, "api_key": api_key}, f)
    return password, api_key


def start(
    home: Path,
    *,
    port: int = 6900,
    redis_port: int | None = None,
    venv: Path = DEFAULT_VENV,
    database_url: str | None = None,
    username: str = "owner",
    password: str | None = None,
    api_key: str | None = None,
    timeout: float = START_TIMEOUT_S,
) -> LocalArgilla:
    """Start Redis and argilla-server (migrated, an owner with ``api_key`` in workspace "argilla"). The owner
    is created on the first start of a data folder; later starts keep it (and its password and key)."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(Path(venv))
    redis_port = redis_port or free_port()
    password, api_key = _owner_secrets(home, username, password, api_key)
    env = _env(home, database_url, redis_port)
    server = LocalArgilla(f"http://127.0.0.1:{port}", api_key, username, password, home)
    try:
        server.processes.append(_start_redis(home, redis_port))
        _prepare(python, env, username, password, api_key)
        log = home / "server.log"
        with open(log, "ab") as out:
            cmd = [str(python), str(ENGINE_SCRIPT), "start", "--host", "127.0.0.1", "--port", str(port)]
            server.processes.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
        _wait_http(f"{server.url}/api/v1/version", server.processes[-1], timeout, log)
        # argilla-server's background jobs (a dataset's distribution changed after records exist, Hub
        # import / export, webhooks) run in an rq worker; forked from this process, it has the engine too.
        with open(home / "worker.log", "ab") as out:
            cmd = [str(python), str(ENGINE_SCRIPT), "worker", "--num-workers", "1"]
            server.processes.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    except BaseException:
        server.stop()
        raise
    return server
