"""Reward-model ensembles: the mean (minus a disagreement penalty) of members, saved as a reward folder whose
member 0 still loads alone, scored through RewardScorer, and trained by the reward recipe (model.ensemble)."""

from __future__ import annotations

import json

import pytest
import torch

from glmwb.pretrain.tokenizer import encode_response
from glmwb.rewards.ensemble import ENSEMBLE_FILE, RewardEnsemble, is_ensemble, load_reward_model
from glmwb.rewards.model import RewardModel, padded_batch, reward_pad_id
from glmwb.rewards.scoring import RewardScorer
from tests.rewards.conftest import tiny_glm

PROMPTS = ["What is 2+2?", "Where does Tasel live?", [{"role": "user", "content": "你好"}]]
RESPONSES = ["4", "Tasel lives in Iswenford, I think.", "你好！"]


def _members(tok, n=3, heads=("reward", "correctness")) -> list[RewardModel]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(RewardModel(tiny_glm(tok, seed), heads=list(heads)).eval())
    return out


def _batch(tok):
    seqs = [
        encode_response(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p, r)
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    return padded_batch(seqs, reward_pad_id(tok))


def test_ensemble_is_the_members_mean_minus_penalty_times_std(tiny_tokenizer) -> None:
    members, batch = _members(tiny_tokenizer), _batch(tiny_tokenizer)
    with torch.no_grad():
        each = torch.stack([m(**batch) for m in members])  # (3, N, K)
        assert not torch.allclose(each[0], each[1])  # different seeds, different rewards
        mean = RewardEnsemble(members)(**batch)
        cautious = RewardEnsemble(members, penalty=0.5)(**batch)
    assert torch.allclose(mean, each.mean(0), atol=1e-6)
    assert torch.allclose(cautious, each.mean(0) - 0.5 * each.std(0), atol=1e-6)
    assert (cautious <= mean + 1e-7).all()


def test_saved_ensemble_loads_as_one_and_member_zero_alone(tiny_tokenizer, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    members, batch = _members(tiny_tokenizer), _batch(tiny_tokenizer)
    ensemble = RewardEnsemble(members, penalty=0.25)
    ensemble.info.reward_mean, ensemble.info.reward_std = [0.1, 0.0], [3.0, 1.0]
    folder = ensemble.save(tmp_path / "ens", tiny_tokenizer)
    assert is_ensemble(folder) and json.loads((folder / ENSEMBLE_FILE).read_text())["members"] == [
        "members/1",
        "members/2",
    ]
    loaded = load_reward_model(folder)
    assert isinstance(loaded, RewardEnsemble) and loaded.penalty == 0.25
    with torch.no_grad():
        assert torch.allclose(loaded(**batch), ensemble(**batch), atol=1e-5)
        alone = RewardModel.from_pretrained(folder)  # the folder is member 0's reward folder too
        assert torch.allclose(alone(**batch), members[0](**batch), atol=1e-5)
    hf = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(hf).__name__ == "GlmForSequenceClassification"
    assert isinstance(load_reward_model(folder / "members" / "1"), RewardModel)

    scorer = RewardScorer.from_pretrained(folder, device="cpu")
    with torch.no_grad():
        expected = ensemble(**batch)[:, 0]
    assert scorer.score(PROMPTS, RESPONSES) == pytest.approx(expected.tolist(), abs=1e-5)
    normalized = scorer.score(PROMPTS, RESPONSES, normalize=True)  # the ensemble's own statistics
    assert normalized == pytest.approx(((expected - 0.1) / 3.0).tolist(), abs=1e-5)
    assert load_reward_model(folder, penalty=0.0).penalty == 0.0


def test_bad_ensembles_are_refused(tiny_tokenizer, tmp_path) -> None:
    one_head = _members(tiny_tokenizer, 1, heads=("reward",))
    with pytest.raises(ValueError, match="at least 2"):
        RewardEnsemble(one_head)
    with pytest.raises(ValueError, match="member 1 has heads"):
        RewardEnsemble([*_members(tiny_tokenizer, 1), *one_head])
    with pytest.raises(ValueError, match="penalty must be >= 0"):
        RewardEnsemble(_members(tiny_tokenizer, 2), penalty=-1.0)
    folder = RewardEnsemble(_members(tiny_tokenizer, 2)).save(tmp_path / "ens", tiny_tokenizer)
    (folder / ENSEMBLE_FILE).write_text(json.dumps({"members": ["members/9"]}))
    with pytest.raises(FileNotFoundError, match="members/9 has no config.json"):
        load_reward_model(folder)


def test_reward_recipe_trains_an_ensemble(tiny_tokenizer, tmp_path, capsys) -> None:
    from glmwb.recipes.cli import main

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    args = [
        "run", "recipes/reward.yaml", f"run.dir={tmp_path}/run", "model.init_from=null", f"data.tokenizer={tmp_path}/tok",
        "model.config={vocab_size: 832, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 4, "
        "num_kv_heads: 2, head_dim: 8}",
        "data.world.train_prompts=48", "data.world.heldout_prompts=32", "train.max_steps=3", "train.batch_size=8",
        "train.eval_every=0", "train.max_minutes=null", "model.verifier.enabled=false", "train.value_first=null", "model.ensemble=3",
        "eval.likelihood_baseline=null",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ensemble member 3 of 3" in out
    final = tmp_path / "run" / "final"
    assert is_ensemble(final) and (final / "members" / "2" / "config.json").is_file()
    assert not (tmp_path / "run" / "ensemble_1").exists()  # moved into final/members/
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ens = summary["eval"]["ensemble"]
    assert (
        ens["members"] == 3
        and len(ens["member_accuracy"]) == 3
        and len(ens["member_fraction_of_ceiling"]) == 3
    )
    info = json.loads((final / "ensemble_config.json").read_text())
    assert info["reward_std"][0] > 0 and "eval" in info["extra"]
    loaded = load_reward_model(final)
    assert isinstance(loaded, RewardEnsemble) and len(loaded.members) == 3
    assert main([*args, "eval.ensemble=1", f"run.dir={tmp_path}/run2"]) == 2
    assert "set eval.ensemble: 0" in capsys.readouterr().err
