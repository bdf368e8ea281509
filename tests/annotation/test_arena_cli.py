"""`glmwb arena serve` / `serve-model`: user mistakes are one line and exit code 2; the specs become the
arena's sources; the app it builds (in this process; as a child process under the ``slow`` marker) binds
loopback with two names on one folder and signs in the store's accounts."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from glmwb.annotation.store import Store
from glmwb.recipes.cli import main
from tests.annotation.conftest import REPO, ThreadServer, cheap_hasher, free_port, wait_healthy


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "a=FOLDER"], "at least two models"),
        (["--model", "a=FOLDER", "--model", "a=FOLDER"], "'a' is given twice"),
        (["--model", "a=FOLDER", "--model", "nonsense"], "expected NAME=TARGET"),
        (["--model", "a=FOLDER", "--model", "b=/no/such/folder"], "not a model folder"),
        (["--model", "a=FOLDER", "--endpoint", "b=ftp://x"], "must start with http"),
        (["--model", "a=FOLDER", "--endpoint", "b=http://x/v1", "--alias", "c=C"], "--alias c: no model"),
        (["--model", "a=FOLDER", "--endpoint", "b=http://x/v1", "--temperature", "-1"], "temperature"),
    ],
)
def test_serve_user_errors_are_one_line(extra, message, tiny_glm_folder, tmp_path, capsys):
    extra = [x.replace("FOLDER", str(tiny_glm_folder)) for x in extra]
    code = main(["arena", "serve", "--db", str(tmp_path / "a.db"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_serve_model_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["arena", "serve-model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_serve_builds_the_app_that_signs_in_store_accounts(tiny_glm_folder, tmp_path, monkeypatch):
    """`glmwb arena serve` in this process: uvicorn.run is caught, and its app served from a thread."""
    import uvicorn

    db = f"sqlite:///{tmp_path / 'arena.db'}"
    with Store(db, password_hasher=cheap_hasher()) as store:
        store.create_annotator("alice", "alice-password")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    code = main(["arena", "serve", "--db", db, "--model", f"one={tiny_glm_folder}", "--model", f"two={tiny_glm_folder}",
                 "--max-new-tokens", "8", "--per-minute", "5"])  # fmt: skip
    assert code == 0 and served["host"] == "127.0.0.1" and served["port"] == 7861
    server = ThreadServer(served["app"])
    try:
        client = httpx.Client(base_url=server.base_url, timeout=30)
        assert "auth_required" in client.get("/").text
        assert client.post("/login", data={"username": "alice", "password": "wrong-one"}).status_code == 400
        assert (
            client.post("/login", data={"username": "alice", "password": "alice-password"}).status_code == 200
        )
        assert client.get("/config").status_code == 200  # signed in: the page's config
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_starts_on_loopback_and_signs_in_store_accounts(tiny_glm_folder, tmp_path):
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    with Store(db, password_hasher=cheap_hasher()) as store:
        store.create_annotator("alice", "alice-password")
    port = free_port()
    args = [sys.executable, "-m", "glmwb.recipes.cli", "arena", "serve", "--db", db, "--port", str(port),
            "--model", f"one={tiny_glm_folder}", "--model", f"two={tiny_glm_folder}", "--max-new-tokens", "8"]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process=process)
        shell = httpx.get(base, timeout=30)
        assert shell.status_code == 200 and "auth_required" in shell.text
        client = httpx.Client(base_url=base, timeout=30)
        assert client.post("/login", data={"username": "alice", "password": "wrong-one"}).status_code == 400
        assert (
            client.post("/login", data={"username": "alice", "password": "alice-password"}).status_code == 200
        )
        assert client.get("/config").status_code == 200  # signed in: the page's config
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert "arena on http://127.0.0.1" in (tmp_path / "serve.log").read_text()


def test_model_specs_become_sources(tiny_glm_folder, monkeypatch):
    from glmwb.recipes.arena_serve_cli import build_models
    from glmwb.recipes.cli import make_parser

    monkeypatch.setenv("ARENA_TEST_KEY", "sk-test")
    args = make_parser().parse_args(
        ["arena", "serve", "--model", f"one={tiny_glm_folder}", "--model", f"two={tiny_glm_folder}",
         "--endpoint", "big=http://127.0.0.1:9/v1#org/Big-7B", "--endpoint", "small=https://host/v1",
         "--api-key-env", "ARENA_TEST_KEY", "--alias", "big=BigLM, Big", "--max-batch", "4"]
    )  # fmt: skip
    models = build_models(args)
    assert sorted(models) == ["big", "one", "small", "two"]
    assert models["one"].source.generator is models["two"].source.generator  # one folder, one generator
    assert models["one"].source.generator.max_batch == 4
    big = models["big"].source
    assert (big.base_url, big.model, big.api_key) == ("http://127.0.0.1:9/v1", "org/Big-7B", "sk-test")
    assert models["small"].source.model == "small" and models["big"].aliases == ("BigLM", "Big")
    models["one"].source.generator.close()
