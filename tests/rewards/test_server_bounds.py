"""``glmwb serve-rewards`` under hostile requests: bodies over the limit are refused before they are read,
texts over ``max_chars`` and prompts over ``max_messages`` are 413s naming the field, texts are cut to what
``max_length`` tokens can hold *before* tokenizing (the scores and the truncated flags do not change), a
body with NaN or a lone surrogate is a 400, other web pages are refused, the bearer token is checked, the
server will not listen beyond loopback without one, and (a child process) one 8 MB request costs the server
tens of megabytes, not gigabytes."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from glmwb.pretrain.errors import ConfigError
from glmwb.rewards.scoring import RewardScorer
from glmwb.rewards.server import RewardClient, ScoringLimits, create_app, serve


@pytest.fixture(scope="module")
def scorer(reward_folder) -> RewardScorer:
    return RewardScorer.from_pretrained(reward_folder, device="cpu", max_length=64)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_texts_are_cut_to_what_the_model_can_read_before_tokenizing(scorer) -> None:
    seen: list[int] = []
    template = scorer.tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.append(max(len(m["content"]) for m in messages))
        return template(messages, **kwargs)

    scorer.tokenizer.apply_chat_template = spy
    try:
        huge = "the quick brown fox " * 100_000  # 2 M characters
        t = time.perf_counter()
        scores, truncated = scorer.score_detailed(["q", huge[:5000], [{"role": "user", "content": huge}]],
                                                  [huge, "fine", "ok"])  # fmt: skip
        assert time.perf_counter() - t < 10 and truncated == [True, True, True]
        assert max(seen) <= scorer.keep_chars == (64 + 16) * 10  # the tiny vocabulary's longest token: 10
        cut = scorer.score_detailed(["q"], [huge[-scorer.keep_chars :]])[0]
        assert scores[0] == pytest.approx(cut[0], abs=1e-6)  # the same score as the text's kept end
    finally:
        scorer.tokenizer.apply_chat_template = template


def test_requests_are_bounded_and_refused_by_field(scorer) -> None:
    limits = ScoringLimits(max_batch=4, max_chars=1000, max_messages=3, max_body=64 * 1024)
    client = TestClient(create_app(scorer, limits=limits), raise_server_exceptions=False)
    cases = [
        ({"prompts": ["q"], "responses": ["a" * 1001]}, 413, "responses[0]"),
        ({"prompts": ["q" * 1001], "responses": ["a"]}, 413, "prompts[0]"),
        (
            {"prompts": [[{"role": "user", "content": "x" * 1001}]], "responses": ["a"]},
            413,
            "prompts[0][0].content",
        ),
        ({"prompts": [[{"role": "user", "content": "x"}] * 4], "responses": ["a"]}, 413, "prompts[0]"),
        ({"prompts": ["q"] * 5, "responses": ["a"] * 5}, 413, "prompts"),
        ({"prompts": ["q"], "responses": ["a"] * 5}, 413, "responses"),
    ]
    for body, status, field in cases:
        r = client.post("/score", json=body)
        assert r.status_code == status and r.json()["detail"]["field"] == field, r.text[:300]
    big = {"prompts": ["q"], "responses": ["a" * 70_000]}
    r = client.post("/score", json=big)
    assert r.status_code == 413 and "65,536" in r.json()["detail"]
    for raw in (b'{"prompts": ["q"], "responses": ["a"], "normalize": NaN}',
                b'{"prompts": ["\\ud800"], "responses": ["a"]}', b"\xff\xfe"):  # fmt: skip
        r = client.post("/score", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    r = client.post(
        "/score", json={"prompts": ["q"], "responses": ["a"]}, headers={"origin": "http://127.0.0.1:1"}
    )
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert client.post("/score", json={"prompts": ["q"], "responses": ["a"]}).status_code == 200


def test_a_token_is_checked_when_set(scorer, monkeypatch) -> None:
    client = TestClient(create_app(scorer, token="s3cret-token"))
    body = {"prompts": ["q"], "responses": ["a"]}
    assert client.post("/score", json=body).status_code == 401
    assert client.post("/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/score_heads", json=body).status_code == 401
    assert (
        client.post("/score", json=body, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    )
    assert client.get("/health").json()["token"] is True
    assert RewardClient("http://testserver", client=client, token="s3cret-token").score(["q"], ["a"])
    monkeypatch.setenv("GLMWB_REWARD_TOKEN", "s3cret-token")
    assert RewardClient("http://testserver", client=client).score(["q"], ["a"])  # read from the environment
    monkeypatch.delenv("GLMWB_REWARD_TOKEN")
    args = argparse.Namespace(model="unused", host="0.0.0.0", port=1, max_batch=8, max_chars=10, max_body_mb=1.0,
                              token_env="GLMWB_REWARD_TOKEN", max_length=None, truncation="left", device="cpu")  # fmt: skip
    with pytest.raises(ConfigError, match="listens beyond this machine: set a token"):
        serve(args)


def test_a_body_over_the_limit_is_refused_before_it_is_read(scorer) -> None:
    import uvicorn

    port = _port()
    app = create_app(scorer, limits=ScoringLimits(max_body=2**20))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 52428800\r\n\r\n{")  # fmt: skip
            answer = b""
            while b"bytes" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 413") and b"52,428,800 bytes" in answer
    finally:
        server.should_exit = True


def test_a_large_request_costs_the_server_megabytes_not_gigabytes(reward_folder) -> None:
    import psutil

    port = _port()
    env = {**os.environ, "GLMWB_REWARD_TOKEN": ""}
    child = subprocess.Popen([sys.executable, "-m", "glmwb.recipes.cli", "serve-rewards", str(reward_folder),
                              "--port", str(port), "--device", "cpu"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        proc = psutil.Process(child.pid)
        before, peak, stop = proc.memory_info().rss, [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()
        words = "word " * (90_000 // 5)  # just under max_chars, 80 of them: 7.2 MB
        r = httpx.post(f"{base}/score", json={"prompts": ["q"] * 80, "responses": [words] * 80}, timeout=300)
        stop.set()
        assert r.status_code == 200 and all(r.json()["truncated"])
        too_big = httpx.post(f"{base}/score", json={"prompts": ["q"], "responses": ["word " * 2_000_000]})
        assert too_big.status_code == 413  # 10 MB: over the 8 MiB body limit
        grown = (peak[0] - before) / 2**20
        print(f"[serve-rewards] an 80 x 90,000-character request: peak RSS +{grown:.0f} MiB")
        assert grown < 400  # before the bounds, tokenizing whole texts: ~240 MiB per MB of text
    finally:
        child.terminate()
        child.wait(timeout=30)
