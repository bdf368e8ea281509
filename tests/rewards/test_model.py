"""The reward model: score at the terminator, padded = packed = one at a time, Hugging Face folder that
transformers' GlmForSequenceClassification (and TRL's RewardTrainer) load with the same scores."""

from __future__ import annotations

import json

import pytest
import torch

from glmwb.pretrain.hf import save_pretrained
from glmwb.pretrain.tokenizer import encode_response
from glmwb.rewards.model import (
    PAD_TOKEN,
    RewardModel,
    packed_batch,
    padded_batch,
    reward_pad_id,
    score_sequences,
)
from tests.rewards.conftest import tiny_glm

PROMPTS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "你好，请介绍一下自己。"}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ],
]
RESPONSES = ["4", "我是一个助手，很高兴认识你。", "Goodbye, and thanks for the quick brown fox!"]


def _sequences(tok) -> list[list[int]]:
    return [encode_response(tok, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]


def test_score_is_read_at_the_terminator(tiny_tokenizer) -> None:
    model = RewardModel(tiny_glm(tiny_tokenizer))
    seqs = _sequences(tiny_tokenizer)
    h = model.backbone.hidden_states(torch.tensor([seqs[0]]))  # (1, T, D)
    expected = model.score(h[0, -1])  # the <|endoftext|> after the response
    got = model(**padded_batch([seqs[0]], reward_pad_id(tiny_tokenizer)))
    assert torch.allclose(got[0], expected, atol=1e-6)
    # the response matters; tokens after the terminator (padding) do not
    other = encode_response(tiny_tokenizer, PROMPTS[0], "5")
    assert not torch.allclose(got, model(**padded_batch([other], reward_pad_id(tiny_tokenizer))))


def test_padded_packed_and_single_agree(tiny_tokenizer) -> None:
    model = RewardModel(tiny_glm(tiny_tokenizer), heads=["a", "b", "c"])
    pad = reward_pad_id(tiny_tokenizer)
    seqs = _sequences(tiny_tokenizer)
    single = torch.cat([model(**padded_batch([s], pad)) for s in seqs])  # (3, 3)
    padded = model(**padded_batch(seqs, pad))
    packed = model(**packed_batch(seqs, pad, row_tokens=64))  # forces several rows
    batch = packed_batch(seqs, pad, row_tokens=64)
    assert batch["input_ids"].shape[0] >= 2
    assert torch.allclose(padded, single, atol=1e-5) and torch.allclose(packed, single, atol=1e-5)
    by_length = score_sequences(model, seqs, pad, batch_tokens=40, max_batch=2)  # sorted, several batches
    assert torch.allclose(by_length, single, atol=1e-5)


def test_hf_folder_loads_in_transformers_with_the_same_scores(tiny_tokenizer, tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model = RewardModel(tiny_glm(tiny_tokenizer), heads=["reward", "correctness"])
    folder = model.save(tmp_path / "rm", tokenizer=tiny_tokenizer)
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["GlmForSequenceClassification"] and config.num_labels == 2
    assert config.id2label == {0: "reward", 1: "correctness"}
    assert config.pad_token_id == tiny_tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert config.pad_token_id != tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == "GlmForSequenceClassification"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token == PAD_TOKEN
    seqs = _sequences(tok)
    batch = padded_batch(seqs, config.pad_token_id)
    with torch.no_grad():
        ours = model(**batch)
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # transformers finds the last non-pad token by itself, with left padding too
        left = tok.pad({"input_ids": seqs}, padding_side="left", return_tensors="pt")
        theirs_left = hf(**left).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert torch.allclose(ours, theirs_left, atol=1e-5)
    loaded = RewardModel.from_pretrained(folder)
    assert loaded.heads == ["reward", "correctness"]
    assert torch.allclose(loaded(**batch), ours, atol=1e-6)
    assert json.loads((folder / "reward_config.json").read_text())["heads"] == ["reward", "correctness"]


def test_init_from_a_causal_lm_folder(tiny_tokenizer, tmp_path) -> None:
    glm = tiny_glm(tiny_tokenizer)
    save_pretrained(glm, tmp_path / "base", tokenizer=tiny_tokenizer)
    rm = RewardModel.from_pretrained(tmp_path / "base", heads=["reward", "harmlessness"])
    assert rm.heads == ["reward", "harmlessness"] and rm.backbone.lm_head is None
    for (name, p), q in zip(
        rm.backbone.named_parameters(),
        [p for n, p in glm.named_parameters() if "lm_head" not in n],
        strict=True,
    ):
        assert torch.equal(p, q), name
    rm.save(tmp_path / "rm", tiny_tokenizer)
    with pytest.raises(ValueError, match="has reward heads"):
        RewardModel.from_pretrained(tmp_path / "rm", heads=["other"])


def test_trl_reward_trainer_runs_on_the_folder(tiny_tokenizer, tmp_path) -> None:
    """TRL's RewardTrainer (where plain Bradley-Terry fits) trains the saved folder on our tokenisation."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    folder = RewardModel(tiny_glm(tiny_tokenizer)).save(tmp_path / "rm", tokenizer=tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [
        {"chosen_ids": encode_response(tok, p, r + " 😀"), "rejected_ids": encode_response(tok, p, r)}
        for p, r in zip(PROMPTS * 4, RESPONSES * 4, strict=True)
    ]
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, learning_rate=1e-3,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    assert model.config.pad_token_id == tok.convert_tokens_to_ids(PAD_TOKEN)  # TRL kept our pad token
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
