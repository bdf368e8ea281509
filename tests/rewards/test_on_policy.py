"""rewards/on_policy.py: the ranking statistics against hand-computed values, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmwb.pretrain.hf import save_pretrained
from glmwb.rewards.model import RewardModel
from glmwb.rewards.on_policy import main, ranking_stats
from tests.rewards.conftest import tiny_glm


def test_ranking_stats_by_hand() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0], [1.0, 2.0, 3.0]])
    correct = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    s = ranking_stats(scores, correct)
    # prompt 0: right 3 > wrong 1 and 2 (2 of 2); prompt 1: right 0 < wrong 5, right 5 = wrong 5 (0 + 0.5 of 2)
    assert s["pairs"] == 4
    assert s["right_over_wrong"] == pytest.approx(2.5 / 4)
    # top picks: 3.0 (right), the first 5.0 (right), 3.0 (wrong)
    assert s["best_of_k"] == pytest.approx(2 / 3)
    assert math.isnan(ranking_stats(torch.zeros(2, 2), torch.zeros(2, 2))["right_over_wrong"])
    with pytest.raises(ValueError, match="must both be \\(P, k\\)"):
        ranking_stats(torch.zeros(2, 3), torch.zeros(2, 2))


def test_cli_samples_grades_and_scores(tiny_tokenizer, tmp_path, capsys) -> None:
    policy = save_pretrained(tiny_glm(tiny_tokenizer), tmp_path / "policy", tiny_tokenizer)
    rm = RewardModel(tiny_glm(tiny_tokenizer, seed=1)).save(tmp_path / "rm", tiny_tokenizer)
    out = tmp_path / "report.json"
    report = main(["--policy", str(policy), "--rm", str(rm), "--n", "12", "--k", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["prompts"] > 0 and report["k"] == 2
    assert 0.0 <= report["sample_accuracy"] <= report["any_right"] <= 1.0
    assert str(rm) in report["reward_models"]
    assert "best-of-2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--policy", str(policy), "--rm", str(rm), "--k", "1"])
