"""The preferences stage: policy samples -> store items -> simulated annotators' votes through the store's
assignment -> export that the reward and DPO stages read; reruns go on instead of starting over."""

from __future__ import annotations

import json

import pytest

from glmwb.annotation import tasks
from glmwb.annotation.store import NewResponse
from glmwb.pretrain.errors import ConfigError
from glmwb.recipes.cli import load_recipe


def _recipe(tmp_path, policy, *more):
    return load_recipe(
        "recipes/preferences.yaml",
        [f"run.dir={tmp_path / 'prefs'}", f"policies=[{policy}]", "prompts.n=12", "sampling.k=2",
         "sampling.max_new_tokens=6", *more],
    )  # fmt: skip


def test_world_candidates_as_samples_are_labelled_by_quality(tmp_path, monkeypatch, tiny_glm_folder) -> None:
    """Answers of known quality (the world's correct / wrong / verbose candidates stand in for samples):
    noise-free annotators' majority always prefers the better answer by the world's checker, each item gets
    `overlap` votes, and the export is read as is by the reward stage's reader."""
    from glmwb.annotation.collect import run_preferences
    from glmwb.annotation.preference_data import read_preferences

    def fake_samples(prompts, folder, config, model_name=None, progress=True):
        cands = tasks.world_candidates(prompts, seed=0)
        keep = ("correct", "wrong", "verbose")
        return {
            uid: [NewResponse(r.text, "fake", meta=r.meta) for r in rs if r.meta["kind"] in keep]
            for uid, rs in cands.items()
        }

    monkeypatch.setattr(tasks, "sample_responses", fake_samples)
    recipe = _recipe(tmp_path, tiny_glm_folder, "annotators.noise=0.0", "items_per_prompt=2")
    summary = run_preferences(recipe)
    assert summary["items_added"] == 24 and summary["votes_cast"] == 24 * 3 == summary["votes"]
    assert summary["rows"] == 24
    q = summary["world"]
    assert q["strict_pairs"] >= 12 and q["chosen_better"] == 1.0 and q["chosen_worse"] == 0.0
    out = tmp_path / "prefs"
    records = read_preferences(out / "preferences.jsonl").records
    assert len(records) == 24 and all(r.chosen and r.rejected for r in records)
    assert (out / "agreement.md").read_text().strip() and (out / "summary.json").is_file()

    again = run_preferences(recipe)  # the round is in the store: nothing added, nothing voted twice
    assert again["items_added"] == 0 and again["votes_cast"] == 0 and again["rows"] == 24


def test_sampled_answers_from_a_policy_folder(tmp_path, tiny_glm_folder) -> None:
    from glmwb.annotation.collect import run_preferences

    summary = run_preferences(_recipe(tmp_path, tiny_glm_folder))
    assert 1 <= summary["items_added"] <= 12 and summary["votes"] == 3 * summary["items_added"]
    rows = [json.loads(x) for x in (tmp_path / "prefs" / "preferences.jsonl").read_text().splitlines()]
    assert rows and all(r["provenance"]["batch"] == "round-1" for r in rows)
    assert all(r["provenance"]["models"][0] == tiny_glm_folder.name for r in rows)


def test_reward_stage_takes_the_export_as_extra_pairs(tmp_path) -> None:
    from glmwb.annotation.preference_data import load_records

    path = tmp_path / "p.jsonl"
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    base = load_recipe(
        "recipes/reward.yaml", ["data.world.train_prompts=20", "data.world.heldout_prompts=10"]
    ).data
    with_extra = load_recipe(
        "recipes/reward.yaml",
        ["data.world.train_prompts=20", "data.world.heldout_prompts=10", f"data.extra_paths=[{path}]"],
    ).data
    train0, held0, _ = load_records(base, 0)
    train1, held1, facts = load_records(with_extra, 0)
    assert len(train1) == len(train0) + 1 and facts["extra_pairs"] == 1 and len(held1) == len(held0)
    assert any(r.chosen == "4" for r in train1)
    missing = load_recipe("recipes/reward.yaml", [f"data.extra_paths=[{tmp_path / 'nope.jsonl'}]"]).data
    with pytest.raises(ConfigError, match="data.extra_paths: no preference file"):
        load_records(missing, 0)


