"""The arena round (stage: arena): anonymous battles among policies, simulated evaluators through the store,
the leaderboard, the votes exported as preference pairs; a rerun goes on instead of starting over."""

from __future__ import annotations

import json

import pytest

from glmwb.annotation import tasks
from glmwb.annotation.store import NewResponse, Store
from glmwb.pretrain.errors import ConfigError
from glmwb.recipes.cli import load_recipe


def _recipe(tmp_path, folder, *more, names=("good", "mid", "bad")):
    policies = ", ".join(f"{{name: {n}, path: '{folder}'}}" for n in names)
    return load_recipe(
        "recipes/arena.yaml",
        [f"run.dir={tmp_path / 'arena'}", f"policies=[{policies}]", "prompts.n=20", "sampling.k=1",
         "sampling.max_new_tokens=6", "battles.n=90", "battles.refit_every=30", "leaderboard.bootstrap=100",
         *more],
    )  # fmt: skip


def test_arena_round_with_answers_of_known_quality(tmp_path, monkeypatch, tiny_glm_folder):
    """'good' always answers correctly, 'mid' correctly with filler, 'bad' wrongly: noise-free evaluators
    put them in that order; every battle is a store item with its arena bookkeeping and one vote, and the
    votes come out as preference pairs."""
    from glmwb.annotation.arena_round import run_arena

    kind = {"good": "correct", "mid": "verbose", "bad": "wrong"}

    def fake_samples(prompts, folder, config, model_name=None, progress=True):
        cands = tasks.world_candidates(prompts, seed=0)
        return {
            uid: [
                NewResponse(r.text, model_name, meta=r.meta) for r in rs if r.meta["kind"] == kind[model_name]
            ]
            for uid, rs in cands.items()
        }

    monkeypatch.setattr(tasks, "sample_responses", fake_samples)
    summary = run_arena(_recipe(tmp_path, tiny_glm_folder, "battles.noise=0.0"))
    out = tmp_path / "arena"
    board = summary["leaderboard"]
    assert [r["model"] for r in board["rows"]] == ["good", "mid", "bad"]
    assert board["rows"][0]["rank"] == 1 and board["rows"][2]["rank"] == 3
    assert summary["battles"] == 90 and summary["pairs"] == 90
    with Store(out / "store.db") as store:
        items = list(store.items().values())
        votes = store.votes()
    assert len(items) == 90 and len(votes) == 90
    assert {v.annotator for v in votes} == {"evaluator-0", "evaluator-1", "evaluator-2"}
    for item in items:
        arena = item.meta["arena"]
        assert arena["mode"] == "anonymous" and 0 < arena["pair_prob"] <= 1
        assert arena["weight"] == pytest.approx(1 / (3 * arena["pair_prob"]))
    # left / right drawn by the store: each policy appears on both sides
    firsts = {next(r.model for r in i.responses if r.letter == "A") for i in items}
    assert firsts == {"good", "mid", "bad"}
    rows = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == 90 and all(r["provenance"]["batch"] == "arena-1" for r in rows)
    strict = [r for r in rows if not r["tie"]]
    assert strict and all(r["provenance"]["models"][0] != "bad" for r in strict)
    for name in ("leaderboard.txt", "leaderboard.json", "leaderboard.png", "summary.json"):
        assert (out / name).is_file()
    assert "fragility" in (out / "leaderboard.txt").read_text()

    again = run_arena(_recipe(tmp_path, tiny_glm_folder, "battles.noise=0.0"))  # nothing added twice
    assert again["battles"] == 90
    more = run_arena(_recipe(tmp_path, tiny_glm_folder, "battles.noise=0.0", "battles.n=120"))
    assert more["battles"] == 120


def test_arena_round_samples_policy_folders(tmp_path, tiny_glm_folder):
    from glmwb.annotation.arena_round import run_arena

    recipe = _recipe(tmp_path, tiny_glm_folder, "battles.n=20", "battles.refit_every=10",
                     "leaderboard.fragility=false", names=("one", "two"))  # fmt: skip
    summary = run_arena(recipe)
    assert summary["battles"] == 20 and summary["policies"] == ["one", "two"]
    answers = (tmp_path / "arena" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 2 * 20 and {json.loads(a)["policy"] for a in answers} == {"one", "two"}


def test_arena_recipe_mistakes(tmp_path, tiny_glm_folder):
    from glmwb.annotation.arena_round import run_arena

    with pytest.raises(ConfigError, match="world split"):
        _recipe(tmp_path, tiny_glm_folder, "prompts.source=prompts.jsonl")
    with pytest.raises(ConfigError, match="unique"):
        _recipe(tmp_path, tiny_glm_folder, names=("a", "a"))
    with pytest.raises(ConfigError, match="no model folder for 'b'"):
        run_arena(load_recipe("recipes/arena.yaml", [f"run.dir={tmp_path}",
                  f"policies=[{{name: a, path: '{tiny_glm_folder}'}}, {{name: b, path: '{tmp_path}/none'}}]"]))  # fmt: skip
    with pytest.raises(ConfigError, match="at least two policies"):
        run_arena(load_recipe("recipes/arena.yaml", [f"run.dir={tmp_path}", "skip_missing=true",
                  f"policies=[{{name: a, path: '{tiny_glm_folder}'}}, {{name: b, path: '{tmp_path}/none'}}]"]))  # fmt: skip
