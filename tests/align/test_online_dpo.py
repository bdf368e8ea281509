"""Online DPO end to end on a tiny policy: sample, label (reward model / annotation store), retrain, evaluate."""

from __future__ import annotations

import json

import pytest

from glmwb.align.online_dpo import OnlineDPORecipe
from glmwb.pretrain.errors import ConfigError
from glmwb.recipes.loader import build
from tests.rewards.conftest import reward_folder, tiny_glm  # noqa: F401  (reward_folder is a fixture)
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def policy_folder(tiny_tokenizer, tmp_path_factory):
    from glmwb.pretrain.hf import save_pretrained

    return str(
        save_pretrained(tiny_glm(tiny_tokenizer, seed=5), tmp_path_factory.mktemp("policy"), tiny_tokenizer)
    )


def recipe(tmp_path, policy, **sections) -> OnlineDPORecipe:
    data = {
        "stage": "online_dpo",
        "run": {"dir": str(tmp_path / "online")},
        "model": {"init_from": policy},
        "rounds": {"rounds": 1, "prompts_per_round": 6, "k": 3, "max_new_tokens": 6, "temperature": 1.0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"batch_size": 2, "max_steps": 2, "log_every": 1},
        "eval": {"world_prompts": 4, "max_new_tokens": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build(OnlineDPORecipe, data, source="test recipe")


def test_one_round_with_reward_model_labels(tmp_path, policy_folder, reward_folder):  # noqa: F811
    from glmwb.align.online_dpo import run_online_dpo

    summary = run_online_dpo(recipe(tmp_path, policy_folder, label={"source": "rm", "reward_model": str(reward_folder)},
                                    eval={"reward_model": str(reward_folder)}))  # fmt: skip
    start, first = summary["rounds"]
    assert first["facts"]["answers"] == 18 and first["facts"]["pairs"] >= 1
    assert first["train"]["steps"] == 2 and "reward_mean" in first["eval"] and "accuracy" in start["eval"]
    pairs = [
        json.loads(line)
        for line in (tmp_path / "online" / "round_1" / "pairs.jsonl").read_text().splitlines()
    ]
    assert len(pairs) == first["facts"]["pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    assert first["policy"].endswith("round_1/final") and (tmp_path / "online" / "rounds.md").is_file()
    assert summary["final"] == str(tmp_path / "online" / "final")  # the last round's policy, where DPO's is
    record = json.loads((tmp_path / "online" / "final" / "glmwb_run.json").read_text())
    assert (record["stage"], record["steps_done"], record["init_from"]) == ("online_dpo", 2, policy_folder)


def test_store_labels_wait_for_people(tmp_path, policy_folder):
    from glmwb.align.online_dpo import run_online_dpo
    from glmwb.annotation.store import Store

    db = tmp_path / "votes.db"
    summary = run_online_dpo(
        recipe(tmp_path, policy_folder, label={"source": "store", "store": str(db), "simulate": False})
    )
    last = summary["rounds"][-1]
    assert last["status"] == "waiting_for_annotators" and last["facts"]["items_added"] == 6
    with Store(db) as store:
        assert len(store.items()) == 6


def test_recipe_mistakes(tmp_path, policy_folder):
    with pytest.raises(ConfigError, match="needs label.reward_model"):
        recipe(tmp_path, policy_folder, label={"source": "rm"})
    with pytest.raises(ConfigError, match="rounds.k must be an integer >= 2"):
        recipe(tmp_path, policy_folder, rounds={"k": 1}, label={"source": "world"})
