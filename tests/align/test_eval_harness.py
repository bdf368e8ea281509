"""align/evals/harness.py and `glmwb eval`: model mode on a tiny GLM folder, predictions-only mode, the
per-item cache across an interrupted run, paired comparisons, tables and plots."""

from __future__ import annotations

import json

import pytest
import torch

from glmwb.align.evals import harness
from glmwb.align.evals.harness import (
    Generator,
    compare_items,
    evaluate_model,
    evaluate_predictions,
    paired_bootstrap,
)
from glmwb.align.evals.tasks import Arithmetic, Needle, World
from glmwb.pretrain.hf import save_pretrained
from glmwb.pretrain.model import GLM
from glmwb.recipes.cli import main
from tests.tiny import TINY, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = GLM(TINY.with_(pad_token_id=tiny_tokenizer.pad_token_id)).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("policy"), tiny_tokenizer)


def small_tasks():
    return [World(limit=6, num_entities=24), Needle(lengths=(16, 48), depths=(0.0, 1.0), per_cell=1)]


def test_batched_generation_equals_one_at_a_time(model_dir) -> None:
    gen = Generator(model_dir, batch_size=4)
    prompts = [gen.render(it.messages) for it in World(limit=4, num_entities=24).load()]
    batched = gen.generate(prompts, 10)
    assert batched == [gen.generate([p], 10)[0] for p in prompts]


def test_model_mode_records_provenance_and_predictions_mode_scores_the_same(model_dir, tmp_path) -> None:
    run = evaluate_model("tiny", model_dir, small_tasks(), tmp_path / "a", batch_size=3, max_new_tokens=8,
                         progress=False)  # fmt: skip
    world = run["tasks"]["world"]
    assert world["n"] == 6 and len(world["items"]) == 6
    prov = world["provenance"]
    assert len(prov["chat_template_sha256"]) == 64 and prov["generation"]["max_new_tokens"] == 8
    assert prov["versions"]["lm-eval"] != "not installed" and prov["shots"] == 0 and prov["engine"]
    assert run["tasks"]["needle"]["grid"].keys() == {"16", "48"}
    # the same answers from a file, scored without a model, give the same per-item results
    path = tmp_path / "preds.jsonl"
    with path.open("w") as f:
        for t, rec in run["tasks"].items():
            for i, row in rec["items"].items():
                f.write(json.dumps({"task": t, "id": i, "prediction": row["answer"]}) + "\n")
    again = evaluate_predictions("file", path, small_tasks(), tmp_path / "b")
    for t in run["tasks"]:
        assert again["tasks"][t]["scores"] == run["tasks"][t]["scores"]
        assert again["tasks"][t]["items"] == run["tasks"][t]["items"]


def test_an_interrupted_run_recomputes_nothing_already_done(model_dir, tmp_path, monkeypatch) -> None:
    calls = {"generated": 0, "scored": 0}
    real_generate, real_score = Generator.generate, World.score

    def generate(self, prompts, n):
        if calls["generated"] >= 2 and calls.get("interrupt"):
            raise KeyboardInterrupt
        calls["generated"] += len(prompts)
        return real_generate(self, prompts, n)

    def score(self, items, predictions):
        calls["scored"] += len(items)
        return real_score(self, items, predictions)

    monkeypatch.setattr(Generator, "generate", generate)
    monkeypatch.setattr(World, "score", score)
    tasks = [World(limit=7, num_entities=24)]
    calls["interrupt"] = True
    with pytest.raises(KeyboardInterrupt):  # stopped after the first batch of 2
        evaluate_model("m", model_dir, tasks, tmp_path, batch_size=2, max_new_tokens=6, progress=False)
    assert calls["generated"] == 2
    calls.update(generated=0, interrupt=False)
    first = evaluate_model("m", model_dir, tasks, tmp_path, batch_size=2, max_new_tokens=6, progress=False)
    assert calls["generated"] == 5 and calls["scored"] == 7  # only the 5 answers not yet cached
    calls.update(generated=0, scored=0)
    second = evaluate_model("m", model_dir, tasks, tmp_path, batch_size=2, max_new_tokens=6, progress=False)
    assert calls == {"generated": 0, "scored": 0, "interrupt": False} and second["tasks"] == first["tasks"]
    # a changed generation setting is another prompt format: recomputed, not mixed with the cached one
    evaluate_model("m", model_dir, tasks, tmp_path, batch_size=2, max_new_tokens=7, progress=False)
    assert calls["generated"] == 7


