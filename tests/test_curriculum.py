"""The staged curriculum (recipes/pretrain_curriculum.yaml), shrunk: stages run in order by one command, each
from the previous one's model with its own mixture, length and schedule; stopped by SIGTERM inside a stage,
the same command again finishes it from its checkpoint without redoing the stages before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from glmwb.pretrain.run_folder import read_metrics

MODEL = "{vocab_size: 832, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 8}"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(run_dir: Path) -> list[str]:
    small = ["corpus.num_docs=300", "corpus.world.num_entities=12", "train.batch_size=4", "train.eval_batches=1",
             "train.log_every=1", "train.max_minutes=null", "train.num_threads=1", "optim.warmup_steps=1"]  # fmt: skip
    per_stage = {
        "general": [f"model={MODEL}", "data.seq_len=32", "train.max_steps=3"],
        "tasks": ["data.seq_len=32", "train.max_steps=100000", "train.save_every=100000"],
        "long": ["data.seq_len=128", "train.max_steps=2", "train.batch_size=1"],
    }
    args = [f"run.dir={run_dir}", "tokenizer.corpus.num_docs=300", "tokenizer.corpus.world.num_entities=12",
            "tokenizer.tokenizer.vocab_size=600"]  # fmt: skip
    for stage, own in per_stage.items():
        args += [f"{stage}.{o}" for o in small + own]
    return [sys.executable, "-m", "glmwb.recipes.cli", "run", "recipes/pretrain_curriculum.yaml", *args]


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if r.get("kind") == "train"] if path.exists() else []


def test_curriculum_runs_stages_in_order_and_resumes_between_and_within(tmp_path):
    cmd = _command(tmp_path)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_train_steps(tmp_path / "tasks")) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # inside the second stage
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert _train_steps(tmp_path / "general") == [1, 2, 3]
    stopped = _train_steps(tmp_path / "tasks")[-1]
    assert not (tmp_path / "tasks" / "final").exists() and not (tmp_path / "long").exists()
    general_final = (tmp_path / "general" / "final" / "model.safetensors").stat().st_mtime_ns

    # the same command again, with the second stage's budget now reachable
    cmd = [c.replace("tasks.train.max_steps=100000", f"tasks.train.max_steps={stopped + 2}") for c in cmd]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert f"resumed from {tmp_path / 'general'}/checkpoints/step_000003 at step 3" in out  # not retrained
    assert f"at step {stopped}" in out
    assert _train_steps(tmp_path / "general") == [1, 2, 3]
    assert _train_steps(tmp_path / "tasks") == list(range(1, stopped + 3))
    assert _train_steps(tmp_path / "long") == [1, 2]
    assert (tmp_path / "general" / "final" / "model.safetensors").stat().st_mtime_ns >= general_final
    # each stage's own settings: mixture, length, schedule, the previous stage's model, the long context
    cfgs = {s: json.loads((tmp_path / s / "final" / "config.json").read_text()) for s in ("tasks", "long")}
    assert cfgs["tasks"]["rope_parameters"]["rope_theta"] == 10_000.0
    assert cfgs["long"]["rope_parameters"]["rope_theta"] == 100_000.0
    assert "rope_theta 10000 -> 100000" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["tokenizer", "general", "tasks", "long"]
    assert summary["finished"]
    rows = {s: read_metrics(tmp_path / s / "metrics.jsonl") for s in ("general", "tasks", "long")}
    lr = {s: max(r["lr"] for r in rs if r.get("kind") == "train") for s, rs in rows.items()}
    assert lr == {"general": 3e-3, "tasks": 1e-3, "long": 5e-4}
    seq = {
        s: json.loads((tmp_path / s / "data" / "train" / "meta.json").read_text())["seq_len"] for s in rows
    }
    assert seq == {"general": 32, "tasks": 32, "long": 128}
