"""The DPO stage on TRL 1.16: every trainer variant takes steps, DPO raises the held-out margin on a planted
preference, the LoRA reference is the adapter switched off, recipe mistakes are clear, `glmwb run` works."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from glmwb.align.dpo import DPORecipe, conversational_rows, load_pairs, make_trl_trainer, training_tokenizer
from glmwb.pretrain.errors import ConfigError
from glmwb.recipes.loader import build
from tests.rewards.conftest import planted_records, tiny_glm
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def policy_folder(tiny_tokenizer, tmp_path_factory):
    """A tiny random GLM saved as a GlmForCausalLM folder with the tiny tokenizer."""
    from glmwb.pretrain.hf import save_pretrained

    return str(
        save_pretrained(tiny_glm(tiny_tokenizer, seed=3), tmp_path_factory.mktemp("policy"), tiny_tokenizer)
    )


@pytest.fixture(scope="module")
def planted_file(tmp_path_factory):
    """Planted preference pairs (chosen answers carry a marker) with a few ties, as JSONL."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [r.to_dict() for r in planted_records(240, seed=1, tie_fraction=0.1)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return str(path)


def recipe(tmp_path, folder, data_path, **sections) -> DPORecipe:
    data = {
        "stage": "dpo",
        "run": {"dir": str(tmp_path / "run")},
        "data": {"source": "files", "paths": [data_path], "eval_fraction": 0.15, "max_length": 64},
        "model": {"init_from": folder},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0},
        "train": {"batch_size": 4, "max_steps": 2, "log_every": 1},
        "eval": {"world_prompts": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return build(DPORecipe, data, source="test recipe")


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["tiny", "glm4_official"])
def test_trl_rows_give_encode_chat_ids_with_the_terminator(tiny_tokenizer, glm4_tokenizer, which):
    """TRL's tokenisation of our rows (its own `_tokenize`, with the rows' chat_template_kwargs) ends the chosen
    answer with the eos token, on a tokenizer trained here and on the glm-4-9b-chat-hf stand-in (ids 151329..,
    GLM-4's official template, which training_tokenizer replaces by ours)."""
    from trl.data_utils import _tokenize

    from glmwb.pretrain.tokenizer import encode_chat

    base = tiny_tokenizer if which == "tiny" else glm4_tokenizer
    tok = training_tokenizer(base)
    row = conversational_rows(planted_records(1))[0]
    kwargs = row["chat_template_kwargs"]
    assert kwargs == {"sanitize_control_tokens": True, "end_final_turn": True}
    prompt_ids = _tokenize(tok, row["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
    full_ids = _tokenize(tok, row["prompt"] + row["chosen"], **kwargs)["input_ids"]
    want = encode_chat(tok, row["prompt"] + row["chosen"])
    assert full_ids == want["input_ids"] and full_ids[-1] == base.convert_tokens_to_ids("<|endoftext|>")
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the completion is everything after the prompt
    assert base.chat_template != tok.chat_template or which == "tiny"  # the caller's tokenizer is untouched


def test_ties_are_dropped_and_counted(tmp_path, policy_folder, planted_file):
    r = recipe(tmp_path, policy_folder, planted_file)
    train, held, facts = load_pairs(r.data, 0)
    assert facts["ties_dropped"]["train"] + facts["ties_dropped"]["heldout"] > 0
    assert (
        not any(x.tie for x in train + held)
        and len(train) + len(held) + sum(facts["ties_dropped"].values()) == 240
    )


@pytest.mark.parametrize(
    "variant",
    [
        {"loss": {"type": "sigmoid"}},
        {"loss": {"type": "ipo", "beta": 0.5}},
        {"loss": {"type": "robust", "label_smoothing": 0.1}},
        {"loss": {"type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}},
        {"trainer": "kto"},
        {"train": {"reference": "precomputed"}},
    ],
    ids=["sigmoid", "ipo", "robust", "simpo", "kto", "precomputed"],
)
def test_trl_variants_take_steps(tmp_path, policy_folder, planted_file, tiny_tokenizer, variant):
    r = recipe(tmp_path, policy_folder, planted_file, **variant)
    train, _, _ = load_pairs(r.data, 0)
    trainer = make_trl_trainer(r, policy_folder, train[:24], tiny_tokenizer, tmp_path / "trl")
    before = trainable(trainer.model)
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))[:5]}"


def test_lora_reference_is_the_adapter_switched_off(tmp_path, policy_folder, planted_file, tiny_tokenizer):
    """TRL keeps no second model with LoRA: its reference log-probs are the base's, before and after steps."""
    from accelerate.utils import is_peft_model
    from transformers import AutoModelForCausalLM, GlmForCausalLM

    r = recipe(tmp_path, policy_folder, planted_file, model={"lora": {"enabled": True, "r": 4, "alpha": 8}})
    train, _, _ = load_pairs(r.data, 0)
    gc.collect()
    alive_before = sum(isinstance(o, GlmForCausalLM) for o in gc.get_objects())
    trainer = make_trl_trainer(r, policy_folder, train[:16], tiny_tokenizer, tmp_path / "trl")
    gc.collect()
    assert trainer.ref_model is None and is_peft_model(trainer.model)
    assert sum(isinstance(o, GlmForCausalLM) for o in gc.get_objects()) - alive_before == 1  # the policy only
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_before = trainer.compute_ref_log_probs(trainer.model, batch)
    trainer.train()
    ref_after = trainer.compute_ref_log_probs(trainer.model, batch)
    base = AutoModelForCausalLM.from_pretrained(policy_folder, dtype=torch.float32)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    base_logps = (logp * (labels[:, 1:] != -100)).sum(1).chunk(2)
    for got in (ref_before, ref_after):
        for g, want in zip(got, base_logps, strict=True):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-3)
    with torch.no_grad():  # while the policy itself has moved away from the base
        policy_logits = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert not torch.allclose(policy_logits, logits, atol=1e-4)


