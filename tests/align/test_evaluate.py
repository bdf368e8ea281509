"""align/evaluate.py: greedy answers graded by the world's checker, win rates, the align_eval stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glmwb.align.evaluate import (
    compare,
    evaluate_policy,
    format_table,
    mcnemar_p,
    paired_test,
    significance_line,
)
from glmwb.pretrain.generate import generate_answers
from glmwb.pretrain.model import GLM
from glmwb.pretrain.world import make_world
from tests.tiny import TINY


def tiny_policy(tok, seed: int = 0) -> GLM:
    torch.manual_seed(seed)
    return GLM(TINY.with_(pad_token_id=tok.pad_token_id)).eval()


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, num_entities=24)


def test_batched_answers_equal_one_at_a_time(tiny_tokenizer, world) -> None:
    model = tiny_policy(tiny_tokenizer)
    prompts = [p.messages for p in world.prompts("heldout", 7, seed=3)]
    batched = generate_answers(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=4)
    single = [generate_answers(model, tiny_tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single and any(batched)


def test_report_is_the_world_checkers_verdict(tiny_tokenizer, world) -> None:
    prompts = world.prompts("heldout", 10, seed=0)
    report = evaluate_policy(tiny_policy(tiny_tokenizer), tiny_tokenizer, world, prompts, max_new_tokens=10)
    assert report["n"] == 10 and len(report["answers"]) == 10
    for p, a in zip(prompts, report["answers"], strict=True):
        c = world.check(p, a["answer"])
        assert (a["id"], a["correct"], a["score"]) == (p.id, c.correct, pytest.approx(c.score))
    assert report["score"] == pytest.approx(sum(a["score"] for a in report["answers"]) / 10)
    assert sum(g["n"] for g in report["by_lang"].values()) == 10
    assert sum(g["n"] for g in report["by_phrasing"].values()) == 10
    assert {a["phrasing"] for a in report["answers"]} <= {"t0", "t1", "t2", "t3"}
    assert all(
        a["instance"] == f"{p.family}/{p.key}" for p, a in zip(prompts, report["answers"], strict=True)
    )


def test_sampled_accuracy_grades_every_draw(tiny_tokenizer, world) -> None:
    model, prompts = tiny_policy(tiny_tokenizer), world.prompts("heldout", 6, seed=1)
    report = evaluate_policy(model, tiny_tokenizer, world, prompts, max_new_tokens=8, samples=3, seed=4)
    draws = [
        generate_answers(model, tiny_tokenizer, [p.messages for p in prompts], 8, 1.0, 64, 4 + 7919 * (k + 1))
        for k in range(3)
    ]
    greedy = generate_answers(model, tiny_tokenizer, [p.messages for p in prompts], 8)
    assert any(d != greedy for d in draws)  # temperature 1 draws, not the greedy answer three times
    for i, (p, a) in enumerate(zip(prompts, report["answers"], strict=True)):
        assert a["sample_accuracy"] == pytest.approx(sum(world.check(p, d[i]).correct for d in draws) / 3)
    assert report["sample_accuracy"] == pytest.approx(
        sum(a["sample_accuracy"] for a in report["answers"]) / 6
    )
    assert "sample_accuracy" not in evaluate_policy(
        model, tiny_tokenizer, world, prompts[:2], max_new_tokens=4
    )
    with pytest.raises(ValueError, match="samples must be >= 0"):
        evaluate_policy(model, tiny_tokenizer, world, prompts, samples=-1)


def test_paired_tests_by_hand() -> None:
    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5**10)  # exact binomial, two-sided
    assert mcnemar_p(3, 3) == pytest.approx(1.0) and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(7, 2) == pytest.approx(2 * sum(math.comb(9, k) for k in range(3)) / 2**9)
    up = paired_test([0.25] * 30, [0.5] * 30)  # every prompt up by 0.25
    assert up["mean_delta"] == pytest.approx(0.25) and up["se"] == pytest.approx(0.0) and up["p"] < 1e-6
    flat = paired_test([0.0, 0.5, 1.0, 0.5], [0.5, 0.0, 0.5, 1.0])  # two up, two down by the same amount
    assert flat["mean_delta"] == pytest.approx(0.0) and flat["p"] > 0.5 and flat["changed"] == 4
    assert paired_test([0.5, 0.5], [0.5, 0.5])["p"] == 1.0


def test_instance_tests_count_a_question_once() -> None:
    """Eight phrasings of one instance broken together are one piece of evidence, not eight: McNemar over
    prompts calls it significant, the test over instances cannot."""
    from glmwb.align.evaluate import instance_tests

    def rows(correct, sampled, instances):
        return [
            {"id": f"{k}/{i}", "instance": k, "score": float(c), "correct": c, "sample_accuracy": s}
            for i, (c, s, k) in enumerate(zip(correct, sampled, instances, strict=True))
        ]

    inst = ["a"] * 8 + ["b", "c", "d", "e"]
    before = rows([1] * 8 + [0, 1, 0, 1], [1.0] * 8 + [0.0, 0.5, 0.25, 1.0], inst)
    after = rows([0] * 8 + [0, 1, 1, 1], [0.5] * 8 + [0.0, 0.5, 0.5, 1.0], inst)
    c = compare(
        {"answers": before, "accuracy": 0, "score": 0, "sample_accuracy": 0},
        {"answers": after, "accuracy": 0, "score": 0, "sample_accuracy": 0},
    )
    assert c["mcnemar"] == {"fixed": 1, "broken": 8, "p": pytest.approx(20 / 512)}  # 2 * P(X <= 1), n = 9
    t = c["by_instance"]
    # instance means: a 1 -> 0 (down), d 0 -> 1 (up), b, c, e unchanged; two nonzero differences of equal size
    assert (t["n"], t["up"], t["down"]) == (5, 1, 1)
    assert t["greedy_p"] == pytest.approx(1.0)
    assert t == instance_tests(before, after)
    # sampled: a -0.5, d +0.25 -> ranks 2 (down) and 1 (up): exact two-sided p = 1.0 with two pairs
    assert t["sampled_p"] == pytest.approx(1.0)
    # a clear rise on every instance is detected: six instances, each up
    many = [f"i{j}" for j in range(6) for _ in range(2)]
    c6 = instance_tests(rows([0] * 12, [0.0] * 12, many), rows([1] * 12, [0.5] * 12, many))
    assert (c6["up"], c6["down"]) == (6, 0) and c6["greedy_p"] == pytest.approx(2 / 2**6)
    assert "by_instance" in c and "question instances" in significance_line(c)


def _report(scores, correct, rewards=None):
    answers = [
        {"id": str(i), "score": s, "correct": c, **({"reward": rewards[i]} if rewards else {})}
        for i, (s, c) in enumerate(zip(scores, correct, strict=True))
    ]
    return {"answers": answers, "accuracy": sum(correct) / len(correct), "score": sum(scores) / len(scores)}


def test_win_rates_by_hand() -> None:
    before = _report([0.4, 0.4, 1.0, 0.2], [0, 0, 1, 0], rewards=[0.0, 1.0, 2.0, 3.0])
    after = _report([1.0, 0.4, 0.4, 1.0], [1, 0, 0, 1], rewards=[1.0, 1.0, 1.0, 1.0])
    c = compare(before, after)
    # world score: wins on items 0 and 3, tie on 1, loss on 2 -> win rate (2 + 0.5) / 4
    assert c["by_world_score"] == {"win": 0.5, "tie": 0.25, "loss": 0.25, "win_rate": 0.625, "n": 4}
    assert c["by_reward_model"]["win_rate"] == pytest.approx((1 + 0.5) / 4)
    assert c["accuracy_delta"] == pytest.approx(0.25)
    assert c["mcnemar"] == {"fixed": 2, "broken": 1, "p": pytest.approx(1.0)}
    assert "fixed 2, broken 1" in significance_line(c) and "sampled" not in significance_line(c)
    with pytest.raises(ValueError, match="different prompts"):
        compare(before, _report([1.0], [1]))


def test_table_lists_every_policy() -> None:
    row = {"accuracy": 0.5, "right_language": 1.0, "concision": 0.9, "score": 0.7, "mean_chars": 12.0}
    table = format_table(
        {"sft": row, "ppo": {**row, "accuracy": 0.75}}, {"ppo": {"by_world_score": {"win_rate": 0.6}}}
    )
    lines = table.splitlines()
    assert (
        len(lines) == 4
        and "| sft | 0.500 |" in lines[2]
        and "| ppo | 0.750 |" in lines[3]
        and "0.600" in lines[3]
    )


def test_align_eval_stage_end_to_end(tiny_tokenizer, tmp_path, capsys) -> None:
    from glmwb.pretrain.hf import save_pretrained
    from glmwb.pretrain.run_folder import Budget, write_model_record
    from glmwb.recipes.cli import main

    for name, seed in (("a", 0), ("b", 1)):
        save_pretrained(tiny_policy(tiny_tokenizer, seed), tmp_path / name, tokenizer=tiny_tokenizer)
    write_model_record(tmp_path / "b", Budget("sft", 48, 24, True, "train.max_minutes=1 reached"), tmp_path)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"stage: align_eval\nrun: {{dir: {tmp_path}/run}}\n"
        f"policies:\n  - {{name: base, path: {tmp_path}/a}}\n  - {{name: tuned, path: {tmp_path}/b}}\n"
        "data: {world: {num_entities: 24}, n_prompts: 6, max_new_tokens: 8}\n"
    )
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    # which model each row is: its folder and its training, the one cut short flagged
    assert f"| base | {tmp_path / 'a'} | no training record (glmwb_run.json) |" in out
    flagged = "**sft: stopped early at step 24 of 48 (train.max_minutes=1 reached)** (not the recipe's model)"
    assert f"| tuned | {tmp_path / 'b'} | {flagged} |" in out
    assert "note: tuned: training (or an earlier stage's) stopped early" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["reports"]) == {"base", "tuned"} and "tuned" in summary["comparisons"]
    assert summary["stopped_early"] == ["tuned"] and summary["policies"]["base"]["training"] is None
    assert summary["policies"]["tuned"]["training"]["steps_done"] == 24
    assert "| tuned |" in out and "accuracy by task family" in out and "accuracy by phrasing" in out
    assert summary["phrasing_table"].splitlines()[0].startswith("| policy | t")
    fam = summary["family_table"].splitlines()
    base_by = summary["reports"]["base"]["by_family"]
    assert sum(base_by[f]["n"] for f in base_by) == 6 and len(fam) == 4  # header, rule, two policies
    for name, line in zip(("base", "tuned"), fam[2:], strict=True):
        by = summary["reports"][name]["by_family"]
        assert line == "| " + " | ".join([name, *(f"{by[f]['accuracy']:.3f}" for f in sorted(by))]) + " |"
    assert (tmp_path / "run" / "comparison.png").stat().st_size > 1000
    assert len((tmp_path / "run" / "answers.jsonl").read_text().splitlines()) == 12
    assert main(["run", str(recipe), f"policies=[{{name: x, path: {tmp_path}/nothing}}]"]) == 2
    assert "no model folder" in capsys.readouterr().err


def test_align_eval_compares_with_the_named_baseline(tiny_tokenizer, tmp_path, capsys) -> None:
    from glmwb.pretrain.hf import save_pretrained
    from glmwb.recipes.cli import main

    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        save_pretrained(tiny_policy(tiny_tokenizer, seed), tmp_path / name, tokenizer=tiny_tokenizer)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"stage: align_eval\nrun: {{dir: {tmp_path}/run}}\nbaseline: sft\n"
        f"policies:\n  - {{name: base, path: {tmp_path}/a}}\n  - {{name: sft, path: {tmp_path}/b}}\n"
        f"  - {{name: ppo, path: {tmp_path}/c}}\n"
        "data: {world: {num_entities: 24}, n_prompts: 6, max_new_tokens: 8}\n"
    )
    assert main(["run", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["baseline"] == "sft" and set(summary["comparisons"]) == {"base", "ppo"}
    reports = summary["reports"]
    for name in ("base", "ppo"):  # each compared with sft, not with the first listed
        delta = reports[name]["accuracy"] - reports["sft"]["accuracy"]
        assert summary["comparisons"][name]["accuracy_delta"] == pytest.approx(delta)
    head = summary["table"].splitlines()[0]
    assert "win vs sft (world)" in head and "win vs base" not in head
    assert "paired tests against 'sft'" in capsys.readouterr().out
    assert main(["run", str(recipe), "baseline=dpo"]) == 2
    assert "'dpo' is not one of the policies' names" in capsys.readouterr().err
    gone = f"policies=[{{name: base, path: {tmp_path}/a}}, {{name: sft, path: {tmp_path}/nothing}}]"
    assert main(["run", str(recipe), "skip_missing=true", gone]) == 2
    err = capsys.readouterr().err
    assert "baseline" in err and "'sft' has no model folder" in err
