"""The run folder (pretrain/run_folder.py): checkpoints that survive kill -9 at any point of a save, a
truncated metrics line, trainer states that cannot run code, budgets and the model record, the plotter."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glmwb.pretrain import run_folder as rf
from glmwb.pretrain.data import DedupConfig, FilterConfig, build_dataset
from glmwb.pretrain.world import make_world
from tests.tiny import TINY


def _model_files(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def test_a_killed_save_leaves_nothing_that_is_listed_and_is_cleaned(tmp_path) -> None:
    rf.save_checkpoint(tmp_path, 2, _model_files, {"step": 2})
    root = tmp_path / "checkpoints"
    (root / "step_000004.tmp").mkdir()  # killed while writing step 4
    (root / "step_000004.tmp" / "config.json").write_text("{")
    (root / "step_000001.del").mkdir()  # killed while removing step 1
    (root / "notes.txt").write_text("mine")
    assert [p.name for p in rf.checkpoint_dirs(tmp_path)] == ["step_000002"]  # no int() of "000004.tmp"
    assert rf.latest_checkpoint(tmp_path) == root / "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step_000002"]


def test_a_checkpoint_moved_aside_to_be_replaced_is_put_back_when_the_new_one_never_came(tmp_path) -> None:
    rf.save_checkpoint(tmp_path, 3, _model_files, {"step": 3})
    root = tmp_path / "checkpoints"
    (root / "step_000003").rename(root / "step_000003.old")  # killed between the two renames of a re-save
    (root / "step_000003.tmp").mkdir()
    assert rf.latest_checkpoint(tmp_path) == root / "step_000003"
    assert rf.load_trainer_state(root / "step_000003") == {"step": 3}


def test_rotation_keeps_the_newest_and_a_failed_save_keeps_the_old_ones(tmp_path) -> None:
    for step in (1, 2, 3):
        rf.save_checkpoint(tmp_path, step, _model_files, {"step": step}, keep=2, digits=5)
    assert [p.name for p in rf.checkpoint_dirs(tmp_path)] == ["step_00002", "step_00003"]

    def broken(folder: Path) -> None:
        _model_files(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rf.save_checkpoint(tmp_path, 4, broken, {"step": 4}, keep=2, digits=5)
    assert [p.name for p in rf.checkpoint_dirs(tmp_path)] == ["step_00002", "step_00003"]
    rf.save_checkpoint(tmp_path, 3, _model_files, {"step": 3, "again": True}, keep=2, digits=5)
    assert rf.load_trainer_state(rf.latest_checkpoint(tmp_path))["again"] is True
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00002", "step_00003"]


class _Payload:
    """Unpickling this runs Path.touch(marker): code, not data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_trainer_state_that_would_run_code_is_refused_not_run(tmp_path) -> None:
    marker = tmp_path / "ran"
    ckpt = rf.save_checkpoint(tmp_path, 1, _model_files, {"step": 1, "rng": _Payload(marker)})
    with pytest.raises(
        rf.CheckpointError, match=r"refused to load: .*it refers to getattr.*train.resume=false"
    ):
        rf.load_trainer_state(ckpt)
    assert not marker.exists()
    torch.load(ckpt / rf.TRAINER_STATE, weights_only=False)  # what resuming did before: it runs
    assert marker.exists()


def test_resuming_pretraining_from_a_malicious_checkpoint_is_refused(
    packed_dir, tiny_tokenizer, tmp_path
) -> None:
    from glmwb.pretrain.data import load_packed
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.train import OptimConfig, TrainConfig, train

    marker = tmp_path / "ran"
    rf.save_checkpoint(tmp_path / "run", 1, _model_files, {"step": 1, "x": _Payload(marker)})
    model = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tiny_tokenizer))))
    data = load_packed(packed_dir / "train"), load_packed(packed_dir / "heldout")
    with pytest.raises(rf.CheckpointError, match="refused"):
        train(
            model, tiny_tokenizer, *data, OptimConfig(), TrainConfig(max_steps=2), tmp_path / "run", log=print
        )
    assert not marker.exists()


