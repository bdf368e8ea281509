"""The quickstart's reward model against the simulated annotators' agreement ceiling, end to end: world →
tokenizer → base pretrained as in the demo (600 steps) → SFT → preferences → reward model → held-out pairs
(about 25 minutes on 2 cores).

The issue's target is 90 % of the ceiling. recipes/reward.yaml (6,000 prompts, 40 % counterfactual minimal
pairs, 500 steps, likelihood features) measured 91.2 % on a 514-step demo base and 89.7 % on a 454-step one
(docs/rewards.md, sessions 10-11); its 2,000-prompt predecessor stayed at 88-90 %. The first test guards
the level the recipe has held for several sessions; the second is the target itself, and it depends on the
base as much as on the recipe.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from recipes.cli import main

    out = tmp_path_factory.mktemp("quickstart")
    args = ["run", "recipes/quickstart.yaml", f"run.dir={out}", "pretrain.train.max_minutes=30"]
    assert main([*args, "--only", "tokenizer,pretrain,sft,preferences,reward"]) == 0
    return json.loads((out / "reward" / "summary.json").read_text())["eval"]


def test_world_reward_model_reaches_the_measured_level(quickstart) -> None:
    world = quickstart["world"]
    assert world["pairs"] > 600 and world["ceiling"] == pytest.approx(0.974, abs=0.001)
    assert world["fraction_of_ceiling"] > 0.85, world
    assert world["accuracy_vs_rule"] > 0.82
    assert quickstart["calibration"]["ece"] < 0.1
    for easy in ("correct>refusal", "correct>off_topic", "verbose>wrong", "wrong_language>refusal"):
        assert world["by_kinds"][easy]["accuracy"] > 0.9, (easy, world["by_kinds"][easy])


def test_world_reward_model_reaches_90_percent_of_the_ceiling(quickstart) -> None:
    assert quickstart["world"]["fraction_of_ceiling"] >= 0.9