def test_reward_data_both_bad_drop_leaves_out_only_those_training_pairs() -> None:
    from glmwb.annotation.preference_data import load_records

    over = ["data.world.train_prompts=300", "data.world.heldout_prompts=100"]
    train0, held0, _ = load_records(load_recipe("recipes/reward.yaml", over).data, 0)
    train1, held1, facts = load_records(
        load_recipe("recipes/reward.yaml", [*over, "data.both_bad=drop"]).data, 0
    )
    both_bad = [r for r in train0 if r.provenance["label"] == "both_bad"]
    assert both_bad and all(r.tie for r in both_bad)  # the world's annotators say "both bad" -> a tie row
    assert facts["both_bad_dropped"] == len(both_bad) and len(train1) == len(train0) - len(both_bad)
    assert [r.id for r in train1] == [r.id for r in train0 if r.provenance["label"] != "both_bad"]
    assert [r.id for r in held1] == [r.id for r in held0]  # held-out pairs are evaluated as they are
    with pytest.raises(ConfigError, match="both_bad"):
        load_recipe("recipes/reward.yaml", ["data.both_bad=maybe"])


def test_reward_data_both_bad_weight_scales_only_those_training_pairs() -> None:
    from glmwb.annotation.preference_data import load_records

    over = ["data.world.train_prompts=300", "data.world.heldout_prompts=100"]
    train0, held0, _ = load_records(load_recipe("recipes/reward.yaml", over).data, 0)
    train1, held1, facts = load_records(
        load_recipe("recipes/reward.yaml", [*over, "data.both_bad_weight=0.25"]).data, 0
    )
    assert [r.id for r in train1] == [r.id for r in train0]  # nothing left out
    bad = [r.provenance["label"] == "both_bad" for r in train0]
    assert facts["both_bad_weighted"] == sum(bad) > 0
    for r0, r1, b in zip(train0, train1, bad, strict=True):
        assert r1.weight == pytest.approx(r0.weight * (0.25 if b else 1.0)) and r1.tie == r0.tie
    assert [r.weight for r in held1] == [r.weight for r in held0]  # held-out pairs untouched
    for wrong in ("0", "1.5"):
        with pytest.raises(ConfigError, match=r"both_bad_weight must be a finite number in \(0, 1\]"):
            load_recipe("recipes/reward.yaml", [f"data.both_bad_weight={wrong}"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["annotators.overlap=4"], "needs as many simulated annotators"),
        (["sampling.k=0"], "sampling.k"),
        (["policies=[]"], "policies"),
    ],
)
def test_recipe_mistakes(tmp_path, tiny_glm_folder, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _recipe(tmp_path, tiny_glm_folder, *overrides)


def test_missing_policy_folder(tmp_path) -> None:
    from glmwb.annotation.collect import run_preferences

    with pytest.raises(ConfigError, match="no model folder"):
        run_preferences(_recipe(tmp_path, tmp_path / "nope"))


def test_reward_data_with_annotator_strength_has_margins_and_the_same_labels() -> None:
    from glmwb.annotation.preference_data import load_records
    from glmwb.annotation.records import STRENGTH_MARGINS

    over = ["data.world.train_prompts=200", "data.world.heldout_prompts=50"]
    plain, _, _ = load_records(load_recipe("recipes/reward.yaml", over).data, 0)
    graded, _, _ = load_records(
        load_recipe("recipes/reward.yaml", [*over, "data.world.annotators.strength=true"]).data, 0
    )
    assert [(r.id, r.chosen, r.tie) for r in plain] == [(r.id, r.chosen, r.tie) for r in graded]
    assert all(r.margin is None for r in plain)
    assert all(r.margin == STRENGTH_MARGINS[r.provenance["strength"]] for r in graded if not r.tie)
    assert len({r.margin for r in graded if not r.tie}) >= 3  # slight, clear and strong wins all occur
