"""Our rewards as TRL reward functions: rules against known answers, the reward model in-process and over HTTP
(same numbers as RewardScorer.score), weights, and errors for a missing column, a bad name, a dead server."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from glmwb.align.reward_funcs import (
    CombinedRewardFunc,
    RewardSetupError,
    RewardSpec,
    RuleReward,
    ScorerReward,
    build_reward_funcs,
    completion_text,
    connect_reward_server,
)
from glmwb.pretrain.model import GLM
from glmwb.pretrain.world import make_world
from glmwb.pretrain.world.responses import KINDS
from glmwb.rewards.rules import CombinedReward, RuleContext, length_penalty
from glmwb.rewards.scoring import RewardScorer
from glmwb.rewards.server import RewardClient, create_app
from tests.tiny import TINY


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, num_entities=96)


@pytest.fixture(scope="module")
def world_batch(world):
    """TRL's view of a batch: every world prompt once per response kind, with the dataset columns."""
    prompts, completions, columns = [], [], {"world_prompt": [], "gold": [], "lang": []}
    answers = []
    for p in world.prompts("train", 6, seed=0):
        for r in world.responses(p, seed=0):
            prompts.append(p.messages)
            # as TRL decodes a GLM answer: the newline after <|assistant|> first, no terminator
            completions.append([{"role": "assistant", "content": "\n" + r.text}])
            columns["world_prompt"].append(json.dumps(p.to_dict(), ensure_ascii=False))
            columns["gold"].append(p.gold)
            columns["lang"].append(p.lang)
            answers.append((p, r))
    return prompts, completions, columns, answers


@pytest.fixture(scope="module")
def scorer(tiny_tokenizer, tmp_path_factory) -> RewardScorer:
    from glmwb.rewards.model import RewardModel

    torch.manual_seed(0)
    model = RewardModel(GLM(TINY.with_(pad_token_id=tiny_tokenizer.pad_token_id)), heads=["reward", "extra"])
    model.info.reward_mean, model.info.reward_std = [0.5, 0.0], [2.0, 1.0]
    folder = model.save(tmp_path_factory.mktemp("rm") / "rm", tokenizer=tiny_tokenizer)
    return RewardScorer.from_pretrained(folder, device="cpu")


def test_world_rules_score_known_answers(world, world_batch) -> None:
    prompts, completions, columns, answers = world_batch
    correct = RuleReward("world_correct")(
        prompts, completions, completion_ids=None, trainer_state=None, **columns
    )
    # the world's own correct answers score 1, its wrong / refusal / off-topic ones 0
    for (p, r), value in zip(answers, correct, strict=True):
        if r.kind in ("correct", "verbose", "wrong_language"):
            assert value == 1.0, (p.id, r)
        elif r.kind in ("wrong", "refusal", "off_topic"):
            assert value == 0.0, (p.id, r)
    assert set(KINDS) == {r.kind for _, r in answers}
    score = RuleReward("world_score")(prompts, completions, **columns)
    assert score == pytest.approx([world.check(p, r.text).score for p, r in answers])
    # plain-text completions, and the Prompt as a dict instead of JSON, give the same numbers
    dict_columns = {**columns, "world_prompt": [json.loads(x) for x in columns["world_prompt"]]}
    plain = [r.text for _, r in answers]
    assert RuleReward("world_correct")(prompts, plain, **dict_columns) == correct
    # the format rule knows the prompt's language from the column: a wrong-language answer is malformed
    fmt = RuleReward("format")(prompts, completions, **columns)
    for (_, r), value in zip(answers, fmt, strict=True):
        if r.kind == "wrong_language":
            assert value == 0.0
        if r.kind == "correct":
            assert value == 1.0


def test_gsm8k_exact_length_rules_from_gold_column() -> None:
    prompts = ["q"] * 4
    completions = ["so 3 + 4 = 7\n#### 7", "#### 8", "the answer is 1,234", "I do not know"]
    gold = ["Natalia ... \n#### 7", "7", "1234", "1234"]  # a GSM8K answer field or a bare number
    assert RuleReward("gsm8k")(prompts, completions, gold=gold) == [1.0, 0.0, 1.0, 0.0]
    assert RuleReward("exact")(["q", "q"], ["It is red.", "It is blue."], gold=["red", "red"]) == [1.0, 0.0]
    long = "x" * 300
    got = RuleReward("length", length_budget=100)(["q", "q"], ["short", long])
    assert got == [0.0, pytest.approx(length_penalty(long, RuleContext(length_budget=100)))]
    assert got[1] == -1.0  # 200 characters over a budget of 100: capped at -1
    fmt = RuleReward("format", require_final_answer=True)(["q", "q"], ["#### 5", "five"])
    assert fmt == [1.0, 0.0]


