"""Likelihood features (rewards/verifier.py): the answer's span, each feature against hand-computed values,
padded = packed, the weights learnt by the preference loss, the folder round trip, and bad settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.hf import save_pretrained
from glmwb.pretrain.tokenizer import encode_response
from glmwb.rewards.config import RewardLossConfig, RewardTrainConfig, VerifierConfig
from glmwb.rewards.data import encode_pairs
from glmwb.rewards.model import RewardModel, packed_batch, padded_batch, reward_pad_id, score_sequences
from glmwb.rewards.verifier import ASSISTANT_TOKEN, LikelihoodVerifier, answer_spans, token_features
from tests.rewards.conftest import planted_records, tiny_glm

ALL = ("contradiction", "contradiction_sum", "confident_misses", "logp_sum", "logp_min", "length")
PROMPTS = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "hi"}]]
ANSWERS = ["4, of course.", "hello there, the quick brown fox"]


def _verifier(tok, names=ALL, seed=1) -> LikelihoodVerifier:
    return LikelihoodVerifier(tiny_glm(tok, seed=seed), tok.convert_tokens_to_ids(ASSISTANT_TOKEN), names)


def test_answer_span_is_what_follows_the_assistant_token(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    seqs = [encode_response(tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    aid = tok.convert_tokens_to_ids(ASSISTANT_TOKEN)
    pad = reward_pad_id(tok)
    for batch in (padded_batch(seqs, pad), packed_batch(seqs, pad, row_tokens=256)):
        spans = answer_spans(batch["input_ids"], batch["score_index"], aid, batch.get("doc_ids"))
        for (row, first, last), seq, answer in zip(spans, seqs, ANSWERS, strict=True):
            ids = batch["input_ids"][row, first : last + 1].tolist()
            assert batch["input_ids"][row, first - 1] == aid
            assert ids == seq[len(seq) - len(ids) :]  # the sequence's tail, terminator included
            assert answer in tok.decode(ids)
            assert tok.decode(ids[-1:]) == "<|endoftext|>"


def test_features_against_hand_computed_values() -> None:
    # three answer tokens over a 3-token vocabulary
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    targets = torch.tensor(
        [1, 0, 0]
    )  # a miss where the LM was sure (0.7), its first choice, its first choice
    phi = token_features(probs.log(), targets, ALL)
    c1 = 0.7 * math.log(0.7 / 0.2)  # the only token off the LM's first choice
    expected = {
        "contradiction": c1 / 5.0,
        "contradiction_sum": c1 / 10.0,
        "confident_misses": 1 / 2.0,  # 0.7 > 0.5 and missed; the others hit
        "logp_sum": (math.log(0.2) + math.log(0.4) + math.log(0.9)) / 20.0,
        "logp_min": math.log(0.2) / 10.0,
        "length": 3 / 32.0,
    }
    assert phi.tolist() == pytest.approx([expected[n] for n in ALL], abs=1e-6)
    # opening (GLM's newline and the first word) vs body: a language switch is not a wrong value
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    split = ("opening_contradiction", "body_contradiction", "body_contradiction_sum", "body_confident_misses")
    phi = token_features(probs.log(), torch.tensor([0, 1, 1, 2]), split)
    opening, body = 0.7 * math.log(0.7 / 0.2), [0.4 * math.log(0.4 / 0.35), 0.9 * math.log(0.9 / 0.05)]
    assert phi.tolist() == pytest.approx([opening / 5, max(body) / 5, sum(body) / 10, 1 / 2], abs=1e-6)
    # an unsure miss is no confident miss
    unsure = token_features(torch.tensor([[0.45, 0.3, 0.25]]).log(), torch.tensor([1]), ALL)
    assert unsure[ALL.index("confident_misses")] == 0


def test_each_feature_scale_is_the_unit_its_comment_names() -> None:
    """VERIFIER_FEATURES divides each feature by its unit: built answers that hold exactly one unit of each
    read 1 (or -1 for the log-likelihoods). LM rows are log-probabilities over 3 tokens; a sure row has
    m = 1 (log m = 0)."""
    from glmwb.rewards.config import VERIFIER_FEATURES

    def features(rows, targets, names):
        return dict(
            zip(names, token_features(torch.tensor(rows), torch.tensor(targets), names).tolist(), strict=True)
        )

    sure = [0.0, -5.0, -5.0]  # sure of token 0; tokens 1 and 2 at p = e^-5
    plain = [0.0, -40.0, -40.0]  # sure of token 0, and token 0 is written: no regret
    # one contradicted sure belief of 5 nats in the body (after the 2-token opening), then two of them
    one = features([plain, plain, sure, plain], [0, 0, 1, 0], ("contradiction", "body_contradiction"))
    assert one == pytest.approx({"contradiction": 1.0, "body_contradiction": 1.0})
    two = features([plain, plain, sure, sure], [0, 0, 1, 2], ("contradiction_sum", "body_contradiction_sum"))
    assert two == pytest.approx({"contradiction_sum": 1.0, "body_contradiction_sum": 1.0})
    opening = features([sure, plain, plain], [1, 0, 0], ("opening_contradiction", "body_contradiction"))
    assert opening == pytest.approx({"opening_contradiction": 1.0, "body_contradiction": 0.0})
    # two confident misses (m = 0.6 > 0.5, another token written) in the body
    miss = [math.log(0.6), math.log(0.3), math.log(0.1)]
    misses = features([plain, plain, miss, miss], [0, 0, 1, 1], ("confident_misses", "body_confident_misses"))
    assert misses == pytest.approx({"confident_misses": 1.0, "body_confident_misses": 1.0})
    # 32 tokens at log p = -0.625, one of them at -10: the sum (-20 - 9.375) and min in their units
    flat = [[-0.625, -1.0, -1.0]] * 31 + [[-0.625, -10.0, -1.0]]
    lik = features(flat, [0] * 31 + [1], ("logp_sum", "logp_min", "length"))
    assert lik == pytest.approx({"logp_sum": (-0.625 * 31 - 10.0) / 20.0, "logp_min": -1.0, "length": 1.0})
    lik = features([[-0.625, -1.0, -1.0]] * 32, [0] * 32, ("logp_sum", "length"))
    assert lik == pytest.approx({"logp_sum": -1.0, "length": 1.0})
    assert set(VERIFIER_FEATURES) == {*ALL, "opening_contradiction", "body_contradiction",
                                      "body_contradiction_sum", "body_confident_misses"}  # fmt: skip


def test_padded_packed_and_reward_folder_round_trip(tiny_tokenizer, tmp_path) -> None:
    tok = tiny_tokenizer
    pad = reward_pad_id(tok)
    seqs = [encode_response(tok, p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    model = RewardModel(tiny_glm(tok), heads=["reward", "correctness"])
    plain = model(**padded_batch(seqs, pad)).detach()
    model.attach_verifier(_verifier(tok))
    # the weights start at zero: attaching changes nothing until training moves them
    assert torch.allclose(model(**padded_batch(seqs, pad)), plain, atol=1e-6)
    with torch.no_grad():
        model.verifier_weight.copy_(torch.randn(2, len(ALL)))
    padded = model(**padded_batch(seqs, pad))
    packed = model(**packed_batch(seqs, pad, row_tokens=256))
    assert torch.allclose(padded, packed, atol=1e-5) and not torch.allclose(padded, plain, atol=1e-3)
    # the same features one sequence at a time
    single = torch.cat([model.verifier(**_vb(padded_batch([s], pad))) for s in seqs])
    assert torch.allclose(single, model.verifier(**_vb(padded_batch(seqs, pad))), atol=1e-5)
    folder = model.save(tmp_path / "rm", tok)
    assert (folder / "verifier" / "config.json").is_file()
    loaded = RewardModel.from_pretrained(folder)
    assert loaded.verifier.names == ALL
    assert torch.allclose(score_sequences(loaded, seqs, pad), padded.detach(), atol=1e-5)
    # the verifier LM is frozen and never part of the Hugging Face classifier weights
    assert not any(p.requires_grad for p in loaded.verifier.parameters())
    assert not any(k.startswith("verifier") for k in loaded.hf_state_dict())


def _vb(batch):
    return {k: batch[k] for k in ("input_ids", "score_index", "attention_mask")}


def _shorter_wins(tok, records):
    """The planted preference: of two answers, the one with fewer tokens (by a margin of two) is better."""
    out = []
    for r in records:
        a, b = sorted((r.chosen, r.rejected), key=lambda s: len(tok(s)["input_ids"]))
        if len(tok(a)["input_ids"]) + 1 < len(tok(b)["input_ids"]):
            out.append(r.__class__.from_dict({"prompt": r.prompt, "chosen": a, "rejected": b}))
    return out


def _train_frozen_backbone(model, tok, train, held, run_dir, **train_cfg):
    """``train_reward_model`` with the backbone's and head's lr ~0 (only the verifier weights can learn)."""
    from glmwb.pretrain.optim import OptimConfig
    from glmwb.rewards.train import train_reward_model

    return train_reward_model(
        model, tok, train, held, RewardLossConfig(tie_model="drop"),
        OptimConfig(lr=1e-12, warmup_steps=0, weight_decay=0.0),
        RewardTrainConfig(batch_size=16, eval_every=1000, log_every=10, **train_cfg),
        run_dir, reward_pad_id(tok), log=lambda s: None,
    )  # fmt: skip


def test_the_preference_loss_learns_the_feature_weights(tiny_tokenizer, tmp_path) -> None:
    """Planted: the shorter answer is better. With the backbone's lr at zero, only the verifier weights can
    learn it, through the `length` feature: its weight turns negative and held-out accuracy is high."""

    tok = tiny_tokenizer
    train, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(200, seed=0)), 96)
    held, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(80, seed=1)), 96)
    model = RewardModel(tiny_glm(tok)).attach_verifier(_verifier(tok, names=("length", "logp_sum")))
    head_before = model.score.weight.detach().clone()
    summary = _train_frozen_backbone(model, tok, train, held, tmp_path, max_steps=30, verifier_lr=0.1)
    assert torch.allclose(model.score.weight, head_before, atol=1e-6)  # lr ~0: only the verifier moved
    assert model.verifier_weight[0, 0] < -0.5, model.verifier_weight
    assert summary["eval_before"]["accuracy"] < 0.8
    assert summary["eval_after"]["accuracy"] > 0.9, summary["eval_after"]


def test_prefit_fits_the_feature_weights_alone(tiny_tokenizer, tmp_path) -> None:
    """train.verifier_prefit_pairs: the weights are fitted on cached features before training (L-BFGS on
    the same loss); the backbone and head stay as they were; the planted "shorter wins" is found at once."""
    from glmwb.rewards.train import TieParameter, prefit_verifier

    tok = tiny_tokenizer
    train, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(200, seed=0)), 96)
    held, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(80, seed=1)), 96)
    model = RewardModel(tiny_glm(tok)).attach_verifier(_verifier(tok, names=("length", "logp_sum")))
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("verifier")}
    tie = TieParameter("davidson", 1.0, 1, learn=True)
    fit = prefit_verifier(model, train, reward_pad_id(tok), RewardLossConfig(tie_model="davidson"), tie)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fit["loss_after"] < fit["loss_before"] and fit["train_accuracy"] > 0.9, fit
    assert model.verifier_weight[0, 0] < -0.5
    assert fit["weight"][0][0] == pytest.approx(model.verifier_weight[0, 0].item(), rel=1e-6)
    assert tie().item() < 0.5  # no ties in these pairs: Davidson's nu is driven down with the weights
    # inside the trainer, with the backbone's lr ~0: held-out accuracy is high before the first step
    model = RewardModel(tiny_glm(tok)).attach_verifier(_verifier(tok, names=("length", "logp_sum")))
    summary = _train_frozen_backbone(
        model, tok, train, held, tmp_path, max_steps=1, verifier_prefit_pairs=150
    )
    assert summary["verifier_prefit"]["pairs"] == 150
    assert summary["eval_before"]["accuracy"] > 0.9, summary["eval_before"]
    with pytest.raises(ValueError, match="verifier_prefit_pairs must be >= 0"):
        RewardTrainConfig(verifier_prefit_pairs=-1)


def test_bad_verifier_settings_are_named(tiny_tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown \\['sarcasm'\\].*choose from"):
        VerifierConfig(enabled=True, features=("length", "sarcasm"))
    with pytest.raises(ValueError, match="needs a causal-LM"):
        lm = tiny_glm(tiny_tokenizer)
        lm.lm_head = None
        LikelihoodVerifier(lm, 5)
    # a reward folder is no verifier LM: the recipe says so before training
    from glmwb.recipes.loader import build
    from glmwb.rewards.config import RewardRecipe
    from glmwb.rewards.run import build_model

    base = save_pretrained(tiny_glm(tiny_tokenizer), tmp_path / "base", tiny_tokenizer)
    rm = RewardModel(tiny_glm(tiny_tokenizer)).save(tmp_path / "rm", tiny_tokenizer)
    recipe = build(
        RewardRecipe, {"model": {"init_from": str(base), "verifier": {"enabled": True, "lm": str(rm)}}}
    )
    with pytest.raises(ConfigError, match="not a causal-LM GLM folder"):
        build_model(recipe, tiny_tokenizer)
    recipe = build(RewardRecipe, {"model": {"init_from": str(base), "verifier": {"enabled": True}}})
    model = build_model(recipe, tiny_tokenizer)
    assert model.verifier is not None and model.verifier_weight.shape == (1, 4)


def test_a_folder_with_gated_feature_weights_is_refused_by_name(tiny_tokenizer, tmp_path) -> None:
    """Feature weights are plain (W · φ): a folder whose reward_config.json says ``verifier_gate: true`` is
    refused with one line naming the folder; ``verifier_gate: false`` reads as the plain weights it is."""
    import json

    tok = tiny_tokenizer
    model = RewardModel(tiny_glm(tok)).attach_verifier(_verifier(tok))
    folder = model.save(tmp_path / "rm", tok)
    config = json.loads((folder / "reward_config.json").read_text())
    assert "verifier_gate" not in config
    (folder / "reward_config.json").write_text(json.dumps({**config, "verifier_gate": False}))
    assert RewardModel.from_pretrained(folder).verifier_weight.shape == (1, len(ALL))
    (folder / "reward_config.json").write_text(json.dumps({**config, "verifier_gate": True}))
    with pytest.raises(ValueError, match=f"{folder}: its feature weights are gated"):
        RewardModel.from_pretrained(folder)


def test_value_first_fits_the_value_weights_after_the_head(tiny_tokenizer, tmp_path) -> None:
    """train.value_first: the feature weights stay at 0 while the backbone and head train on the form pairs
    (the verifier prefit is skipped), then are fitted on the value pairs (planted: the shorter answer is
    better, which only the `length` feature sees) and scaled by the best of train.value_scales."""
    from glmwb.pretrain.optim import OptimConfig
    from glmwb.rewards.train import train_reward_model

    tok = tiny_tokenizer
    form, _ = encode_pairs(tok, planted_records(64, seed=2), 96)
    value, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(200, seed=0)), 96)
    held, _ = encode_pairs(tok, _shorter_wins(tok, planted_records(80, seed=1)), 96)
    model = RewardModel(tiny_glm(tok)).attach_verifier(_verifier(tok, names=("length", "logp_sum")))
    with torch.no_grad():
        model.verifier_weight.fill_(1.0)  # whatever it held: zero while the head trains
    scales = (1.0, 2.0, 4.0)
    summary = train_reward_model(
        model, tok, form, held, RewardLossConfig(tie_model="davidson"),
        OptimConfig(lr=1e-12, warmup_steps=0, weight_decay=0.0),
        RewardTrainConfig(batch_size=16, max_steps=3, eval_every=1000, verifier_prefit_pairs=150,
                          value_scales=scales),
        tmp_path, reward_pad_id(tok), log=lambda s: None, value_pairs=value,
    )  # fmt: skip
    assert "verifier_prefit" not in summary
    assert summary["eval_before"]["accuracy"] < 0.8  # W = 0 and an untrained head: no value check yet
    fit = summary["value_first"]
    assert fit["value_pairs"] == len(value) and fit["form_pairs"] == len(form)
    by_scale = fit["train_accuracy_by_scale"]
    assert set(by_scale) == set(scales) and by_scale[fit["scale"]] == max(by_scale.values())
    assert fit["fit"]["loss_after"] < fit["fit"]["loss_before"]
    w, tau = model.verifier_weight[0], fit["temperature"]
    assert w[0] < 0 and w.tolist() == pytest.approx(
        [tau * fit["scale"] * x for x in fit["fit"]["weight"][0]], rel=1e-5
    )  # the fitted weights times the chosen scale, and the whole reward times the temperature
    assert fit["loss_after_temperature"] <= fit["loss_before_temperature"] + 1e-9
    assert summary["eval_after"]["accuracy"] > 0.9, summary["eval_after"]
    with pytest.raises(ValueError, match="value_scales must be positive"):
        RewardTrainConfig(value_scales=(1.0, 0.0))


def test_value_scale_is_the_one_that_ranks_the_most_strict_pairs_right() -> None:
    """train.value_scales on gaps where the answer is known: the head prefers the wrong answer on two strict
    pairs by 1, the fitted value weights prefer the right one by 0.6. x1 gets them wrong (1/3 right), x2 and
    x3 get all three right and x2, nearer the fit's own weights, is chosen; a tie pair does not count."""
    from glmwb.rewards.train import best_value_scale

    head_gap = torch.tensor([-1.0, -1.0, 2.0, 5.0], dtype=torch.float64)
    value_gap = torch.tensor([0.6, 0.6, -0.1, -3.0], dtype=torch.float64)
    strict = torch.tensor([True, True, True, False])  # the last pair is a tie: no say in the choice
    best, accuracy = best_value_scale(head_gap, value_gap, strict, (1, 2, 3))
    assert accuracy == pytest.approx({1.0: 1 / 3, 2.0: 1.0, 3.0: 1.0})
    assert best == 2.0
    assert best_value_scale(head_gap, value_gap, strict, (0.5, 1))[0] == 1.0  # both 1/3: the fit's own
    assert (
        best_value_scale(head_gap, value_gap, strict, (1, 5))[0] == 5.0
    )  # 5: -1 + 3 > 0 on both, 2 - 0.5 > 0