def test_rng_state_is_plain_data_and_round_trips(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rf.rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    legacy = np.random.get_state()  # the numpy tuple older checkpoints hold
    ckpt = rf.save_checkpoint(tmp_path, 1, _model_files, {"step": 1, "rng": state, "legacy": legacy})
    loaded = rf.load_trainer_state(ckpt)  # weights_only=True
    rf.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    rf.set_rng_state({**loaded["rng"], "numpy": loaded["legacy"]})


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_a_truncated_last_metrics_line_is_skipped_and_dropped_on_resume(tmp_path) -> None:
    log = rf.MetricsLog(tmp_path / rf.METRICS)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step, "grad_norm": float("nan")})
    with log.path.open("a") as f:
        f.write('{"step": 4, "lo')  # the writer was killed mid-line
    rows = rf.read_metrics(log.path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["grad_norm"] is None  # strict JSON: NaN -> null
    assert rf.truncate_metrics(log.path, 2) == 2
    assert log.path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    log.path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage before the last line
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        rf.read_metrics(log.path)


# ----------------------------------------------------------------------------------------------------------
# Kill -9 at many points of the saves, resume each time: the run ends as if never stopped


# KIND:N = die at the N-th operation of that kind in one process (tests/run_folder_child.py). The first list
# hits each kind once along a 6-step run: a half-written model file and trainer state, an unrenamed complete
# checkpoint, a half-removed folder, half a metrics line, the metrics rewrite of a resume, an fsync; the
# second (slow) list hits each kind at several places along a 30-step run, rotations and resumes included.
EACH_KIND = ("model:2", "rename:2", "replace:1", "metrics:3", "state:3", "rmtree:1", "fsync:3")
MANY = (
    "model:1", "state:1", "fsync:3", "rename:1", "metrics:2", "rmtree:1", "replace:1", "rename:2", "fsync:9",
    "model:2", "state:2", "metrics:4", "rmtree:2", "rename:3", "fsync:14", "replace:1", "rename:4", "model:3",
    "state:3", "rmtree:3", "metrics:6",
)  # fmt: skip


@pytest.fixture(scope="module")
def packed_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    texts = make_world(seed=0, num_entities=16).corpus(400, seed=0)
    build_dataset(texts, tiny_tokenizer, 64, out, heldout_fraction=0.1, filter_cfg=FilterConfig.accept_all(),
                  dedup_cfg=DedupConfig(near=False), show_progress=False)  # fmt: skip
    return out


def _child(packed_dir: Path, run_dir: Path, vocab: int, steps: int, kill: str | None = None) -> int:
    child = Path(__file__).with_name("run_folder_child.py")
    cmd = [
        sys.executable,
        str(child),
        str(packed_dir),
        str(run_dir),
        str(vocab),
        str(steps),
        *([kill] if kill else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode in (0, -9), done.stderr[-3000:]
    return done.returncode


def _numbers(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in rf.read_metrics(run_dir / rf.METRICS)
    ]


@pytest.mark.parametrize(
    "points, steps",
    [pytest.param(EACH_KIND, 6, id="each-kind"), pytest.param(MANY, 30, id="many", marks=pytest.mark.slow)],
)
def test_killed_at_many_points_during_saves_resumes_to_the_uninterrupted_run(
    packed_dir, tiny_tokenizer, tmp_path, points, steps
) -> None:
    vocab = max(TINY.vocab_size, len(tiny_tokenizer))
    assert _child(packed_dir, tmp_path / "straight", vocab, steps) == 0
    run, newest, kills = tmp_path / "killed", 0, 0
    for kill in points:
        if _child(packed_dir, run, vocab, steps, kill) == 0:
            break  # the run finished before this kill point
        kills += 1
        # what the next start resumes from (looked at, its leftovers left for it): complete, never older
        found = rf.checkpoint_dirs(run, with_state=True)
        ckpt = found[-1] if found else None
        assert ckpt is not None or newest == 0, kill
        if ckpt is not None:
            step = rf.load_trainer_state(ckpt)["step"]
            assert step >= newest, (kill, step, newest)
            assert load_file(ckpt / "model.safetensors")  # the weights read whole
            newest = step
    else:
        assert _child(packed_dir, run, vocab, steps) == 0
    hit = [line.split()[0] for line in (tmp_path / "kills.log").read_text().splitlines()]
    assert hit == list(points[:kills]) and kills >= len(points) - 2, (hit, points)
    assert {h.split(":")[0] for h in hit} == {
        "model",
        "state",
        "fsync",
        "rename",
        "metrics",
        "rmtree",
        "replace",
    }
    assert _numbers(run) == _numbers(tmp_path / "straight")
    assert [r["step"] for r in _numbers(run) if r["kind"] == "train"] == list(range(1, steps + 1))
    a = load_file(tmp_path / "straight" / "checkpoints" / f"step_{steps:06d}" / "model.safetensors")
    b = load_file(run / "checkpoints" / f"step_{steps:06d}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{s:06d}" for s in (steps - 1, steps)
    ]


# ----------------------------------------------------------------------------------------------------------
# Budgets, the model record, curves


def test_budget_lines_and_the_time_limit_reason() -> None:
    assert rf.Budget("pretrain", 600, 600).line() == "600 of 600 steps"
    early = rf.Budget("pretrain", 600, 418, True, rf.TimeLimit(30).reason)
    assert early.line() == "stopped early at step 418 of 600 (train.max_minutes=30 reached)"
    assert rf.Budget.from_dict(early.to_dict()) == early
    assert not rf.TimeLimit(None).reached() and rf.TimeLimit(0.5, "train.max_minutes").reason.endswith(
        "=0.5 reached"
    )
    both = rf.Budget.combine("online_dpo", [rf.Budget("dpo", 30, 30), early], "round")
    assert (both.planned_steps, both.steps_done, both.stopped_early) == (630, 448, True)
    assert both.reason == "round 2: stopped early at step 418 of 600 (train.max_minutes=30 reached)"


def test_the_model_record_says_which_run_trained_it(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("stage: sft\n")
    rf.write_model_record(
        tmp_path / "final", rf.Budget("sft", 48, 24, True, "train.max_minutes=1 reached"), tmp_path
    )
    record = rf.read_model_record(tmp_path / "final")
    assert (
        record["steps_done"] == 24
        and record["run_dir"] == str(tmp_path)
        and len(record["recipe_sha256"]) == 64
    )
    assert (
        rf.describe_model(tmp_path / "final")
        == "sft: stopped early at step 24 of 48 (train.max_minutes=1 reached)"
    )
    assert rf.describe_model(tmp_path) == "no training record (glmwb_run.json)"


def test_plot_curves_draws_the_panels_that_have_data(tmp_path) -> None:
    rows = [{"step": s, "loss": 1 / s, "kind": "train"} for s in range(1, 6)] + [
        {"step": 5, "kind": "eval", "acc": 0.5}
    ]
    panels = [
        rf.Panel("loss", "loss (nats)", (rf.Curve("loss", "train", where=(("kind", "train"),)),)),
        rf.Panel("accuracy", "share right", (rf.Curve("acc", "held-out", markers=True),)),
        rf.Panel("missing", "nothing", (rf.Curve("nope", "no such key"),)),
    ]
    out = rf.plot_curves(rows, tmp_path / "a.png", panels, rf.run_title("test", tmp_path, "a model"))
    assert out is not None and out.stat().st_size > 5000
    assert (
        rf.plot_curves(rows, tmp_path / "b.png", panels[2:], "t") is None
        and not (tmp_path / "b.png").exists()
    )
