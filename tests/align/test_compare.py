"""The equal-budget scheduler (every method of compare_methods.yaml plans, and stops at, the same steps), KL
to the start policy, and the comparison table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from glmwb.align.compare import (
    budget_overrides,
    check_same_budget,
    comparison_rows,
    format_comparison,
    kl_to_reference,
    planned_steps,
)
from glmwb.pretrain.errors import ConfigError
from glmwb.recipes.cli import load_recipe
from tests.rewards.conftest import tiny_glm
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[2]


def compare_recipe(*overrides):
    return load_recipe(
        ROOT / "recipes" / "compare_methods.yaml", [f"recipes_dir={ROOT / 'recipes'}", *overrides]
    )


@pytest.mark.parametrize("steps", [8, 24])
def test_every_method_plans_the_same_steps_whatever_its_recipe_says(steps, tmp_path):
    from glmwb.recipes.compare_methods import method_recipe

    recipe = compare_recipe(f"budget.steps={steps}")
    stages = set()
    for m in recipe.methods:
        for variant in (None, *m.variants(), {"train.max_steps": 999, "train.steps": 999}):
            if variant and "train.steps" in variant:  # a variant cannot override the budget
                variant = {"train.steps": 999} if m.recipe == "ppo.yaml" else {"train.max_steps": 999}
            built = method_recipe(recipe, m, 3, tmp_path / m.name, variant)
            assert planned_steps(built) == steps, m.name
            assert built.run.seed == 3 and built.train.max_minutes is None  # no wall-clock cap
            stages.add(built.stage)
    assert stages == {"dpo", "online_dpo", "ppo", "grpo"}
    names = {m.name for m in recipe.methods}
    assert names == {"dpo_offpolicy", "iterative_rpo", "kto", "ppo_rule", "ppo_rm", "grpo"}


def test_a_grid_sweeps_every_combination_and_the_recipe_states_its_sweeps():
    from glmwb.recipes.compare_methods import MethodRef

    m = MethodRef("x", "dpo.yaml", grid={"loss.beta": [0.1, 0.3, 1.0], "optim.lr": [1e-5, 1e-4]})
    got = m.variants()
    assert len(got) == 6 and len({tuple(sorted(v.items())) for v in got}) == 6
    assert {v["loss.beta"] for v in got} == {0.1, 0.3, 1.0} and {v["optim.lr"] for v in got} == {1e-5, 1e-4}
    both = MethodRef("y", "grpo.yaml", sweep=({"a": 1}, {"a": 2}), grid={"b": [3, 4]})
    assert both.variants() == ({"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4})
    assert MethodRef("z", "dpo.yaml", sweep=({"a": 1},)).variants() == ({"a": 1},)
    with pytest.raises(ValueError, match=r"grid\.loss\.beta: give a non-empty list"):
        MethodRef("x", "dpo.yaml", grid={"loss.beta": []})
    recipe = compare_recipe()
    sizes = {m.name: len(m.variants()) for m in recipe.methods}
    assert sizes["dpo_offpolicy"] == 9 and sizes["iterative_rpo"] == 9 and sizes["grpo"] == 2


def test_iterative_dpo_samples_afresh_every_steps_per_round(tmp_path):
    from glmwb.recipes.compare_methods import MethodRef, method_recipe

    m = MethodRef("r", "online_dpo.yaml", steps_per_round=8)
    assert m.rounds_for(16) == 2 and m.rounds_for(48) == 6
    with pytest.raises(ValueError, match="steps_per_round=8 does not divide budget.steps=12"):
        m.rounds_for(12)
    recipe = compare_recipe("budget.steps=48")
    rpo = next(x for x in recipe.methods if x.name == "iterative_rpo")
    built = method_recipe(recipe, rpo, 0, tmp_path, None)
    assert (built.rounds.rounds, built.train.max_steps) == (6, 8)


def test_only_some_methods_with_the_variants_an_earlier_run_chose(tmp_path, capsys):
    from glmwb.recipes.compare_methods import earlier_choices, runnable_methods

    keep, _ = runnable_methods(compare_recipe("only=[ppo_rule,iterative_rpo]"))
    assert [m.name for m in keep] == ["iterative_rpo", "ppo_rule"]
    with pytest.raises(ValueError, match="only: no method named nope"):
        compare_recipe("only=[nope]")
    summary = tmp_path / "summary.json"
    summary.write_text('{"chosen": {"iterative_rpo": {"loss.beta": 0.05}, "grpo": null}}')
    got = earlier_choices(str(summary), ["iterative_rpo", "grpo", "kto"])
    assert got == {"iterative_rpo": {"loss.beta": 0.05}, "grpo": None}  # kto: not chosen there, swept
    assert "iterative_rpo: the variant chosen in" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="variants_from: no file at"):
        earlier_choices(str(tmp_path / "missing.json"), ["grpo"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a compare-methods summary.json"):
        earlier_choices(str(tmp_path / "bad.json"), ["grpo"])


def test_sweep_table_marks_the_variant_kept_on_dev():
    from glmwb.align.compare import format_sweeps

    tried = [{"variant": {"beta": b, "lr": lr}, "dev_accuracy": acc}
             for (b, lr), acc in zip([(0.1, 1), (0.1, 2), (0.3, 1), (0.3, 2)], [0.5, 0.7, 0.6, 0.7], strict=True)]  # fmt: skip
    text = format_sweeps({"dpo": tried})
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert rows == ["| 0.1 | 0.500 | **0.700** |", "| 0.3 | 0.600 | 0.700 |"]  # a tie keeps the first
    assert format_sweeps({}) == ""


def test_grpo_can_draw_its_prompts_from_dev():
    from glmwb.align.grpo import GRPODataConfig, load_prompts

    train = {r["world_prompt"] for r in load_prompts(GRPODataConfig(train_prompts=64), 0)[0]}
    dev_rows, _, facts = load_prompts(GRPODataConfig(train_prompts=64, split="dev"), 0)
    dev = {r["world_prompt"] for r in dev_rows}
    assert len(dev) == 64 and facts["split"] == "dev" and not train & dev


def test_without_a_reward_model_ppo_rm_is_left_out_and_said_so():
    from glmwb.recipes.compare_methods import runnable_methods

    keep, left_out = runnable_methods(compare_recipe("reward_model=null"))
    assert "ppo_rm" not in {m.name for m in keep} and len(keep) == 5
    assert len(left_out) == 1 and left_out[0].startswith("ppo_rm: needs reward_model")
    keep, left_out = runnable_methods(compare_recipe())
    assert len(keep) == 6 and left_out == []


def test_budget_overrides_per_stage():
    assert budget_overrides("ppo", 10)["train.steps"] == 10
    assert budget_overrides("grpo", 10)["train.max_steps"] == 10
    got = budget_overrides("online_dpo", 12, rounds=3)
    assert (got["rounds.rounds"], got["train.max_steps"]) == (3, 4)
    with pytest.raises(ValueError, match="do not divide"):
        budget_overrides("online_dpo", 10, rounds=3)
    with pytest.raises(ValueError, match="no step budget"):
        budget_overrides("sft", 10)


def test_rounds_must_divide_the_budget():
    with pytest.raises(ConfigError, match="does not divide budget.steps"):
        compare_recipe("budget.steps=25")


def test_check_same_budget_names_the_runs_that_differ():
    ok = {"planned_steps": 8, "steps_done": 8, "line": "8 of 8 steps"}
    short = {"planned_steps": 8, "steps_done": 5, "line": "stopped early at step 5 of 8"}
    assert check_same_budget({"a": ok, "b": dict(ok)}, 8) == []
    got = check_same_budget({"a": ok, "b": short, "c": {"planned_steps": 9, "steps_done": 9}}, 8)
    assert got == ["b: stopped early at step 5 of 8", "c: planned 9 steps, not 8"]


def test_stages_stop_at_the_same_budget(tiny_tokenizer, tmp_path):
    """Two differently sized trainers (offline DPO, and iterative DPO in 2 rounds) under budget_overrides
    both report exactly the budget's steps done."""
    from glmwb.align.dpo import run_dpo
    from glmwb.align.online_dpo import run_online_dpo
    from glmwb.pretrain.hf import save_pretrained
    from glmwb.recipes.loader import apply_override, build
    from glmwb.recipes.schema import stage_class

    policy = str(save_pretrained(tiny_glm(tiny_tokenizer, seed=5), tmp_path / "policy", tiny_tokenizer))
    base = {
        "dpo": {"stage": "dpo", "engine": "packed", "model": {"init_from": policy},
                "data": {"world": {"num_entities": 24, "train_prompts": 40, "heldout_prompts": 8}},
                "train": {"batch_size": 2, "log_every": 1, "max_steps": 50, "max_minutes": 5}},
        "online_dpo": {"stage": "online_dpo", "engine": "packed", "model": {"init_from": policy},
                       "rounds": {"prompts_per_round": 6, "k": 3, "max_new_tokens": 6},
                       "label": {"source": "world", "export": False},
                       "train": {"batch_size": 2, "log_every": 1, "max_steps": 50}},
    }  # fmt: skip
    done = {}
    for stage, runner in (("dpo", run_dpo), ("online_dpo", run_online_dpo)):
        data = {**base[stage], "run": {"dir": str(tmp_path / stage)}}
        for key, value in budget_overrides(stage, 4, rounds=2).items():
            apply_override(data, key.split("."), value)
        recipe = build(stage_class(stage), data, source="test")
        assert planned_steps(recipe) == 4
        done[stage] = runner(recipe)["budget"]
    assert check_same_budget(done, 4) == [], done


