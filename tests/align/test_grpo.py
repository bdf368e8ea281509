"""GRPO / RLOO through TRL on a tiny GLM: a few steps train every parameter with a finite loss, GRPO raises a
reward that can be raised, generation stops at GLM's turn terminators, recipe mistakes are clear errors, and
`glmwb run recipes/grpo.yaml` runs end to end (tiny overrides)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glmwb.align.grpo import (
    GRPODataConfig,
    GRPOModelConfig,
    GRPORecipe,
    GRPOTrainConfig,
    PolicyLossConfig,
    SamplingConfig,
    build_trainer,
    load_policy_model,
    read_prompt_file,
    run_grpo,
)
from glmwb.align.reward_funcs import RuleReward
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.hf import save_pretrained
from glmwb.pretrain.model import GLM
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.tokenizer import turn_terminator_ids
from glmwb.recipes.cli import load_recipe, main
from tests.shared_data import SHARED_DATA
from tests.tiny import TINY, one_thread  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[2]
GSM8K = SHARED_DATA / "eval_gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def policy_folder(tiny_tokenizer, tmp_path_factory) -> str:
    """A random tiny GLM saved as a Hugging Face folder (+ tokenizer), eos ids = the turn terminators."""
    torch.manual_seed(0)
    cfg = TINY.with_(
        pad_token_id=tiny_tokenizer.pad_token_id, eos_token_ids=tuple(turn_terminator_ids(tiny_tokenizer))
    )
    folder = tmp_path_factory.mktemp("policy") / "policy"
    save_pretrained(GLM(cfg), folder, tiny_tokenizer)
    return str(folder)


def tiny_recipe(folder: str, tmp_path: Path, **sections) -> GRPORecipe:
    base = GRPORecipe(
        model=GRPOModelConfig(init_from=folder),
        data=GRPODataConfig(train_prompts=16),
        generation=SamplingConfig(num_generations=4, max_completion_length=8),
        optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0),
        train=GRPOTrainConfig(prompts_per_step=2, max_steps=3, log_every=1, num_threads=1),
    )
    recipe = replace(base, **sections)
    return replace(recipe, run=replace(recipe.run, dir=str(tmp_path / "run")))


def token_share(ids: set[int]):
    """A reward that can be raised: the share of a completion's tokens that are in ``ids``."""

    def share_of_tokens(prompts, completions, completion_ids, **_):
        return [sum(t in ids for t in c) / max(len(c), 1) for c in completion_ids]

    return share_of_tokens


def _rows(n: int = 16) -> list[dict]:
    from glmwb.align.grpo import world_rows
    from glmwb.pretrain.world import make_world

    return world_rows(make_world(seed=0, num_entities=96), "train", n, seed=0)


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_a_few_steps_train_every_parameter(policy_folder, tmp_path, trainer) -> None:
    recipe = tiny_recipe(policy_folder, tmp_path, trainer=trainer, algo=PolicyLossConfig(beta=0.05))
    model, tok = load_policy_model(policy_folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reward = token_share(set(range(100, 400)))
    t = build_trainer(recipe, model, tok, [reward], [1.0], _rows())
    assert set(t.eos_token_ids) == set(turn_terminator_ids(tok))  # sampling stops at GLM's terminators
    assert type(t).__name__ == {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}[trainer]
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("kl" in h for h in logs)  # beta > 0: a reference model is in the loss
    unchanged = [n for n, p in t.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def test_lora_trains_only_the_adapter(policy_folder, tmp_path) -> None:
    from glmwb.pretrain.settings import LoRAConfig

    recipe = tiny_recipe(
        policy_folder, tmp_path, model=GRPOModelConfig(policy_folder, LoRAConfig(enabled=True, r=4))
    )
    model, tok = load_policy_model(policy_folder)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = build_trainer(recipe, model, tok, [token_share(set(range(100, 400)))], [1.0], _rows())
    t.train()
    trainable = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(
        not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in trainable.items() if "lora_B" in n
    )
    merged = t.model.merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p.detach(), base[n])]
    assert changed and all(("proj" in n) for n in changed)  # only adapted linears differ once merged


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_a_learnable_reward_rises(policy_folder, tmp_path, trainer) -> None:
    """Reward = share of completion tokens among 80 of the 832 ids (about 0.1 at random); 25 steps of 16
    completions at lr 2e-2 must raise it to most of the tokens."""
    recipe = tiny_recipe(
        policy_folder,
        tmp_path,
        trainer=trainer,
        optim=OptimConfig(lr=2e-2, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0),
        train=GRPOTrainConfig(prompts_per_step=4, max_steps=25, log_every=1, num_threads=1),
    )
    model, tok = load_policy_model(policy_folder)
    t = build_trainer(recipe, model, tok, [token_share(set(range(200, 280)))], [1.0], _rows(64))
    t.train()
    rewards = [h["reward"] for h in t.state.log_history if "reward" in h]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.2 and last > 0.6, rewards


def test_generation_stops_are_set_from_the_tokenizer(policy_folder, tmp_path) -> None:
    # a folder that declares <|endoftext|> only (as many GLM folders do) still stops at <|user|> / <|observation|>
    folder = tmp_path / "eos_only"
    model, tok = load_policy_model(policy_folder)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model, _ = load_policy_model(str(folder))
    assert model.generation_config.eos_token_id == turn_terminator_ids(tok)


