"""The strict recipe loader and the `glmwb` CLI's handling of user mistakes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from glmwb.pretrain.run import PretrainRecipe
from glmwb.recipes.cli import load_recipe, main, resolve_pipeline
from glmwb.recipes.loader import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    if recipe.stage == "pipeline":
        _, stages = resolve_pipeline(path, [])
        assert stages, "a pipeline with no stages"


def test_expected_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tokenizer.yaml", "pretrain_tiny.yaml", "pretrain_1b.yaml", "quickstart.yaml"} <= names


def test_unknown_key_names_key_place_and_allowed(tmp_path):
    path = write(tmp_path, "stage: pretrain\noptim:\n  lrr: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "optim.lrr" in msg and "section 'optim'" in msg
    assert "did you mean 'lr'" in msg and "allowed keys:" in msg and "warmup_steps" in msg


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "stage: pretrain\ntrian: {max_steps: 3}\n")
    with pytest.raises(RecipeError, match="unknown key 'trian' in the top level.*did you mean 'train'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, place, expected",
    [
        ("train:\n  max_steps: ten\n", "train.max_steps", "int"),
        ("train:\n  max_steps: 1.5\n", "train.max_steps", "int"),
        ("optim:\n  lr: yes\n", "optim.lr", "float"),
        ("train:\n  device: tpu\n", "train.device", "one of 'auto', 'cpu', 'cuda'"),
        ("model: 3\n", "model", "section"),
    ],
)
def test_wrong_type_names_path_and_expected_type(tmp_path, text, place, expected):
    path = write(tmp_path, "stage: pretrain\n" + text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert place in str(e.value) and expected in str(e.value)


def test_int_is_accepted_for_float_and_lists_become_tuples(tmp_path):
    path = write(tmp_path, "stage: pretrain\noptim:\n  lr: 1\n  betas: [0.9, 0.99]\n")
    recipe = load_recipe(path)
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.betas == (0.9, 0.99)


def test_model_config_errors_are_recipe_errors(tmp_path):
    path = write(tmp_path, "stage: pretrain\nmodel:\n  num_heads: 6\n  num_kv_heads: 4\n")
    with pytest.raises(RecipeError, match="multiple of num_kv_heads"):
        load_recipe(path)


def test_reward_minimal_pair_kinds_are_checked_at_load(tmp_path):
    path = write(
        tmp_path, "stage: reward\nmodel:\n  init_from: somewhere\ndata:\n  world:\n    contrastive: 0.3\n"
    )
    ok = load_recipe(
        path, ["data.world.contrast_kinds=[correct>verbose_wrong,wrong_language>wrong_language_wrong]"]
    )
    assert ok.data.world.contrast_kinds == ("correct>verbose_wrong", "wrong_language>wrong_language_wrong")
    with pytest.raises(RecipeError, match="'correct>verbose_right'.*verbose_wrong"):
        load_recipe(path, ["data.world.contrast_kinds=[correct>verbose_right]"])
    with pytest.raises(RecipeError, match="contrast_kinds is empty"):
        load_recipe(path, ["data.world.contrast_kinds=[]"])
    with pytest.raises(RecipeError, match=r"contrastive must be a finite number in \[0, 1\]"):
        load_recipe(path, ["data.world.contrastive=1.5"])


def test_reward_dev_prompts_train_on_dev_and_evaluate_on_test_only(tmp_path):
    """data.world.dev_prompts adds labelled pairs on the world's dev instances (PPO's rollout prompts); the held-out
    pairs must then come from the other half (test), and the recipe says so when they would not."""
    from glmwb.annotation.preference_data import PreferenceDataConfig, WorldPairsConfig, load_records
    from glmwb.pretrain.world import make_world

    path = write(tmp_path, "stage: reward\nmodel:\n  init_from: somewhere\n")
    with pytest.raises(RecipeError, match="heldout_split: test"):
        load_recipe(path, ["data.world.dev_prompts=100"])
    assert (
        load_recipe(
            path, ["data.world.dev_prompts=100", "data.world.heldout_split=test"]
        ).data.world.dev_prompts
        == 100
    )

    world = make_world(seed=0, num_entities=96)

    def instances(records, split):
        keys = {(f, it.key) for f, items in world.splits[split].items() for it in items}
        ids = {r.provenance["prompt_id"] for r in records}
        return {k for k in keys if any(i.startswith(f"{k[0]}/{k[1]}/") for i in ids)}

    cfg = PreferenceDataConfig(
        world=WorldPairsConfig(train_prompts=40, dev_prompts=60, heldout_prompts=50, heldout_split="test")
    )
    train, held, info = load_records(cfg, seed=0)
    assert info["dev_pairs"] == 60 and len(train) == 100 and len(held) == 50
    assert instances(train, "dev") and instances(train, "train")
    assert not instances(train, "test") and not instances(held, "dev") and not instances(held, "train")
    assert instances(held, "test")
    # dev_phrasings: 4 also asks dev instances the fourth way (still no test instance in training)
    four = PreferenceDataConfig(
        world=WorldPairsConfig(
            train_prompts=10, dev_prompts=300, heldout_prompts=10, heldout_split="test", dev_phrasings=4
        )
    )
    train4, _, _ = load_records(four, seed=0)
    assert any(r.provenance["prompt_id"].endswith("/t3") for r in train4)
    assert not any(r.provenance["prompt_id"].endswith("/t3") for r in train)
    assert instances(train4, "dev") and not instances(train4, "test")
    with pytest.raises(RecipeError, match=r"dev_phrasings must be an integer in \[1, 4\]"):
        load_recipe(path, ["data.world.dev_phrasings=0"])


def test_overrides_are_applied_last_and_typed(tmp_path):
    path = write(tmp_path, "stage: pretrain\ntrain:\n  max_steps: 10\n")
    recipe = load_recipe(path, ["train.max_steps=3", "optim.lr=1e-3", "model.post_norms=true"])
    assert isinstance(recipe, PretrainRecipe)
    assert recipe.train.max_steps == 3 and recipe.optim.lr == 1e-3 and recipe.model.post_norms is True
    with pytest.raises(RecipeError, match="train.max_stepz"):
        load_recipe(path, ["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(path, ["train.max_steps"])


def test_missing_file_and_bad_stage(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="'stage' must be one of"):
        load_recipe(write(tmp_path, "stage: dance\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "stage: [pretrain\n"))


def test_pipeline_substitutes_run_dir_and_routes_stage_overrides(tmp_path):
    (tmp_path / "tok.yaml").write_text("stage: tokenizer\n")
    (tmp_path / "pre.yaml").write_text("stage: pretrain\n")
    path = write(
        tmp_path,
        "stage: pipeline\nrun: {dir: out/q}\nstages:\n"
        "  - {name: tok, recipe: tok.yaml, overrides: {run.dir: '${run.dir}/tok'}}\n"
        "  - {name: pre, recipe: pre.yaml, overrides: {run.dir: '${run.dir}/pre', data.tokenizer: '${run.dir}/tok'}}\n",
        "pipe.yaml",
    )
    pipeline, stages = resolve_pipeline(path, ["run.dir=elsewhere", "pre.train.max_steps=7"])
    assert pipeline.run.dir == "elsewhere"
    (_, _, tok), (_, _, pre) = stages
    assert tok.run.dir == "elsewhere/tok"
    assert pre.data.tokenizer == "elsewhere/tok" and pre.train.max_steps == 7
    with pytest.raises(RecipeError, match="stage 'pre'.*train.max_stepz"):
        resolve_pipeline(path, ["pre.train.max_stepz=7"])


def test_pipeline_stage_can_set_a_key_back_to_null(tmp_path):
    import shutil

    shutil.copy("recipes/ppo.yaml", tmp_path / "ppo.yaml")
    path = write(
        tmp_path,
        "stage: pipeline\nstages:\n"
        "  - {name: p, recipe: ppo.yaml, overrides: {prompts.world.train_phrasings: null, prompts.world.anchor_prompts: 0}}\n",
        "pipe.yaml",
    )
    assert load_recipe(tmp_path / "ppo.yaml").prompts.world.train_phrasings == 4
    ((_, _, ppo),) = resolve_pipeline(path, [])[1]
    assert ppo.prompts.world.train_phrasings is None and ppo.prompts.world.anchor_prompts == 0


def test_pipeline_runs_a_chosen_subset_of_stages(tmp_path, capsys):
    from glmwb.recipes.cli import select_stages

    stages = [("a", None, None), ("b", None, None), ("c", None, None)]
    assert [s[0] for s in select_stages(stages, "c,a", None)] == ["a", "c"]
    assert [s[0] for s in select_stages(stages, None, "b")] == ["b", "c"]
    assert select_stages(stages, None, None) == stages
    with pytest.raises(RecipeError, match="no stage named x; stages: a, b, c"):
        select_stages(stages, "a,x", None)
    with pytest.raises(RecipeError, match="--from: no stage named 'z'"):
        select_stages(stages, None, "z")
    single = write(tmp_path, "stage: tokenizer\n")
    assert main(["run", str(single), "--from", "tok"]) == 2
    assert "apply to pipeline recipes" in capsys.readouterr().err


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "stage: pretrain\noptim:\n  lrr: 0.1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "glmwb.recipes.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "optim.lrr" in proc.stderr
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_cli_help_everywhere():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["validate", "--help"],
        ["world", "--help"],
        ["sample", "--help"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "glmwb.recipes.cli", *args], capture_output=True, text=True
        )
        assert proc.returncode == 0 and "usage: glmwb" in proc.stdout


def test_overrides_may_follow_the_options(capsys):
    """`glmwb run PIPELINE --only sft sft.train.max_steps=5` works: overrides after --only / --from count;
    anything else unknown is still an error (exit 2 from argparse)."""
    from glmwb.recipes.cli import parse_args

    args = parse_args(["run", "q.yaml", "a.b=1", "--only", "sft", "sft.train.max_steps=5"])
    assert args.overrides == ["a.b=1", "sft.train.max_steps=5"] and args.only == "sft"
    assert parse_args(["validate", "q.yaml", "--", "x.y=2"]).overrides == ["x.y=2"]
    with pytest.raises(SystemExit) as e:
        parse_args(["run", "q.yaml", "--only", "sft", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["world", "--out", "d", "x=1"])  # world takes no overrides


def test_validate_prints_resolved_config(capsys):
    assert main(["validate", str(ROOT / "recipes" / "pretrain_tiny.yaml"), "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "num_kv_heads: 2" in out


def test_resuming_with_another_recipe_is_refused(tmp_path) -> None:
    """Checkpoints in run.dir are resumed; a recipe that differs in more than budgets / logging / evaluation
    is refused before anything runs (it would mix two experiments), and the message names the keys."""
    from glmwb.recipes.cli import load_recipe, resume_conflicts, run_stage
    from glmwb.recipes.loader import dump_yaml, read_yaml, to_plain

    run = tmp_path / "rm"
    first = load_recipe("recipes/reward.yaml", [f"run.dir={run}"])
    dump_yaml(first, run / "config.yaml")
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    longer = load_recipe(
        "recipes/reward.yaml", [f"run.dir={run}", "train.max_steps=400", "train.max_minutes=9"]
    )
    assert resume_conflicts(read_yaml(run / "config.yaml"), to_plain(longer)) == []
    other = load_recipe(
        "recipes/reward.yaml", [f"run.dir={run}", "data.world.train_prompts=50", "optim.lr=1e-3"]
    )
    n = to_plain(first)["data"]["world"]["train_prompts"]
    assert n != 50 and to_plain(first)["optim"]["lr"] == 3e-4
    assert resume_conflicts(read_yaml(run / "config.yaml"), to_plain(other)) == [
        f"data.world.train_prompts: {n} -> 50",
        "optim.lr: 0.0003 -> 0.001",
    ]
    with pytest.raises(RecipeError, match=rf"another recipe \(data.world.train_prompts: {n} -> 50; optim.lr"):
        run_stage(other)
    assert read_yaml(run / "config.yaml")["data"]["world"]["train_prompts"] == n  # nothing was overwritten

    from glmwb.recipes.cli import _check_resume

    fresh = load_recipe(
        "recipes/reward.yaml", [f"run.dir={run}", "data.world.train_prompts=50", "train.resume=false"]
    )
    _check_resume(fresh)  # starting over: the old checkpoints are set aside, not resumed, not deleted
    assert not (run / "checkpoints").exists()
    assert [p.name for p in run.glob("checkpoints.before-*/step_*")] == ["step_000010"]


def test_recipe_files_that_cannot_be_a_recipe_are_one_line_errors(tmp_path):
    """Duplicate keys (YAML keeps the last silently), aliases (an alias bomb expands exponentially),
    non-UTF-8 bytes and oversized files: each a RecipeError naming the file and the problem; at the CLI,
    exit 2 with one line and no traceback."""
    cases = {
        "dupe.yaml": (
            b"stage: pretrain\ntrain:\n  max_steps: 5\n  max_steps: 6\n",
            "key 'max_steps' given twice",
        ),
        "bomb.yaml": (b"a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n", "anchors (&a) are not allowed"),
        "alias.yaml": (b"stage: pretrain\nx: *nope\n", "aliases"),
        "latin1.yaml": (b"stage: pretrain\n# caf\xe9\n", "not UTF-8 text"),
        "huge.yaml": (b"stage: pretrain\n" + b"#" * (1 << 20), "is no recipe"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(RecipeError, match=re.escape(message)) as e:
            load_recipe(path)
        assert str(path) in str(e.value)
    proc = subprocess.run(
        [sys.executable, "-m", "glmwb.recipes.cli", "validate", str(tmp_path / "dupe.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    # an override value is parsed by the same loader: an alias there is kept as the literal text
    assert load_recipe(ROOT / "recipes" / "tokenizer.yaml", ["run.dir=*x"]).run.dir == "*x"


def _numeric_fields_without_range(cls, seen=None):
    """(Class.field, type) for every int / float field reachable from a recipe class that has no Range."""
    import dataclasses
    import types
    import typing

    from glmwb.pretrain.ranges import Range

    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)

    def unranged(tp) -> bool:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *extras = typing.get_args(tp)
            return not any(isinstance(e, Range) for e in extras) and unranged(base)
        if origin in (typing.Union, types.UnionType, list, tuple):
            return any(unranged(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return tp in (int, float)

    def nested(tp):
        if dataclasses.is_dataclass(tp):
            yield tp
        for arg in typing.get_args(tp):
            if isinstance(arg, type) or typing.get_origin(arg) is not None:
                yield from nested(arg)

    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if unranged(hints[f.name]):
            out.append((f"{cls.__qualname__}.{f.name}", hints[f.name]))
        for sub in nested(hints[f.name]):
            out.extend(_numeric_fields_without_range(sub, seen))
    return out


def test_every_numeric_config_field_declares_its_range():
    from glmwb.recipes.schema import stage_class, stage_names

    seen: set = set()
    missing = [m for name in stage_names() for m in _numeric_fields_without_range(stage_class(name), seen)]
    assert len(seen) > 50  # the walk reaches the nested sections, not just the stage classes
    assert missing == [], f"numeric recipe fields without a range (pretrain/ranges.py): {missing}"


@pytest.mark.parametrize(
    "recipe, override, named",
    [
        ("pretrain_tiny.yaml", "train.max_steps=0", "train.max_steps must be an integer >= 1, got 0"),
        ("pretrain_tiny.yaml", "train.batch_size=-4", "train.batch_size must be an integer >= 1"),
        ("pretrain_tiny.yaml", "optim.lr=-0.001", "optim.lr must be a finite number > 0"),
        ("pretrain_tiny.yaml", "optim.lr=.nan", "optim.lr must be a finite number"),
        (
            "pretrain_tiny.yaml",
            "optim.betas=[0.9, 1.0]",
            r"optim.betas\[1\] must be a finite number in \[0, 1\)",
        ),
        (
            "pretrain_tiny.yaml",
            "data.heldout_fraction=1.5",
            r"data.heldout_fraction must be a finite number in \[0, 1\]",
        ),
        (
            "pretrain_tiny.yaml",
            "model.partial_rotary_factor=0",
            r"model.partial_rotary_factor must be .* in \(0, 1\]",
        ),
        ("pretrain_tiny.yaml", "train.max_minutes=0", "train.max_minutes must be a finite number > 0"),
        ("reward.yaml", "train.zero_stage=4", r"train.zero_stage must be an integer in \[0, 3\]"),
        ("reward.yaml", "data.eval_fraction=1", r"data.eval_fraction must be a finite number in \[0, 1\)"),
        ("reward.yaml", "data.world.annotators.noise=-0.1", "data.world.annotators.noise must be"),
        ("sft.yaml", "train.max_steps=-1", "train.max_steps must be an integer >= 1"),
        (
            "dpo.yaml",
            "loss.label_smoothing=0.7",
            r"loss.label_smoothing must be a finite number in \[0, 0.5\)",
        ),
        ("dpo.yaml", "loss.beta=0", "loss.beta must be a finite number > 0"),
        ("ppo.yaml", "generation.top_p=0", r"generation.top_p must be a finite number in \(0, 1\]"),
        ("ppo.yaml", "ppo.lam=2", r"ppo.lam must be a finite number in \[0, 1\]"),
        ("ppo.yaml", "kl.coef=-1", "kl.coef must be a finite number >= 0"),
        ("grpo.yaml", "generation.num_generations=1", "generation.num_generations must be an integer >= 2"),
        ("preferences.yaml", "sampling.k=1", "sampling.k must be an integer >= 2"),
    ],
)
def test_out_of_range_numbers_are_refused_by_name(recipe, override, named):
    path = Path(__file__).resolve().parent.parent / "recipes" / recipe
    load_recipe(path)  # the recipe itself is fine
    with pytest.raises(RecipeError, match=named):
        load_recipe(path, [override])


def test_out_of_range_override_exits_2_with_one_line(tmp_path):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "pretrain_tiny.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "glmwb.recipes.cli", "validate", str(recipe), "train.max_steps=-3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "train.max_steps must be an integer >= 1, got -3" in proc.stderr
