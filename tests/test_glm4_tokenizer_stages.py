"""Every training stage on a model folder whose tokenizer is like THUDM's glm-4-9b-chat-hf (GLM-4's special
tokens at 151329..151342, GLM-4's official chat template in tokenizer_config.json, a 151,552-row vocabulary):
SFT, reward model, DPO and PPO each take steps, and every id they use is read from that tokenizer (turn
terminators 151336 / 151338 / 151329 as generation stops and in the saved configs, the eos at the end of
every trained answer, the reward read at it), never a constant of a tokenizer trained here (ids 0..9)."""

from __future__ import annotations

import json

import pytest
import torch

from glmwb.pretrain.config import GLMConfig
from tests.glm4_fixture import GLM4_VOCAB_SIZE, OFFICIAL_GLM4_TEMPLATE
from tests.rewards.conftest import planted_records
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)

TERMINATORS = [151336, 151338, 151329]  # <|user|>, <|observation|>, <|endoftext|> in glm-4-9b-chat-hf
SMALL = GLMConfig(
    vocab_size=GLM4_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, max_position_embeddings=256,
)  # fmt: skip


@pytest.fixture(scope="module")
def glm4_folder(glm4_tokenizer, tmp_path_factory):
    """A random small GLM with GLM-4's vocabulary size, saved with the stand-in tokenizer as it comes (the
    official template), as a THUDM folder would be."""
    from transformers import AutoTokenizer

    from glmwb.pretrain.hf import save_pretrained
    from glmwb.pretrain.model import GLM

    torch.manual_seed(0)
    model = GLM(SMALL.with_(pad_token_id=glm4_tokenizer.pad_token_id, eos_token_ids=tuple(TERMINATORS)))
    folder = save_pretrained(model, tmp_path_factory.mktemp("glm4") / "base", tokenizer=glm4_tokenizer)
    assert AutoTokenizer.from_pretrained(folder).chat_template == OFFICIAL_GLM4_TEMPLATE
    return folder


@pytest.fixture(scope="module")
def planted_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in planted_records(40, seed=2)))
    return path


def run(*args: str) -> int:
    from glmwb.recipes.cli import main

    return main(["run", *args])


def stops_of(folder) -> list[int]:
    from transformers import GenerationConfig

    ids = GenerationConfig.from_pretrained(folder).eos_token_id
    return sorted([ids] if isinstance(ids, int) else ids)


def test_sft_trains_on_glm4_ids(glm4_folder, glm4_tokenizer, tmp_path):
    from glmwb.align.data import encode_conversation
    from glmwb.pretrain.tokenizer import load_glm_tokenizer

    tok = load_glm_tokenizer(glm4_folder)
    enc = encode_conversation(
        tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    assert enc["input_ids"][:3] == [151331, 151333, 151336] and enc["input_ids"][-1] == 151329
    assert enc["assistant_masks"][-1] == 1  # the eos that ends the answer is trained
    code = run(
        "recipes/sft.yaml", f"run.dir={tmp_path}/sft", f"model.init_from={glm4_folder}", "data.n_train=16",
        "data.n_eval=4", "data.max_length=192", "train.max_steps=2", "train.batch_size=4", "train.log_every=1",
        "train.max_minutes=null", "train.num_threads=1", "eval.heldout_prompts=2", "eval.max_new_tokens=3",
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert stops_of(tmp_path / "sft" / "final") == sorted(TERMINATORS)


def test_reward_model_reads_the_reward_at_glm4_eos(glm4_folder, planted_file, tmp_path):
    from glmwb.pretrain.tokenizer import load_glm_tokenizer
    from glmwb.rewards.data import encode_pairs

    tok = load_glm_tokenizer(glm4_folder)
    pairs, _ = encode_pairs(tok, planted_records(2, seed=2), 128)
    assert all(p.chosen_ids[-1] == p.rejected_ids[-1] == 151329 for p in pairs)
    code = run(
        "recipes/reward.yaml", f"run.dir={tmp_path}/rm", f"model.init_from={glm4_folder}", "data.source=files",
        f"data.paths=[{planted_file}]", "data.eval_fraction=0.25", "data.max_length=96",
        "model.verifier.enabled=false", "train.value_first=null", "train.max_steps=2", "train.batch_size=4",
        "train.eval_every=2", "train.max_minutes=null", "eval.ensemble=0", "eval.likelihood_baseline=null",
    )  # fmt: skip
    assert code == 0
    config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert config["pad_token_id"] == 151334  # <eop>, read from the tokenizer
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["eval"]["pairwise"]["pairs"] == 10


def test_dpo_trains_on_glm4_ids(glm4_folder, planted_file, tmp_path):
    code = run(
        "recipes/dpo.yaml", f"run.dir={tmp_path}/dpo", f"model.init_from={glm4_folder}", "data.source=files",
        f"data.paths=[{planted_file}]", "data.max_length=96", "train.max_steps=2", "train.batch_size=4",
        "train.log_every=1", "eval.world_prompts=0", "train.num_threads=1",
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "dpo" / "summary.json").read_text())["train"]["steps"] == 2
    assert stops_of(tmp_path / "dpo" / "final") == sorted(TERMINATORS)


def test_ppo_stops_generation_at_glm4_terminators(glm4_folder, tmp_path):
    code = run(
        "recipes/ppo.yaml", f"policy.init_from={glm4_folder}", f"run.dir={tmp_path}/ppo", "train.steps=1",
        "train.batch_size=4", "train.minibatch_size=4", "train.microbatch_size=2", "train.sample_every=1",
        "prompts.train_prompts=8", "prompts.heldout_prompts=4", "prompts.world.anchor_prompts=0",
        "generation.max_new_tokens=4", "eval.max_new_tokens=4", "train.num_threads=1", "train.max_minutes=null",
        "reward.rules={world_score: 1.0}", "eval.rollout_prompts=0", "eval.samples=1", "train.eval_every=0",
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "ppo" / "summary.json").read_text())["steps"] == 1
    assert stops_of(tmp_path / "ppo" / "final") == sorted(TERMINATORS)
