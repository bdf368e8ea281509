"""`glmwb argilla ...`'s user errors: one line, exit code 2 (an unreachable server, a refused API key, no API
key, a missing dataset, a dataset with another schema); and the local server's owner secrets."""

from __future__ import annotations

import json
import uuid

import pytest

from glmwb.annotation.argilla_local import _owner_secrets
from glmwb.annotation.store import Store
from glmwb.recipes.cli import main
from tests.annotation.conftest import free_port, make_items


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with Store(url) as s:
        s.add_items(make_items(2, overlap=1))
    return url


def run(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_unreachable_server_and_missing_key(db, capsys, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_KEY", "some.key.12345")
    url = f"http://127.0.0.1:{free_port()}"
    code, line = run(["argilla", "pull", "--db", db, "--url", url, "--dataset", "x"], capsys)
    assert (
        code == 2
        and line == f"glmwb: error: cannot reach the Argilla server at {url} (ConnectError); is it running?"
    )
    monkeypatch.delenv("ARGILLA_API_KEY")
    code, line = run(["argilla", "status", "--db", db, "--url", url, "--dataset", "x"], capsys)
    assert code == 2 and "set the environment variable ARGILLA_API_KEY" in line


def test_refused_key_missing_dataset_and_other_schema(local_argilla, db, capsys, monkeypatch):
    import argilla as rg

    from glmwb.annotation.argilla import connect

    conn = ["--db", db, "--url", local_argilla.url]
    monkeypatch.setenv("ARGILLA_API_KEY", "not.the.owner.key")
    code, line = run(["argilla", "push", *conn, "--dataset", "x"], capsys)
    assert code == 2 and "refused the API key" in line
    monkeypatch.setenv("ARGILLA_API_KEY", local_argilla.api_key)
    code, line = run(["argilla", "pull", *conn, "--dataset", "never-pushed"], capsys)
    assert code == 2 and "no Argilla dataset 'never-pushed' in workspace 'argilla'; push it first" in line

    client = connect(local_argilla.url, local_argilla.api_key)
    other = f"other-{uuid.uuid4().hex[:6]}"
    settings = rg.Settings(
        fields=[rg.TextField(name="text")], questions=[rg.LabelQuestion(name="preference", labels=["A", "B"])]
    )
    rg.Dataset(name=other, workspace="argilla", settings=settings, client=client).create()
    for command in ("push", "pull"):
        code, line = run(["argilla", command, *conn, "--dataset", other], capsys)
        assert code == 2, line
        assert f"Argilla dataset {other!r} does not have the workbench's comparison schema" in line
        assert "no field 'prompt'" in line and "labels A, B, tie, both_bad" in line
    # The right schema is accepted, and pushing again updates the same records (no copies).
    mine = f"mine-{uuid.uuid4().hex[:6]}"
    assert main(["argilla", "push", *conn, "--dataset", mine]) == 0
    assert main(["argilla", "push", *conn, "--dataset", mine]) == 0
    assert len(list(client.datasets(name=mine, workspace="argilla").records)) == 2


def test_owner_secrets_are_kept_per_data_folder(tmp_path):
    first = _owner_secrets(tmp_path, "owner", None, None)
    assert _owner_secrets(tmp_path, "owner", None, None) == first  # a restart: the same key still works
    saved = tmp_path / "owner.json"
    assert json.loads(saved.read_text())["api_key"] == first[1] and saved.stat().st_mode & 0o077 == 0
    assert _owner_secrets(tmp_path, "owner", "given-password", "given.key.123")[1] == "given.key.123"


@pytest.mark.postgres
@pytest.mark.slow  # a second argilla-server, migrated on PostgreSQL: about a minute on 2 busy cores
def test_local_server_on_postgresql(pg_url, db, tmp_path):
    from sqlalchemy.engine import make_url

    from glmwb.annotation.argilla import connect, push, status
    from glmwb.annotation.argilla_local import start

    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    server = start(tmp_path / "home", port=free_port(), database_url=url, api_key="pg.owner.key.123")
    try:
        client = connect(server.url, server.api_key)
        with Store(db) as store:
            assert push(client, store, "on-pg", "argilla").pushed == 2
            assert status(client, store, "on-pg", "argilla")["argilla"]["total"] == 2
    finally:
        server.stop()


@pytest.mark.slow  # a second argilla-server: about 40 s on 2 busy cores
def test_glmwb_argilla_server_runs_until_terminated(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port, key = free_port(), "cli.owner.key.12345"
    env = {**os.environ, "ARGILLA_API_KEY": key}
    cmd = [
        sys.executable,
        "-m",
        "glmwb.recipes.cli",
        "argilla-server",
        "--home",
        str(tmp_path),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("API key:") for line in lines):
            line = proc.stdout.readline()
            assert line, f"glmwb argilla-server ended: {lines}"
            lines.append(line)
        assert f"export ARGILLA_API_KEY={key}" in lines[-1]
        me = httpx.get(f"http://127.0.0.1:{port}/api/v1/me", headers={"X-Argilla-Api-Key": key})
        assert me.status_code == 200 and me.json()["role"] == "owner"
        assert json.loads((tmp_path / "owner.json").read_text())["api_key"] == key
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/api/v1/version", timeout=2)