def test_kl_to_itself_is_zero_and_to_another_policy_positive(tiny_tokenizer):
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    a, b = tiny_glm(tiny_tokenizer, seed=1).eval(), tiny_glm(tiny_tokenizer, seed=2).eval()
    with torch.no_grad():  # a sharper, different reference: KL(a || b) is then far from 0
        for w in b.parameters():
            w.mul_(4.0)
    same = kl_to_reference(a, a, tiny_tokenizer, msgs, samples=2, max_new_tokens=5)
    assert same["n"] == 8 and abs(same["kl"]) < 1e-5
    other = kl_to_reference(a, b, tiny_tokenizer, msgs, samples=8, max_new_tokens=5)
    assert other["kl"] > 2 * other["kl_se"] > 0  # KL(a || b) > 0, beyond its noise


def test_kl_sums_token_log_probs_of_a_plain_forward(tiny_tokenizer):
    """The per-answer log-probs the KL uses equal a plain forward's over the answer tokens."""
    from glmwb.align.compare import sequence_logps

    m = tiny_glm(tiny_tokenizer, seed=1).eval()
    prompt, answer = [5, 9, 11, 3], [7, 8, 2]
    got = sequence_logps(m, [prompt], [answer])[0]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = m(ids).logits.float().log_softmax(-1)[0]
    want = float(logp[3:-1].gather(-1, ids[0, 4:, None]).sum())
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_comparison_rows_average_seeds_and_keep_each_seeds_p(tmp_path):
    from glmwb.align.compare import plot_comparison_bars

    def run(acc, sacc, p, kl):
        comp = {"by_instance": {"greedy_p": p, "sampled_p": p / 2, "up": 3, "down": 1},
                "accuracy_delta": acc - 0.5, "sample_accuracy_delta": sacc - 0.4}  # fmt: skip
        report = {"accuracy": acc, "sample_accuracy": sacc, "mean_chars": 10.0, "reward_mean": 1.0}
        return {"report": report, "comparison": comp, "kl": kl, "seconds": 5.0, "variant": "defaults"}

    rows = comparison_rows({"m": [run(0.5, 0.4, 0.01, 1.0), run(0.7, 0.6, 0.2, 3.0)]})
    r = rows[0]
    assert r["accuracy"] == pytest.approx(0.6) and r["accuracy_sd"] == pytest.approx(math.sqrt(0.02))
    assert r["kl"] == pytest.approx(2.0) and r["greedy_p"] == [0.01, 0.2]
    table = format_comparison(rows)
    assert "**0.01**" in table and "0.2" in table and "0.600 ± 0.141" in table
    assert r["greedy_delta"] == pytest.approx([0.0, 0.2]) and r["sampled_delta"] == pytest.approx([0.0, 0.2])
    png = plot_comparison_bars(rows, tmp_path / "c.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_recipe_of_another_stage_in_one_line(capsys):
    from glmwb.recipes.cli import main

    assert main(["compare-methods", str(ROOT / "recipes" / "dpo.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a 'stage: compare_methods' recipe, got 'dpo'" in err[0]