def test_value_first_refuses_what_it_cannot_split(tiny_tokenizer, tmp_path) -> None:
    from glmwb.recipes.loader import build
    from glmwb.rewards.config import RewardRecipe
    from glmwb.rewards.run import split_value_first

    base = save_pretrained(tiny_glm(tiny_tokenizer), tmp_path / "base", tiny_tokenizer)
    cfg = {
        "model": {"init_from": str(base), "verifier": {"enabled": True}},
        "train": {"value_first": "correctness"},
    }
    recipe = build(RewardRecipe, cfg)
    records = planted_records(6, seed=0)
    for i, r in enumerate(records):
        if i != 3:  # row 4 has no correctness label
            r.attributes["correctness"] = i % 2
    with pytest.raises(ConfigError, match=r"records \[4\] \(1 of 6\) have no attributes.correctness"):
        split_value_first(recipe, records)
    records[3].attributes["correctness"] = -1
    form, value = split_value_first(recipe, records)
    assert [records.index(r) for r in form] == [0, 2, 4] and [records.index(r) for r in value] == [1, 3, 5]
    for r in records:
        r.attributes["correctness"] = 1
    with pytest.raises(ConfigError, match="0 records call it equal and 6 do not"):
        split_value_first(recipe, records)
    no_features = build(RewardRecipe, {**cfg, "model": {"init_from": str(base)}})
    with pytest.raises(ConfigError, match="needs model.verifier.enabled: true"):
        split_value_first(no_features, records)


def test_reward_recipe_runs_value_first_on_the_world(tiny_tokenizer, tmp_path, capsys) -> None:
    """recipes/reward.yaml as shipped (value_first: correctness) on a tiny base: the world's records carry the
    correctness attribute, the split and both fits run, and the summary says what was fitted."""
    from glmwb.recipes.cli import main

    base = save_pretrained(tiny_glm(tiny_tokenizer), tmp_path / "base", tiny_tokenizer)
    code = main([
        "run", "recipes/reward.yaml", f"run.dir={tmp_path}/run", f"model.init_from={base}",
        "data.world.train_prompts=64", "data.world.heldout_prompts=32", "train.max_steps=2", "train.batch_size=8",
        "train.max_minutes=null", "eval.likelihood_baseline=null",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "value first (correctness):" in out and "value weights fitted on" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    fit = summary["value_first"]
    assert fit["value_pairs"] + fit["form_pairs"] == 64 and fit["value_pairs"] > 0 and fit["form_pairs"] > 0
    assert fit["scale"] in (1.0, 1.5, 2.0, 3.0, 5.0) and fit["temperature"] > 0
