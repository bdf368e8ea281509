"""Pretraining at scale on the CPU: two ranks (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 (with and without CPU
offload) follow the loss curve of one process with the same global batch; SIGTERM saves a checkpoint, exits 143 and the run resumes from it.

Every run goes through the CLI (``glmwb run recipes/pretrain_tiny.yaml``; two ranks under ``torchrun``), with
one packed data folder built by the first run and shared by the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmwb.pretrain.run_folder import checkpoint_dirs, load_trainer_state, read_metrics

MODEL = "model={vocab_size: 832, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 8}"
# parity: the largest gap between the per-step losses of one process and of two ranks (fp32 on a CPU; the
# ranks' gradients are averaged by an all-reduce in another order, so the curves agree to rounding)
LOSS_TOLERANCE = 1e-4
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = ["-m", "glmwb.recipes.cli", "run", "recipes/pretrain_tiny.yaml"]


def _args(tmp_path: Path, tok: Path, name: str, *extra: str) -> list[str]:
    return [
        f"run.dir={tmp_path / name}", f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'data'}", MODEL,
        "corpus.num_docs=400", "corpus.world.num_entities=12", "data.seq_len=32", "data.heldout_fraction=0.1",
        "train.batch_size=4", "train.eval_every=1000", "train.eval_batches=1", "train.log_every=1",
        "train.save_every=1000", "train.max_minutes=null", "train.num_threads=1", "optim.warmup_steps=2",
        *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tok(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.distributed
@pytest.mark.slow  # 1-4 minutes on 2 cores (five runs, DeepSpeed's start-up in each rank)
def test_two_ranks_zero2_and_zero3_match_one_process(tok, tmp_path) -> None:
    """ZeRO-2 and ZeRO-3, each without and with CPU offload of the optimizer states (ZeRO-3: and the
    parameters), over two gloo ranks with grad_accum 1 = one process with grad_accum 2."""
    pytest.importorskip("deepspeed")
    steps = "train.max_steps=4"
    _run([sys.executable, *CLI, *_args(tmp_path, tok, "one", steps, "train.grad_accum=2")])
    one = _losses(tmp_path / "one")
    assert len(one) == 4 and one[-1] < one[0]  # it learns: the comparison is not of constants
    for stage, offload in ((2, False), (3, False), (2, True), (3, True)):
        name = f"zero{stage}{'_offload' if offload else ''}"
        two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *CLI,
               *_args(tmp_path, tok, name, steps, "train.grad_accum=1", "train.strategy=deepspeed",
                      f"train.zero_stage={stage}", f"train.offload={str(offload).lower()}")]  # fmt: skip
        _run(two)
        got = _losses(tmp_path / name)
        assert len(got) == len(one)
        gap = max(abs(a - b) for a, b in zip(one, got, strict=True))
        assert gap < LOSS_TOLERANCE, (name, one, got)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert (summary["world_size"], summary["zero_stage"]) == (2, stage)
        assert (tmp_path / name / "final" / "model.safetensors").is_file()


def test_sigterm_saves_a_checkpoint_exits_143_and_resume_continues(tok, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = _args(tmp_path, tok, "run", "train.keep_checkpoints=2")
    proc = subprocess.Popen([sys.executable, *CLI, *args, "train.max_steps=100000"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while (
        time.time() < deadline and len(_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 3
    ):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ckpts = checkpoint_dirs(run_dir, with_state=True)
    assert len(ckpts) == 1
    stopped = load_trainer_state(ckpts[0])["step"]
    assert f"stopped early at step {stopped} of 100000 (SIGTERM received)" in err and "Traceback" not in err
    assert stopped >= 3 and len(_losses(run_dir)) == stopped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["budget"]["stopped_early"] and summary["signal"] == "SIGTERM"
    assert not (run_dir / "final").exists()
    # resume: the same command with a reachable max_steps continues from the saved step
    done = _run([sys.executable, *CLI, *args, f"train.max_steps={stopped + 2}", "train.save_every=1"])
    assert f"resumed from {ckpts[0]} at step {stopped}" in done.stdout + done.stderr
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"] == list(
        range(1, stopped + 3)
    )
    # keep the last N: saves at stopped, stopped + 1, stopped + 2 -> the newest 2 stay
    assert [p.name for p in checkpoint_dirs(run_dir)] == [f"step_{s:06d}" for s in (stopped + 1, stopped + 2)]
    assert (run_dir / "final" / "model.safetensors").is_file()
