"""The world's reward models against the simulated annotators' agreement ceiling, end to end: world →
tokenizer → base pretrained as in the demo (600 steps) → SFT → preferences → the quickstart's reward stage, and
recipes/reward.yaml on the same base (about 30 minutes on 2 cores).

The issue's target is 90 % of the ceiling on held-out pairs. recipes/reward.yaml, fitted value first
(train.value_first), measured 91.8-94.2 % over 3 training x 3 held-out seeds on the demo's 600-step base
(docs/rewards.md); the quickstart's reward stage keeps the joint fit PPO was measured against
(88.1 % on its `test` pairs), so for it the first test guards the level it has held.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from glmwb.recipes.cli import main

    out = tmp_path_factory.mktemp("quickstart")
    args = ["run", "recipes/quickstart.yaml", f"run.dir={out}", "pretrain.train.max_minutes=30"]
    assert main([*args, "--only", "tokenizer,pretrain,sft,preferences,reward"]) == 0
    return {**json.loads((out / "reward" / "summary.json").read_text())["eval"], "_run_dir": out}


def test_world_reward_model_reaches_the_measured_level(quickstart) -> None:
    world = quickstart["world"]
    assert world["pairs"] > 600 and world["ceiling"] == pytest.approx(0.974, abs=0.001)
    assert world["fraction_of_ceiling"] > 0.85, world
    assert world["accuracy_vs_rule"] > 0.82
    assert quickstart["calibration"]["ece"] < 0.1
    for easy in ("correct>refusal", "correct>off_topic", "verbose>wrong", "wrong_language>refusal"):
        assert world["by_kinds"][easy]["accuracy"] > 0.9, (easy, world["by_kinds"][easy])


@pytest.fixture(scope="module")
def reward_recipe(quickstart, tmp_path_factory):
    from glmwb.recipes.cli import main

    out = tmp_path_factory.mktemp("reward")
    base = quickstart["_run_dir"] / "pretrain" / "final"
    assert main(["run", "recipes/reward.yaml", f"run.dir={out}", f"model.init_from={base}"]) == 0
    return json.loads((out / "summary.json").read_text())


def test_reward_recipe_reaches_90_percent_of_the_ceiling(reward_recipe) -> None:
    world = reward_recipe["eval"]["world"]
    assert reward_recipe["value_first"]["form_pairs"] > 1000
    assert world["pairs"] > 600 and world["fraction_of_ceiling"] >= 0.9, world
