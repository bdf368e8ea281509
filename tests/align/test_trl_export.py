"""The store's conversational export, handed to plain TRL (its own ``DPOTrainer``, no code of ours in between
but the tokenizer's chat template), trains GLM's turn terminator: every chosen and rejected completion TRL
trains on ends with the eos token. On a tokenizer trained here and on the glm-4-9b-chat-hf stand-in (ids
151329..), given this project's template by ``load_glm_tokenizer``, the recipe docs/annotation.md gives."""

from __future__ import annotations

import math

import pytest
import torch

from glmwb.annotation.export import export_records, import_records, write_records
from glmwb.annotation.store import Store
from glmwb.pretrain.tokenizer import load_glm_tokenizer
from tests.rewards.conftest import planted_records
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)


def tiny_hf_glm(folder, vocab_size: int, pad_token_id: int) -> str:
    """A random 2-layer ``transformers.GlmForCausalLM`` saved to ``folder`` (TRL loads its reference from it)."""
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    config = GlmConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=pad_token_id,
    )  # fmt: skip
    GlmForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("which", "fmt"),
    [("trained_here", "prefs.jsonl"), ("glm4_official", "prefs.jsonl"), ("glm4_official", "prefs.parquet")],
)
def test_plain_trl_dpo_on_the_export_trains_the_terminator(
    tmp_path, tiny_tokenizer, glm4_tokenizer_folder, which, fmt
):
    import datasets
    from trl import DPOConfig, DPOTrainer

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        import_records(store, planted_records(12, seed=4), source="planted")
        rows = export_records(store, ties="drop").rows
    finally:
        store.close()
    path = write_records(rows, tmp_path / fmt)
    if fmt.endswith(".jsonl"):
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = datasets.Dataset.from_parquet(str(path))
    assert dataset[0]["chat_template_kwargs"] == {"sanitize_control_tokens": True, "end_final_turn": True}

    if which == "trained_here":
        tiny_tokenizer.save_pretrained(tmp_path / "tok")
        tok_folder = tmp_path / "tok"
    else:
        tok_folder = glm4_tokenizer_folder  # GLM-4's official template in its tokenizer_config.json
    tok = load_glm_tokenizer(tok_folder)  # the recipe: this project's template, on any GLM-4 tokenizer
    eos = tok.eos_token_id
    assert eos == (0 if which == "trained_here" else 151329)
    model = tiny_hf_glm(tmp_path / "policy", 151552 if which == "glm4_official" else 832, tok.pad_token_id)

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=256,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    for row in trainer.train_dataset:
        assert row["chosen_ids"][-1] == eos and row["rejected_ids"][-1] == eos
        assert row["chosen_ids"].count(eos) == row["rejected_ids"].count(eos) == 1  # the answer's end only

    seen = []
    collate = trainer.data_collator

    def watching(examples):
        batch = collate(examples)
        seen.append(batch)
        return batch

    trainer.data_collator = watching
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    assert seen
    for batch in seen:  # the last completion token of every sequence TRL trained on is the terminator
        for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True):
            last = int(mask.nonzero().max())
            assert int(ids[last]) == eos