def test_recipe_mistakes_are_clear_errors(tmp_path, policy_folder) -> None:
    recipe_path = ROOT / "recipes" / "grpo.yaml"
    cases = {
        ("trainer=ppo",): r"trainer must be one of 'grpo', 'rloo'",
        ("trainer=rloo", "algo.loss_type=grpo"): r"algo.loss_type: not used by trainer 'rloo'",
        ("algo.normalize_advantages=true",): r"algo.normalize_advantages: not used by trainer 'grpo'",
        ("algo.loss_type=ppo",): r"algo.loss_type must be one of grpo, dr_grpo",
        ("generation.num_generations=1",): r"num_generations must be an integer >= 2",
        ("train.micro_batch=5",): r"micro_batch \(5\) must divide prompts_per_step x num_generations \(32\)",
        ("rewards=[{name: world_corect}]",): r"unknown reward 'world_corect'",
        ("rewards=[{name: rm}]",): r"reward 'rm' needs folder",
        ("rewards=[]",): r"rewards: name at least one reward",
        ("data.source=files", "data.paths=[x.jsonl]"): r"need world prompts \(data.source: world\)",
        ("model.init_from=null",): r"model.init_from: set it",
        ("generation.temprature=0.5",): r"unknown key 'generation.temprature'.*did you mean 'temperature'",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_recipe(recipe_path, list(overrides))
    # found when the stage runs: a missing policy folder, an unreachable reward server
    missing = load_recipe(recipe_path, [f"model.init_from={tmp_path / 'nope'}", f"run.dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=r"model.init_from: no model folder at .*nope"):
        run_grpo(missing)
    dead = load_recipe(
        recipe_path,
        [f"model.init_from={policy_folder}", f"run.dir={tmp_path / 'r'}", "data.train_prompts=4",
         "rewards=[{name: rm_http, url: 'http://127.0.0.1:9'}]"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"rewards: reward server http://127.0.0.1:9 is unreachable"):
        run_grpo(dead)


def test_prompt_files(tmp_path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text(
        '{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\\n#### 7"}\n'
        '{"prompt": [{"role": "user", "content": "2+2?"}], "gold": "4"}\n\n'
        '{"prompt": "Say hi."}\n'
    )
    rows = read_prompt_file(good, system_prompt="Be brief.")
    assert [r.get("gold") for r in rows] == ["7", "4", None]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"text": "no prompt here"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected fields 'question'.*got \['text'\]"):
        read_prompt_file(bad)
    bad.write_text('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(
        ConfigError, match=r"bad.jsonl:1: field 'prompt' must be chat messages ending with a user"
    ):
        read_prompt_file(bad)


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/eval_gsm8k is not beside the checkout")
def test_gsm8k_rows_carry_a_gold_the_rule_accepts() -> None:
    rows = read_prompt_file(GSM8K)
    assert len(rows) == 1319
    raw = [json.loads(x) for x in GSM8K.read_text().splitlines()[:50]]
    # the reference solution (its own "#### N" line) is correct by the gsm8k rule; another number is not
    prompts = [r["prompt"] for r in rows[:50]]
    gold = [r["gold"] for r in rows[:50]]
    assert RuleReward("gsm8k")(prompts, [r["answer"] for r in raw], gold=gold) == [1.0] * 50
    wrong = [f"#### {float(g) + 1}" for g in gold]
    assert RuleReward("gsm8k")(prompts, wrong, gold=gold) == [0.0] * 50


def test_glmwb_run_end_to_end(policy_folder, tmp_path, capsys) -> None:
    run_dir = tmp_path / "grpo"
    overrides = [
        f"run.dir={run_dir}", f"model.init_from={policy_folder}", "data.train_prompts=8",
        "rewards=[{name: world_correct}, {name: length, weight: 0.2}]",
        "generation.num_generations=2", "generation.max_completion_length=6",
        "train.prompts_per_step=2", "train.max_steps=2", "train.log_every=1", "train.num_threads=1",
        "eval.heldout_prompts=6", "eval.max_new_tokens=6",
    ]  # fmt: skip
    assert main(["run", str(ROOT / "recipes" / "grpo.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "| before |" in out and "| grpo |" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rewards"] == {"world_correct": 1.0, "length": 0.2}
    assert summary["budget"]["line"] == "2 of 2 steps" and not summary["budget"]["stopped_early"]
    assert json.loads((run_dir / "final" / "glmwb_run.json").read_text())["stage"] == "grpo"
    assert f"| grpo | {run_dir / 'final'} | grpo: 2 of 2 steps |" in out
    assert set(summary["eval"]["reports"]) == {"before", "grpo"}
    assert summary["eval"]["reports"]["before"]["n"] == 6
    for name in ("config.yaml", "metrics.jsonl", "rewards.png", "eval/table.md", "eval/answers.jsonl"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/world_correct/mean" in rows[0] and "rewards/length/mean" in rows[0]
    # the final folder: our loader and transformers both read it; generation stops at the terminators
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glmwb.pretrain.hf import load_pretrained

    final = run_dir / "final"
    load_pretrained(final)
    hf = AutoModelForCausalLM.from_pretrained(final)
    assert sorted(hf.generation_config.eos_token_id) == sorted(
        turn_terminator_ids(AutoTokenizer.from_pretrained(final))
    )
