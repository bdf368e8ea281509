"""DeepSpeed ZeRO-2 with two ranks on one CPU (gloo) gives the weights of one rank accumulating two micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
MODEL = "model.config={vocab_size: 832, hidden_size: 48, intermediate_size: 80, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 12}"


def test_two_ranks_equal_one_rank_with_accumulation(tiny_tokenizer, tmp_path) -> None:
    pytest.importorskip("deepspeed")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    common = [
        "model.init_from=null", f"data.tokenizer={tmp_path}/tok", MODEL, "data.world.train_prompts=64",
        "data.world.heldout_prompts=32", "train.max_steps=3", "train.batch_size=4", "train.eval_every=100",
        "train.max_minutes=null", "train.resume=false", "model.verifier.enabled=false", "train.value_first=null",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "glmwb.recipes.cli", "run", "recipes/reward.yaml"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cli, f"run.dir={tmp_path}/two",
           "train.strategy=deepspeed", "train.zero_stage=2", "train.grad_accum=1", *common]  # fmt: skip
    one = [sys.executable, *cli, f"run.dir={tmp_path}/one", "train.grad_accum=2", *common]
    for cmd in (two, one):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
