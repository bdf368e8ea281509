"""The reward trainer: learns a planted preference, every trainable parameter moves, golden equivalences
(1 x 8 = 8 x 1, resume = never stopped, packed = padded), LoRA, the ties model, and the recipe end to end."""

from __future__ import annotations

import json

import pytest
import torch

from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.settings import LoRAConfig
from glmwb.rewards.config import RewardLossConfig, RewardTrainConfig
from glmwb.rewards.data import encode_pairs
from glmwb.rewards.model import RewardModel, reward_pad_id
from glmwb.rewards.train import apply_lora, pair_rewards, train_reward_model
from tests.rewards.conftest import planted_records, tiny_glm


@pytest.fixture(scope="module")
def planted(tiny_tokenizer):
    train, _ = encode_pairs(tiny_tokenizer, planted_records(320, seed=0), 96)
    held, _ = encode_pairs(tiny_tokenizer, planted_records(100, seed=1), 96)
    return train, held


def _train(tok, pairs, run_dir, loss=None, optim=None, model=None, lora=False, evaluate=True, **train_kw):
    model = model or RewardModel(tiny_glm(tok))
    pairs = pairs if evaluate else (pairs[0], [])
    cfg = RewardTrainConfig(
        **{"batch_size": 8, "max_steps": 6, "eval_every": 1000, "log_every": 1, **train_kw}
    )
    summary = train_reward_model(
        model, tok, pairs[0], pairs[1], loss or RewardLossConfig(tie_model="drop"),
        optim or OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0), cfg, run_dir, reward_pad_id(tok),
        lora=lora, log=lambda s: None,
    )  # fmt: skip
    return model, summary


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def test_learns_a_planted_preference(planted, tiny_tokenizer, tmp_path) -> None:
    before = RewardModel(tiny_glm(tiny_tokenizer))
    model, summary = _train(tiny_tokenizer, planted, tmp_path, max_steps=20, eval_every=10)
    assert summary["eval_before"]["accuracy"] < 0.75
    assert summary["eval_after"]["accuracy"] > 0.9, summary["eval_after"]
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        assert not torch.equal(p, q), f"{name} did not change"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert all(map(torch.isfinite, torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
    assert (tmp_path / "training.png").stat().st_size > 5000
    ckpt = tmp_path / "checkpoints" / "step_000020"
    assert {"config.json", "model.safetensors", "trainer_state.pt", "reward_config.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert model.info.reward_std[0] > 0


def test_grad_accumulation_1x8_equals_8x1(planted, tiny_tokenizer, tmp_path) -> None:
    # weights and ties vary across pairs, so the step-level normalisation matters
    loss = RewardLossConfig(tie_model="davidson", centering=0.1)
    pairs = ([p.__class__(**{**p.__dict__, "weight": 0.5 + (i % 3), "tie": i % 4 == 0,
              "labels": (0 if i % 4 == 0 else 1,)}) for i, p in enumerate(planted[0][:64])], [])  # fmt: skip
    big, _ = _train(tiny_tokenizer, pairs, tmp_path / "a", loss, batch_size=8, grad_accum=1, max_steps=3)
    small, _ = _train(tiny_tokenizer, pairs, tmp_path / "b", loss, batch_size=1, grad_accum=8, max_steps=3)
    assert _max_diff(big, small) < 2e-5


def test_resume_equals_never_stopped(planted, tiny_tokenizer, tmp_path) -> None:
    loss = RewardLossConfig(tie_model="davidson")
    kw = {"evaluate": False, "max_steps": 4}
    straight, _ = _train(tiny_tokenizer, planted, tmp_path / "a", loss, **kw)
    _, first = _train(tiny_tokenizer, planted, tmp_path / "b", loss, max_minutes=0.0, **kw)
    assert first["stopped_early"] and first["steps"] == 1
    resumed, summary = _train(tiny_tokenizer, planted, tmp_path / "b", loss, **kw)
    assert summary["start_step"] == 1 and _max_diff(straight, resumed) < 1e-6
    assert straight.info.tie_params == pytest.approx(resumed.info.tie_params)


def test_packed_batches_give_the_padded_loss_and_gradients(planted, tiny_tokenizer) -> None:
    pad = reward_pad_id(tiny_tokenizer)
    pairs = planted[0][:6]
    results = []
    for packing in (False, True):
        model = RewardModel(tiny_glm(tiny_tokenizer))
        c, r, _ = pair_rewards(model, pairs, pad, packing, pack_tokens=128, device="cpu")
        (c - r).sum().backward()
        results.append((c.detach(), r.detach(), [p.grad.clone() for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = results
    assert torch.allclose(c0, c1, atol=1e-5) and torch.allclose(r0, r1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1, strict=True))


def test_gradient_checkpointing_changes_nothing(planted, tiny_tokenizer, tmp_path) -> None:
    plain, _ = _train(tiny_tokenizer, planted, tmp_path / "a", max_steps=2, evaluate=False)
    ckpt, _ = _train(
        tiny_tokenizer, planted, tmp_path / "b", max_steps=2, evaluate=False, gradient_checkpointing=True
    )
    assert _max_diff(plain, ckpt) < 1e-6


def test_head_lr_moves_the_head_alone_at_its_own_pace(planted, tiny_tokenizer, tmp_path) -> None:
    # one AdamW step from the same init: |update| ~ lr element-wise, so the head moves head_lr / lr times as
    # far and every backbone weight exactly as without head_lr
    init = RewardModel(tiny_glm(tiny_tokenizer))
    optim = OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0)
    runs = {}
    for name, head_lr in (("plain", None), ("fast", 1e-2)):
        model = RewardModel(tiny_glm(tiny_tokenizer))
        model.load_state_dict(init.state_dict())
        runs[name], _ = _train(tiny_tokenizer, planted, tmp_path / name, model=model, optim=optim,
                               max_steps=1, evaluate=False, head_lr=head_lr)  # fmt: skip
    moved = {n: float((runs[n].score.weight - init.score.weight).detach().abs().max()) for n in runs}
    assert 8 < moved["fast"] / moved["plain"] < 12, moved
    assert _max_diff(runs["plain"].backbone, runs["fast"].backbone) == 0.0
    with pytest.raises(ValueError, match="head_lr must be > 0"):
        RewardTrainConfig(head_lr=0.0)


def test_lora_trains_adapters_and_head_only_and_saves_merged(planted, tiny_tokenizer, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = apply_lora(RewardModel(tiny_glm(tiny_tokenizer)), LoRAConfig(enabled=True, r=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all("lora_" in n or n == "score.weight" for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
    }
    model, _ = _train(tiny_tokenizer, planted, tmp_path, model=model, lora=True, max_steps=12,
                      optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0))  # fmt: skip
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(
        not torch.equal(params[n], p) for n, p in trainable.items() if "lora_B" in n or n == "score.weight"
    )
    folder = tmp_path / "checkpoints" / "step_000012"  # a plain GlmForSequenceClassification, adapters merged
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    pair = planted[1][0]
    ids = torch.tensor([pair.chosen_ids])
    model.eval()
    with torch.no_grad():
        ours = model(ids, score_index=torch.tensor([ids.shape[1] - 1]))
        assert torch.allclose(hf(input_ids=ids).logits, ours, atol=1e-5)
        assert torch.allclose(
            RewardModel.from_pretrained(folder)(ids, torch.tensor([ids.shape[1] - 1])), ours, atol=1e-5
        )


@pytest.mark.parametrize("tie_model", ["davidson", "rao_kupper"])
def test_ties_model_learns_that_ties_are_close(tiny_tokenizer, tmp_path, tie_model) -> None:
    records = planted_records(320, seed=0, tie_fraction=0.4)
    train, _ = encode_pairs(tiny_tokenizer, records, 96)
    held, _ = encode_pairs(tiny_tokenizer, planted_records(100, seed=1, tie_fraction=0.4), 96)
    init = 1.0 if tie_model == "davidson" else 2.0
    loss = RewardLossConfig(tie_model=tie_model, tie_param=init)
    model, summary = _train(tiny_tokenizer, (train, held), tmp_path, loss, max_steps=24, eval_every=24)
    after = summary["eval_after"]
    assert after["accuracy"] > 0.9 and after["tie_gap"] < after["strict_gap"] / 2, after
    assert (
        after["three_way_accuracy"] > 0.7
        and after["mean_tie_prob_on_ties"] > after["mean_tie_prob_on_strict"]
    )
    assert model.info.tie_model == tie_model and model.info.tie_params[0] != pytest.approx(init)


def test_attribute_heads_learn_their_own_labels(tiny_tokenizer, tmp_path) -> None:
    """Head 'marker' learns the planted preference from per-attribute labels, opposite to the overall one."""
    from dataclasses import replace

    def flip(records):  # overall: prefer the answer WITHOUT the marker; attribute 'marker': prefer it
        return [replace(r, chosen=r.rejected, rejected=r.chosen, attributes={"marker": -1}) for r in records]

    heads = ("reward", "marker")
    train, _ = encode_pairs(tiny_tokenizer, flip(planted_records(320, seed=0)), 96, heads=heads)
    held, _ = encode_pairs(tiny_tokenizer, flip(planted_records(100, seed=1)), 96, heads=heads)
    model = RewardModel(tiny_glm(tiny_tokenizer), heads=list(heads))
    _, summary = _train(tiny_tokenizer, (train, held), tmp_path, model=model, max_steps=24, eval_every=24)
    assert summary["eval_after"]["accuracy"] > 0.9 and summary["eval_after"]["accuracy/marker"] > 0.9


def _run_tiny_reward_recipe(tokenizer, tmp_path, *overrides: str) -> int:
    """``glmwb run recipes/reward.yaml`` on a tiny random-init GLM (a random init has no language model for
    the verifier features to read, so they are off)."""
    from glmwb.recipes.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    return main([
        "run", "recipes/reward.yaml", f"run.dir={tmp_path}/run", "model.init_from=null", f"data.tokenizer={tmp_path}/tok",
        "model.config={vocab_size: 832, hidden_size: 48, intermediate_size: 80, num_layers: 2, num_heads: 4, "
        "num_kv_heads: 2, head_dim: 12}", "model.verifier.enabled=false", "train.value_first=null", *overrides,
    ])  # fmt: skip


def test_reward_recipe_end_to_end(tiny_tokenizer, tmp_path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    from glmwb.recipes.cli import main

    code = _run_tiny_reward_recipe(
        tiny_tokenizer, tmp_path, "data.world.train_prompts=64", "data.world.heldout_prompts=48", "train.max_steps=4",
        "train.batch_size=8", "train.eval_every=2", "eval.ensemble=1", "train.packing=true", "train.max_minutes=null",
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "agreement ceiling" in out and "of ceiling" in out and "training stopped at step" not in out
    assert "\n  length: longer answer wins " in out  # under the held-out accuracy
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lb = summary["eval"]["length_baseline"]
    assert lb["strict_pairs"] > 0 and 0 <= lb["longer_wins"] <= 1 and lb["balanced"]["within"] == 0.1
    world = summary["eval"]["world"]
    assert world["pairs"] > 0 and 0.9 < world["ceiling"] < 1 and "meets_target" in world
    assert summary["eval"]["ensemble"]["members"] == 2
    for name in ("metrics.json", "reliability.png", "distributions.png"):
        assert (tmp_path / "run" / "eval" / name).stat().st_size > 100
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")).__name__ == (
        "GlmForSequenceClassification"
    )
    assert main(["run", "recipes/reward.yaml", f"run.dir={tmp_path}/x", "model.init_from=/nowhere"]) == 2
    assert "model.init_from: no model folder" in capsys.readouterr().err


def test_a_reward_run_cut_short_by_the_clock_says_so(tiny_tokenizer, tmp_path, capsys) -> None:
    code = _run_tiny_reward_recipe(
        tiny_tokenizer, tmp_path, "data.world.train_prompts=32", "data.world.heldout_prompts=24", "train.max_steps=5",
        "train.batch_size=4", "train.max_minutes=0.0001", "eval.ensemble=0",
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "note: training stopped early at step 1 of 5 (train.max_minutes=0.0001 reached)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["budget"]["steps_done"] == 1
    record = json.loads((tmp_path / "run" / "final" / "glmwb_run.json").read_text())
    assert record["stopped_early"] and record["reason"] == "train.max_minutes=0.0001 reached"


def test_auxiliary_lm_loss_keeps_a_frozen_lm_head_that_is_never_saved(
    planted, tiny_tokenizer, tmp_path
) -> None:
    from safetensors.torch import load_file

    from glmwb.pretrain.hf import save_pretrained

    save_pretrained(tiny_glm(tiny_tokenizer), tmp_path / "base", tokenizer=tiny_tokenizer)
    model = RewardModel.from_pretrained(tmp_path / "base", keep_lm_head=True)
    head = model.backbone.lm_head.weight.detach().clone()
    loss = RewardLossConfig(tie_model="drop", lm_coef=1.0)
    model, summary = _train(
        tiny_tokenizer, planted, tmp_path / "run", loss, model=model, max_steps=3, evaluate=False
    )
    assert torch.equal(model.backbone.lm_head.weight, head)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 1.0 for r in rows if r["kind"] == "train")  # BT (~0.7) + next-token loss (~6.7)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_000003" / "model.safetensors")
    assert "lm_head.weight" not in saved and "score.weight" in saved
    with pytest.raises(ValueError, match="no lm_head"):
        RewardModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_000003", keep_lm_head=True)