def test_trl_precomputed_reference_equals_our_packed_log_probs(
    tmp_path, policy_folder, planted_file, tiny_tokenizer
):
    """TRL's tokenisation (with the terminator) and ours agree: the same reference log-probs per pair."""
    from glmwb.align.dpo import encode_heldout, heldout_logps
    from glmwb.pretrain.hf import load_pretrained

    r = recipe(tmp_path, policy_folder, planted_file, train={"reference": "precomputed"})
    train, _, _ = load_pairs(r.data, 0)
    trainer = make_trl_trainer(r, policy_folder, train[:12], tiny_tokenizer, tmp_path / "trl")
    ours = heldout_logps(load_pretrained(policy_folder), encode_heldout(tiny_tokenizer, train[:12], 64), 0)
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["ref_chosen_logps"]), ours[0], rtol=1e-4, atol=1e-3
    )
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["ref_rejected_logps"]), ours[1], rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("engine", ["trl", "packed"])
def test_dpo_raises_the_heldout_margin_on_a_planted_preference(tmp_path, policy_folder, planted_file, engine):
    from glmwb.align.dpo import run_dpo

    r = recipe(tmp_path, policy_folder, planted_file, engine=engine, train={"batch_size": 8, "max_steps": 25},
               loss={"beta": 0.5})  # fmt: skip
    summary = run_dpo(r)
    before, after = summary["before"]["pairs"], summary["after"]["pairs"]
    assert before["reward_margin"] == 0.0  # policy = reference before training
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["reward_margin"] > 0.5 and after["reward_accuracy"] >= 0.75
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_kernels_are_applied_to_the_policy(tmp_path, policy_folder, planted_file, tiny_tokenizer):
    r = recipe(tmp_path, policy_folder, planted_file,
               kernels={"rmsnorm": "triton", "swiglu": "torch", "rotary": "torch", "fused_ce": "torch",
                        "attention": "sdpa"}, train={"max_steps": 1})  # fmt: skip
    train, _, _ = load_pairs(r.data, 0)
    trainer = make_trl_trainer(r, policy_folder, train[:8], tiny_tokenizer, tmp_path / "trl")
    handle = trainer.model.__dict__["_kernel_handle"]
    assert handle.active and handle.replaced["rmsnorm"] > 0
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"loss": {"type": "cdpo"}}, "no conservative-DPO loss"),
        ({"trainer": "kto", "engine": "packed"}, "engine 'trl' only"),
        ({"engine": "packed", "model": {"lora": {"enabled": True}}}, "for LoRA use engine 'trl'"),
        ({"loss": {"label_smoothing": 0.6}}, r"label_smoothing must be a finite number in \[0, 0.5\)"),
        ({"loss": {"type": "dpo"}}, "loss.type must be one of"),
        ({"train": {"bacth_size": 3}}, "did you mean 'batch_size'"),
    ],
)
def test_recipe_mistakes_are_clear(tmp_path, policy_folder, planted_file, sections, message):
    with pytest.raises(ConfigError, match=message):
        recipe(tmp_path, policy_folder, planted_file, **sections)


def test_missing_policy_folder_is_a_recipe_error(tmp_path, planted_file):
    from glmwb.align.dpo import run_dpo

    with pytest.raises(ConfigError, match="model.init_from: no model folder"):
        run_dpo(recipe(tmp_path, str(tmp_path / "nope"), planted_file))


def test_glmwb_run_end_to_end(tmp_path, policy_folder, planted_file, capsys):
    from glmwb.pretrain.generate import load_policy
    from glmwb.recipes.cli import main

    run_dir = tmp_path / "e2e"
    code = main([
        "run", "recipes/dpo.yaml", f"run.dir={run_dir}", f"model.init_from={policy_folder}",
        "data.source=files", f"data.paths=[{planted_file}]", "data.max_length=64", "train.max_steps=2",
        "train.batch_size=4", "train.log_every=1", "eval.world_prompts=3", "eval.max_new_tokens=4", "train.num_threads=1",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "| accuracy |" in out and "implicit-reward margin" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["data"]["ties_dropped"]["train"] > 0
    for name in ("metrics.jsonl", "training.png", "eval/table.md", "config.yaml"):
        assert (run_dir / name).is_file(), name
    model, tok = load_policy(run_dir / "final")
    start, start_tok = load_policy(policy_folder)
    assert tok.chat_template == start_tok.chat_template  # not the training copy's
    from transformers import AutoConfig

    # every GLM turn terminator still stops generation (transformers' Trainer rewrites eos_token_id)
    assert (
        AutoConfig.from_pretrained(run_dir / "final").eos_token_id
        == AutoConfig.from_pretrained(policy_folder).eos_token_id
    )
    assert main(["run", "recipes/dpo.yaml", "loss.type=cdpo"]) == 2
