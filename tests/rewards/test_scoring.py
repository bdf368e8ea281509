"""In-process batch scoring and the HTTP API: round trip, batching by length keeps the order, max length,
errors that name the bad field (422 for shape / types, 400 for values, 413 for too many items)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from glmwb.pretrain.tokenizer import encode_response
from glmwb.rewards.model import RewardModel, padded_batch, reward_pad_id
from glmwb.rewards.scoring import RewardScorer, ScoringError
from glmwb.rewards.server import RewardClient, create_app

PROMPTS = ["What is 2+2?", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "你好"}],
           "Tell me about the quick brown fox and the lazy dog, please, in detail."]  # fmt: skip
RESPONSES = ["4", "你好！", "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def scorer(reward_folder) -> RewardScorer:
    return RewardScorer.from_pretrained(reward_folder, device="cpu", max_batch=2, batch_tokens=64)


def _direct(reward_folder, tok, prompts, responses) -> torch.Tensor:
    model = RewardModel.from_pretrained(reward_folder)
    seqs = [encode_response(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p, r)
            for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
    return torch.cat([model(**padded_batch([s], reward_pad_id(tok))) for s in seqs])


def test_scorer_matches_the_model_one_at_a_time(scorer, reward_folder) -> None:
    expected = _direct(reward_folder, scorer.tokenizer, PROMPTS * 3, RESPONSES * 3)
    got = scorer.score(PROMPTS * 3, RESPONSES * 3)  # 9 items, several length-sorted batches of <= 2
    assert got == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    assert scorer.score(PROMPTS, RESPONSES, head="correctness") == pytest.approx(
        expected[:3, 1].tolist(), abs=1e-5
    )
    heads = scorer.score_heads(PROMPTS, RESPONSES)
    assert list(heads[0]) == ["reward", "correctness"]
    normalized = scorer.score(PROMPTS, RESPONSES, normalize=True)  # (r - 0.5) / 2.0 from reward_config.json
    assert normalized == pytest.approx([(x - 0.5) / 2.0 for x in expected[:3, 0].tolist()], abs=1e-5)
    assert scorer.score([], []) == []


def test_scorer_max_length(reward_folder) -> None:
    left = RewardScorer.from_pretrained(reward_folder, max_length=24)
    strict = RewardScorer.from_pretrained(reward_folder, max_length=24, truncation="error")
    long_prompt = "word " * 100
    scores, truncated = left.score_detailed([long_prompt, "hi"], ["ok", "ok"])
    assert truncated == [True, False] and all(map(torch.isfinite, torch.tensor(scores)))
    with pytest.raises(ScoringError, match=r"responses\[0\]: \d+ tokens > max_length 24"):
        strict.score(["word " * 30], ["ok"])
    # a text longer than max_length tokens can hold is refused (or cut, with "left") before tokenizing
    assert len(long_prompt) > strict.keep_chars
    with pytest.raises(ScoringError, match=r"prompts\[0\]\[0\]\.content: 500 characters: over max_length 24"):
        strict.score([long_prompt], ["ok"])


@pytest.mark.parametrize(
    ("prompts", "responses", "field"),
    [
        (["q"], ["   "], "responses[0]"),
        (["q", "q"], ["a"], "responses"),
        ([""], ["a"], "prompts[0]"),
        ([[{"role": "bot", "content": "x"}]], ["a"], "prompts[0][0].role"),
        ([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]], ["a"], "prompts[0][1]"),
        (["q"], [3], "responses[0]"),
        ("q", ["a"], "prompts"),
    ],
)
def test_scorer_errors_name_the_field(scorer, prompts, responses, field) -> None:
    with pytest.raises(ScoringError) as e:
        scorer.score(prompts, responses)
    assert e.value.field == field


def test_http_round_trip_and_errors(scorer) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(create_app(scorer, max_batch=4))
    health = client.get("/health").json()
    assert (
        health["status"] == "ok" and health["heads"] == ["reward", "correctness"] and health["max_batch"] == 4
    )
    r = client.post("/score", json={"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200
    body = r.json()
    assert body["scores"] == pytest.approx(scorer.score(PROMPTS, RESPONSES), abs=1e-6)
    assert body["head"] == "reward" and body["truncated"] == [False, False, False]
    r = client.post("/score_heads", json={"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200 and set(r.json()["scores"][0]) == {"reward", "correctness"}
    # wrong shape / types: 422 naming the location
    r = client.post("/score", json={"prompts": PROMPTS})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "responses"]
    r = client.post("/score", json={"prompts": ["q"], "responses": [5]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "responses", 0]
    r = client.post("/score", json={"prompts": ["q"], "responses": ["a"], "extra": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "extra"]
    # bad values: 400 naming the field
    r = client.post("/score", json={"prompts": ["q", "q2"], "responses": ["a", " "]})
    assert r.status_code == 400 and r.json()["detail"] == {"field": "responses[1]", "error": "empty response"}
    r = client.post("/score", json={"prompts": ["q"], "responses": ["a"], "head": "nope"})
    assert r.status_code == 400 and r.json()["detail"]["field"] == "head"
    r = client.post("/score", json={"prompts": ["q"] * 5, "responses": ["a"] * 5})
    assert r.status_code == 413 and "max_batch 4" in r.json()["detail"]["error"]
    # the client over the same app: same scores, same errors
    remote = RewardClient("http://testserver", client=client)
    assert remote.score(PROMPTS, RESPONSES) == pytest.approx(body["scores"], abs=1e-6)
    with pytest.raises(ScoringError, match=r"responses\[0\]: empty response"):
        remote.score(["q"], [""])


def test_real_server_on_localhost(scorer) -> None:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(scorer), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        remote = RewardClient(f"http://127.0.0.1:{port}")
        assert remote.health()["status"] == "ok"
        assert remote.score(PROMPTS, RESPONSES) == pytest.approx(scorer.score(PROMPTS, RESPONSES), abs=1e-6)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