def test_missing_column_bad_name_and_rows_without_context(world_batch) -> None:
    prompts, completions, columns, _ = world_batch
    with pytest.raises(RewardSetupError, match=r"needs the dataset column 'world_prompt'.*\['gold'\]"):
        RuleReward("world_correct")(prompts, completions, gold=columns["gold"], trainer_state=None)
    with pytest.raises(RewardSetupError, match=r"'gold' or 'world_prompt'"):
        RuleReward("gsm8k")(["q"], ["#### 1"])
    with pytest.raises(RewardSetupError, match=r"unknown rule 'nope'; known rules: world_correct"):
        RuleReward("nope")
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; rules: .*models: rm, rm_http"):
        RewardSpec("nope")
    with pytest.raises(ValueError, match="needs folder"):
        RewardSpec("rm")
    with pytest.raises(ValueError, match="needs url"):
        RewardSpec("rm_http")
    with pytest.raises(ValueError, match="is a rule"):
        RewardSpec("length", folder="x")
    with pytest.raises(RewardSetupError, match="listed twice"):
        build_reward_funcs([RewardSpec("length"), RewardSpec("length", weight=2)])
    # mixed data: a row without a world prompt gets no reward from this function (TRL: None = not applicable)
    rows = [columns["world_prompt"][0], None]
    got = RuleReward("world_correct")(prompts[:2], completions[:2], world_prompt=rows)
    assert got[1] is None and got[0] in (0.0, 1.0)
    with pytest.raises(TypeError, match="completion must be"):
        completion_text(3)


def test_rm_adapter_equals_reward_scorer(scorer, world_batch) -> None:
    prompts, completions, _, _ = world_batch
    prompts, completions = prompts[:10], completions[:10]
    texts = [c[0]["content"].strip() for c in completions]
    expected = scorer.score(prompts, texts, normalize=True)  # (r - 0.5) / 2.0 from the folder
    got = ScorerReward(scorer)(prompts, completions, trainer_state=None)
    assert got == pytest.approx(expected, abs=1e-6)
    raw = ScorerReward(scorer, normalize=False, head="extra")(prompts, completions)
    assert raw == pytest.approx(scorer.score(prompts, texts, head="extra"), abs=1e-6)
    assert raw != pytest.approx(got)
    # an empty answer cannot be scored: it gets empty_reward, the others are unchanged
    got = ScorerReward(scorer, empty_reward=-7.0)(prompts[:3], [completions[0], [{"content": " "}], ""])
    assert got == [pytest.approx(expected[0], abs=1e-6), -7.0, -7.0]


def test_http_adapter_round_trip(scorer, world_batch) -> None:
    from fastapi.testclient import TestClient

    prompts, completions, _, _ = world_batch
    prompts, completions = prompts[:7], completions[:7]
    client = RewardClient("http://testserver", client=TestClient(create_app(scorer, max_batch=3)))
    # 7 items in requests of at most 3 (the server refuses more: 413)
    remote = ScorerReward(client, batch_size=3)(prompts, completions)
    local = ScorerReward(scorer)(prompts, completions)
    assert remote == pytest.approx(local, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rm_http_from_recipe_spec_against_a_real_server(scorer, world_batch) -> None:
    import uvicorn

    prompts, completions, columns, _ = world_batch
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(scorer, max_batch=4), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        specs = [
            RewardSpec("rm_http", weight=0.5, url=f"http://127.0.0.1:{port}"),
            RewardSpec("world_correct"),
        ]
        funcs, weights = build_reward_funcs(specs)
        assert weights == [0.5, 1.0] and [f.__name__ for f in funcs] == ["rm_http", "world_correct"]
        assert funcs[0].batch_size == 4  # the server's max_batch, read from /health
        got = funcs[0](prompts[:9], completions[:9], **{k: v[:9] for k, v in columns.items()})
        assert got == pytest.approx(ScorerReward(scorer)(prompts[:9], completions[:9]), abs=1e-6)
        with pytest.raises(RewardSetupError, match=r"head: 'nope' is not one of \['reward', 'extra'\]"):
            build_reward_funcs([RewardSpec("rm_http", url=f"http://127.0.0.1:{port}", head="nope")])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # the server is gone: the same function now says which server stopped answering
    with pytest.raises(RewardSetupError, match=rf"reward server http://127.0.0.1:{port} stopped answering"):
        funcs[0](prompts[:2], completions[:2])


def test_unreachable_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RewardSetupError, match=rf"reward server {url} is unreachable.*glmwb serve-rewards"):
        connect_reward_server(url, timeout=5)


def test_rm_folder_spec_and_combined_reward(scorer, world_batch, tmp_path) -> None:
    prompts, completions, columns, _ = world_batch
    folder = tmp_path / "rm"
    scorer.model.save(folder, tokenizer=scorer.tokenizer)
    funcs, weights = build_reward_funcs(
        [RewardSpec("rm", folder=str(folder), device="cpu"), RewardSpec("length")]
    )
    assert funcs[0](prompts[:4], completions[:4]) == pytest.approx(
        ScorerReward(scorer)(prompts[:4], completions[:4]), abs=1e-6
    )
    with pytest.raises(RewardSetupError, match=r"rewards\[0\].folder: no reward folder"):
        build_reward_funcs([RewardSpec("rm", folder=str(tmp_path / "missing"))])
    # CombinedReward in one function = the weighted sum of the separate functions
    combined = CombinedRewardFunc(
        CombinedReward({"world_correct": 1.0, "length": 0.5}, scorer, rm_weight=0.25)
    )
    got = combined(prompts, completions, **columns)
    parts = [
        RuleReward("world_correct")(prompts, completions, **columns),
        RuleReward("length")(prompts, completions, **columns),
        ScorerReward(scorer)(prompts, completions),
    ]
    expected = [a + 0.5 * b + 0.25 * c for a, b, c in zip(*parts, strict=True)]
    assert got == pytest.approx(expected, abs=1e-5)