def test_paired_comparison_counts_and_intervals() -> None:
    def run(correct, rewards):
        return {
            "items": {
                str(i): {"correct": c, "reward": r}
                for i, (c, r) in enumerate(zip(correct, rewards, strict=True))
            }
        }

    a = run([1, 0, 0, 0, 1, 0, 0, 0, 1, 0], [0.0] * 10)
    b = run([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1.0] * 5 + [0.0] * 3 + [-1.0] * 2)
    c = compare_items(a, b)
    assert c["mcnemar"]["fixed"] == 5 and c["mcnemar"]["broken"] == 1
    assert c["bootstrap"]["mean_delta"] == pytest.approx(0.4)
    assert c["bootstrap"]["ci_low"] < 0.4 < c["bootstrap"]["ci_high"]
    assert c["differences"] == {"1": 1, "2": 1, "3": 1, "5": 1, "6": 1, "8": -1}
    assert c["reward_win_rate"] == pytest.approx((5 + 0.5 * 3) / 10)
    same = paired_bootstrap([0.0] * 20)
    assert same["p"] == 1.0 and same["mean_delta"] == 0.0
    strong = paired_bootstrap([1.0] * 30 + [0.0] * 10)
    assert strong["p"] < 0.01 and strong["ci_low"] > 0.5


