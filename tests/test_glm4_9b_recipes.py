"""The three glm-4-9b-chat-hf recipes (recipes/glm4_9b_{sft,reward,dpo}_lora.yaml) run on the CPU, as shipped
but for their sizes, on a scaled-down random GLM-4 of the same architecture: a GlmForCausalLM folder with
GLM-4-9B's vocabulary (151,552), partial rotary 0.5, q/k/v bias, 16:1 grouped-query attention, eps 1.5625e-7,
rope theta 5e6 and an untied head, and a tokenizer like glm-4-9b-chat-hf's (GLM-4's ids and official template,
tests/glm4_fixture.py). Each runs as the recipe says to launch it, DeepSpeed ZeRO-2 included: one rank under
``torchrun`` on the CPU (``DS_ACCELERATOR=cpu``, gloo). Only what a CPU cannot do is overridden: the device,
bf16, the step counts and lengths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glmwb.pretrain.config import GLMConfig
from tests.rewards.conftest import planted_records
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)

TERMINATORS = [151329, 151336, 151338]
SCALED = GLMConfig.glm4_9b().with_(
    hidden_size=128, intermediate_size=432, num_layers=2, num_heads=16, num_kv_heads=1, head_dim=8,
    rope_theta=5e6, max_position_embeddings=2048,
)  # fmt: skip
CPU = ["train.device=cpu", "train.dtype=float32", "train.max_minutes=null"]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def glm4_9b_like(glm4_tokenizer, tmp_path_factory):
    from transformers import AutoConfig

    from glmwb.pretrain.hf import save_pretrained
    from glmwb.pretrain.model import GLM

    torch.manual_seed(0)
    folder = save_pretrained(
        GLM(SCALED), tmp_path_factory.mktemp("glm4_9b") / "glm-4-9b-chat-hf", glm4_tokenizer
    )
    hf = AutoConfig.from_pretrained(folder)
    rope = hf.rope_parameters
    assert (hf.model_type, hf.vocab_size, hf.attention_bias) == ("glm", 151552, True)
    assert (rope["partial_rotary_factor"], rope["rope_theta"]) == (0.5, 5e6)
    assert (hf.num_attention_heads // hf.num_key_value_heads, hf.rms_norm_eps, hf.tie_word_embeddings) == (
        16, 1.5625e-07, False,
    )  # fmt: skip
    return folder


def run(*args: str) -> str:
    """``torchrun --nproc_per_node 1 -m glmwb.recipes.cli run ARGS`` on the CPU (DeepSpeed's CPU accelerator);
    its output, after checking that it succeeded."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "-m",
        "glmwb.recipes.cli",
        "run",
    ]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def stops_of(folder) -> list[int]:
    from transformers import GenerationConfig

    ids = GenerationConfig.from_pretrained(folder).eos_token_id
    return sorted([ids] if isinstance(ids, int) else ids)


def test_sft_lora_recipe(glm4_9b_like, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"问题 {i}：1+{i}=?"},
                {"role": "assistant", "content": f"{1 + i}"},
            ]
        }
        for i in range(12)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = run(
        "recipes/glm4_9b_sft_lora.yaml", f"run.dir={tmp_path}/sft", f"model.init_from={glm4_9b_like}",
        f"data.paths=[{data}]", "data.n_eval=2", "data.max_length=256", "train.grad_accum=1", "train.batch_size=2",
        "train.max_steps=2", "train.eval_every=0", "train.log_every=1", *CPU,
    )  # fmt: skip
    assert "held-out loss on assistant tokens after training" in out  # DeepSpeed: no evaluation before
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["lora"]
    assert stops_of(tmp_path / "sft" / "final") == TERMINATORS


def test_reward_lora_recipe(glm4_9b_like, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in planted_records(24, seed=5)))
    out = run(
        "recipes/glm4_9b_reward_lora.yaml", f"run.dir={tmp_path}/rm", f"model.init_from={glm4_9b_like}",
        "data.format=preference", f"data.paths=[{pairs}]", f"data.eval_paths=[{pairs}]", "data.max_length=96",
        "data.max_eval_pairs=8", "train.grad_accum=1", "train.max_steps=2", *CPU,
    )  # fmt: skip
    assert "\n  length: longer answer wins " in out
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["eval"]["pairwise"]["pairs"] == 8 and "length_baseline" in summary["eval"]
    config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert config["architectures"] == ["GlmForSequenceClassification"] and config["pad_token_id"] == 151334


def test_dpo_lora_recipe(glm4_9b_like, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in planted_records(24, seed=6)))
    run(
        "recipes/glm4_9b_dpo_lora.yaml", f"run.dir={tmp_path}/dpo", f"model.init_from={glm4_9b_like}",
        f"data.paths=[{pairs}]", "data.eval_fraction=0.2", "data.max_length=96", "train.grad_accum=1",
        "train.max_steps=2", "train.log_every=1", "train.num_threads=1", *CPU,
    )  # fmt: skip
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["train"]["steps"] == 2
    assert stops_of(tmp_path / "dpo" / "final") == TERMINATORS
