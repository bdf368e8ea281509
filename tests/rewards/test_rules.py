"""Verifiable rewards: the world's checker, GSM8K final answers (on real gold answers), exact answers, format,
length, and their weighted combination with a reward model."""

from __future__ import annotations

import json

import pytest

from glmwb.pretrain.world import make_world
from glmwb.rewards.rules import (
    RULES,
    CombinedReward,
    RuleContext,
    final_number,
    format_problems,
    gsm8k_gold,
    length_penalty,
)
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA


def test_world_rules_follow_the_checker() -> None:
    world = make_world(seed=0)
    for p in world.prompts("heldout", 60, seed=0):
        ctx = RuleContext(prompt=p.messages, world_prompt=p, lang=p.lang)
        for r in world.responses(p, seed=3):
            c = world.check(p, r.text)
            assert RULES["world_correct"](r.text, ctx) == float(c.correct)
            assert RULES["world_score"](r.text, ctx) == pytest.approx(c.score)
            assert RULES["world_on_topic"](r.text, ctx) == float(world.on_topic(p, r.text))
            if r.kind in ("correct", "wrong"):  # a right-language concise sentence
                assert RULES["format"](r.text, ctx) == 1.0
            if r.kind == "wrong_language":
                assert RULES["format"](r.text, ctx) == 0.0
            if r.kind == "verbose":
                assert RULES["length"](r.text, ctx) < 0 <= 1 + RULES["length"](r.text, ctx)
    with pytest.raises(ValueError, match="needs context.world_prompt"):
        RULES["world_correct"]("42", RuleContext())


def test_gsm8k_final_answers() -> None:
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,234") == "1234"
    ctx = RuleContext(gold="Janet sells 9 eggs.\n#### 18")
    assert RULES["gsm8k"]("So she makes $18.\n#### 18", ctx) == 1.0
    assert RULES["gsm8k"]("She makes 18 dollars a day.", ctx) == 1.0  # no ####: the last number
    assert RULES["gsm8k"]("#### 18\nActually 20.", ctx) == 1.0  # an explicit #### wins over later numbers
    assert RULES["gsm8k"]("She makes 17 dollars.", ctx) == 0.0
    assert RULES["gsm8k"]("答案是十八。", RuleContext(gold="18")) == 1.0
    assert final_number("no numbers here") is None and final_number("12 then 7", strict=True) is None
    assert "no '#### N' final answer" in format_problems("It is 5.", require_final_answer=True)


@pytest.mark.skipif(not (DATA / "eval_gsm8k").is_dir(), reason="../shared/data is not beside the checkout")
def test_gsm8k_rule_on_real_gold_answers() -> None:
    rows = [json.loads(x) for x in (DATA / "eval_gsm8k" / "test.jsonl").read_text().splitlines()[:200]]
    for row in rows:
        ctx = RuleContext(gold=row["answer"])
        assert RULES["gsm8k"](row["answer"], ctx) == 1.0  # the worked solution itself is right
        wrong = row["answer"].rsplit("####", 1)[0] + f"#### {float(gsm8k_gold(row['answer'])) + 1:g}"
        assert RULES["gsm8k"](wrong, ctx) == 0.0


def test_exact_format_and_length() -> None:
    exact = RULES["exact"]
    assert exact("The answer is 42.", RuleContext(gold="42")) == 1.0
    assert exact("The answer is 42.0", RuleContext(gold="42")) == 1.0
    assert exact("Paris.", RuleContext(gold="paris")) == 1.0
    assert exact("I think it is Paris!", RuleContext(gold="Paris")) == 1.0
    assert exact("Paris or Rome", RuleContext(gold="Paris")) == 0.0
    assert exact("答案是红色。", RuleContext(gold="红色")) == 1.0
    assert format_problems("") == ["empty"]
    assert "control token in text" in format_problems("Sure.<|user|>\nmore")
    assert "repeated character run" in format_problems("a" * 30)
    assert format_problems("Fine.") == []
    assert length_penalty("x" * 50, RuleContext(length_budget=100)) == 0.0
    assert length_penalty("x" * 150, RuleContext(length_budget=100)) == pytest.approx(-0.5)
    assert length_penalty("x" * 999, RuleContext(length_budget=100)) == -1.0


class _FakeScorer:
    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts, responses, normalize=False):
        self.calls += 1
        return [float(len(r)) for r in responses]


def test_combined_reward_weights_rules_and_the_rm() -> None:
    scorer = _FakeScorer()
    combo = CombinedReward({"gsm8k": 1.0, "format": 0.5, "length": 2.0}, scorer=scorer, rm_weight=0.1)
    ctxs = [RuleContext(gold="4", length_budget=10), RuleContext(gold="5", length_budget=10)]
    parts = combo.breakdown(["2+2?", "2+3?"], ["4", "It is 4, I think so."], ctxs)
    assert scorer.calls == 1  # one batched RM call
    assert parts[0] == {
        "gsm8k": 1.0,
        "format": 0.5,
        "length": 0.0,
        "rm": pytest.approx(0.1),
        "total": pytest.approx(1.6),
    }
    assert parts[1]["gsm8k"] == 0.0 and parts[1]["length"] == pytest.approx(-2.0)
    assert combo(["2+2?", "2+3?"], ["4", "It is 4, I think so."], ctxs) == [p["total"] for p in parts]
    with pytest.raises(ValueError, match="unknown rule"):
        CombinedReward({"nope": 1.0})
    with pytest.raises(ValueError, match="no scorer"):
        CombinedReward({}, rm_weight=1.0)