def test_cli_scores_a_predictions_file_and_compares(tmp_path, capsys) -> None:
    items = Arithmetic(limit=12).load()
    gold, half = tmp_path / "gold.jsonl", tmp_path / "half.jsonl"
    gold.write_text("".join(json.dumps({"id": it.id, "prediction": it.ref["answer"]}) + "\n" for it in items))
    half.write_text("".join(json.dumps({"id": it.id, "output": it.ref["answer"] if k % 2 else "I do not know"}) + "\n"
                            for k, it in enumerate(items)))  # fmt: skip
    out = tmp_path / "out"
    code = main(["eval", "--task", "arithmetic", "--limit", "12", "--predictions", f"gold={gold}",
                 "--predictions", f"half={half}", "--out", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    scores = {r["name"]: r["tasks"]["arithmetic"]["scores"]["correct"] for r in results["runs"]}
    assert scores == {"gold": 1.0, "half": 0.5}
    assert results["comparisons"]["half"]["arithmetic"]["mcnemar"] == {
        "fixed": 0,
        "broken": 6,
        "p": pytest.approx(1 / 32),
    }
    assert "| half |" in (out / "table.md").read_text() and (out / "comparison.png").stat().st_size > 0


def test_cli_user_errors_are_one_line(tmp_path, capsys) -> None:
    assert (
        main(["eval", "--task", "gsm8k", "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path)])
        == 2
    )
    assert main(["eval", "--task", "nope", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert main(["eval", "--task", "world", "--out", str(tmp_path)]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0"}\n')
    assert main(["eval", "--task", "arithmetic", "--predictions", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("glmwb: error: ") for line in err), err


def test_needle_plot_and_side_by_side_table(model_dir, tmp_path) -> None:
    tasks = [Needle(lengths=(16, 32), depths=(0.0, 1.0), per_cell=1)]
    runs = [
        evaluate_model(n, model_dir, tasks, tmp_path, max_new_tokens=4, progress=False) for n in ("a", "b")
    ]
    summary = harness.save_bench(tmp_path, runs, "a")
    assert (tmp_path / "needle.png").stat().st_size > 0 and len(summary["plots"]) == 2
    assert summary["comparisons"]["b"]["needle"]["bootstrap"]["mean_delta"] == 0.0  # same model, same answers


def test_the_eval_stage_runs_from_its_recipe(model_dir, tmp_path) -> None:
    from pathlib import Path

    from glmwb.recipes.cli import load_recipe, run_stage, stage_line

    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / "eval.yaml"
    recipe = load_recipe(recipe_path, [f"run.dir={tmp_path}", "max_new_tokens=8",
        "tasks=[{name: world, limit: 4}, {name: arithmetic, limit: 3}]",
        f"checkpoints=[{{name: a, path: '{model_dir}'}}, {{name: b, path: '{model_dir}'}}]"])  # fmt: skip
    summary = run_stage(recipe)
    assert [r["name"] for r in summary["runs"]] == ["a", "b"]
    assert summary["runs"][0]["tasks"]["world"]["provenance"]["split"] == "test"
    assert stage_line("eval", summary) == "2 checkpoints scored on world, arithmetic (table.md)"
    assert (tmp_path / "results.json").is_file() and (tmp_path / "items.jsonl").is_file()


def test_reward_model_win_rate_over_two_prediction_files(tiny_tokenizer, tmp_path) -> None:
    from glmwb.rewards.model import RewardModel
    from glmwb.rewards.scoring import RewardScorer

    torch.manual_seed(0)
    rm = RewardModel(GLM(TINY.with_(pad_token_id=tiny_tokenizer.pad_token_id)), heads=["reward"])
    folder = rm.save(tmp_path / "rm", tokenizer=tiny_tokenizer)
    prompts = ["How is the weather?", "Write a poem.", "What is 2 + 2?", "Name a colour.", "Say hello."]
    answers_a = ["It is sunny.", "Roses are red.", "4", "Blue.", "Hello!"]
    answers_b = ["The weather in Beijing is sunny and warm.", "The sea.", "It is 4.", "Red", "你好"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    for name, answers in (("a", answers_a), ("b", answers_b)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": str(i), "prediction": t}) + "\n" for i, t in enumerate(answers))
        )
    out = tmp_path / "out"
    assert main(["eval", "--task", "winrate", "--data", f"winrate={data}", "--reward-model", str(folder),
                 "--predictions", f"a={tmp_path / 'a.jsonl'}", "--predictions", f"b={tmp_path / 'b.jsonl'}",
                 "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    scorer = RewardScorer.from_pretrained(folder)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    ra, rb = scorer.score(msgs, answers_a), scorer.score(msgs, answers_b)
    expected = sum((y > x) + 0.5 * (y == x) for x, y in zip(ra, rb, strict=True)) / len(prompts)
    assert results["comparisons"]["b"]["winrate"]["reward_win_rate"] == pytest.approx(expected)
    mean_b = results["runs"][1]["tasks"]["winrate"]["scores"]["reward"]
    assert mean_b == pytest.approx(sum(rb) / len(rb), abs=1e-5)
    # without a reward model the task refuses in one line
    assert main(["eval", "--task", "winrate", "--data", f"winrate={data}", "--predictions", str(tmp_path / "a.jsonl"),
                 "--out", str(tmp_path / "o2")]) == 2  # fmt: skip


def test_cli_refuses_out_of_range_options_by_name(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "eval",
                "--task",
                "arithmetic",
                "--limit",
                "-1",
                "--predictions",
                "x.jsonl",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (
        main(["eval", "--task", "arithmetic", "--batch-size", "0", "--model", "m", "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert "limit" in err and "batch_size" in err


def test_cached_results_are_keyed_by_the_items_reference_too(tmp_path, monkeypatch) -> None:
    scored = []
    real = Arithmetic.score
    monkeypatch.setattr(
        Arithmetic, "score", lambda self, items, p: scored.append(len(items)) or real(self, items, p)
    )
    path = tmp_path / "p.jsonl"
    first = Arithmetic(limit=4, seed=0).load()
    path.write_text("".join(json.dumps({"id": it.id, "prediction": it.ref["answer"]}) + "\n" for it in first))
    a = evaluate_predictions("x", path, [Arithmetic(limit=4, seed=0)], tmp_path)
    evaluate_predictions("x", path, [Arithmetic(limit=4, seed=0)], tmp_path)
    assert scored == [4] and a["tasks"]["arithmetic"]["scores"]["correct"] == 1.0
    # the same ids and answers against other gold numbers: scored again, not read from the cache
    b = evaluate_predictions("x", path, [Arithmetic(limit=4, seed=1)], tmp_path)
    assert scored == [4, 4] and b["tasks"]["arithmetic"]["scores"]["correct"] < 1.0
