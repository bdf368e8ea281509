"""align/sft.py: TRL's SFTTrainer on a tiny GLM folder — labels, packing, LoRA, the recipe end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from glmwb.align.data import Conversation, encode_conversation
from glmwb.align.sft import (
    SFTDataConfig,
    SFTModelConfig,
    SFTRecipe,
    SFTTrainConfig,
    build_trainer,
    encode_dataset,
    save_policy,
)
from glmwb.pretrain.hf import load_pretrained, save_pretrained
from glmwb.pretrain.model import GLM
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.settings import LoRAConfig, RunConfig
from glmwb.pretrain.tokenizer import turn_terminator_ids
from tests.tiny import TINY as BASE_TINY

TINY = BASE_TINY.with_(initializer_range=0.2)  # attention far from uniform at initialisation


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# single-turn, multi-turn with a system turn, and a tool-call chat: lengths vary (packing has work to do); the
# tool chat is ~280 tokens with the tiny tokenizer (GLM-4's Chinese tools preamble is mostly bytes there)
CHATS = [
    Conversation(
        [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "7 + 5 = 12."}]
    ),
    Conversation(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "北京的天气？"},
            {"role": "assistant", "content": "晴。"},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    ),
    Conversation(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
            {"role": "observation", "content": '{"temp": 15}'},
            {"role": "assistant", "content": "It is 15 degrees."},
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    ),
    Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 你好！"}]),
    Conversation(
        [
            {"role": "user", "content": "The quick brown fox jumps over the lazy dog. Repeat it."},
            {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
        ]
    ),
    Conversation([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and two threads on a busy 2-core machine are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tiny_tokenizer, tmp_path_factory):
    """A random tiny GLM saved as a Hugging Face folder with the tiny tokenizer (what model.init_from names)."""
    torch.manual_seed(0)
    cfg = TINY.with_(
        pad_token_id=tiny_tokenizer.pad_token_id, eos_token_ids=tuple(turn_terminator_ids(tiny_tokenizer))
    )
    return save_pretrained(GLM(cfg), tmp_path_factory.mktemp("sft") / "base", tokenizer=tiny_tokenizer)


def recipe_for(folder, tmp_path, **sections) -> SFTRecipe:
    base = SFTRecipe(
        run=RunConfig(dir=str(tmp_path / "run"), seed=0),
        data=SFTDataConfig(n_train=16, n_eval=0, max_length=512, packing=False),
        model=SFTModelConfig(init_from=str(folder), lora=LoRAConfig(enabled=False)),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0),
        train=SFTTrainConfig(batch_size=8, max_steps=4, log_every=1),
    )
    return replace(base, **sections)


def dataset(tok, chats=CHATS, repeat: int = 1):
    ds, stats = encode_dataset(tok, list(chats) * repeat, max_length=512, name="test")
    return ds


# ----------------------------------------------------------------------------------------------------------
# Labels


def test_trl_labels_are_exactly_the_assistant_tokens_and_terminators(
    tiny_folder, tiny_tokenizer, tmp_path
) -> None:
    tok = tiny_tokenizer
    for packing in (False, True):
        recipe = recipe_for(
            tiny_folder, tmp_path, data=SFTDataConfig(n_train=16, n_eval=0, max_length=512, packing=packing)
        )
        trainer = build_trainer(recipe, tok, dataset(tok))
        expected = {}
        for conv in CHATS:
            enc = encode_conversation(tok, conv)
            labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]
            expected[tuple(enc["input_ids"])] = labels
        batch = next(iter(trainer.get_train_dataloader()))
        if packing:  # one flattened row; split it back into conversations at the position restarts
            ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
            starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [len(ids)]
            rows = [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
            assert "attention_mask" not in batch  # padding-free: documents are separated by position_ids only
        else:
            rows = []
            for ids, labels, mask in zip(
                batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
            ):
                n = int(mask.sum())
                assert (labels[n:] == -100).all()
                rows.append((ids[:n].tolist(), labels[:n].tolist()))
        assert len(rows) == len(CHATS)
        for ids, labels in rows:
            assert labels == expected[tuple(ids)]
    # the decoded labels of the tool chat: the call with its terminator, then the answer with <|endoftext|>
    enc = encode_conversation(tok, CHATS[2])
    kept = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(kept, skip_special_tokens=False) == (
        'get_weather\n{"city": "Paris"}<|observation|>\nIt is 15 degrees.<|endoftext|>'
    )


# ----------------------------------------------------------------------------------------------------------
# Packing


def test_packed_losses_equal_unpacked_losses(tiny_folder, tiny_tokenizer, tmp_path) -> None:
    """transformers' GLM (SDPA, no flash-attn) keeps packed conversations apart by their position_ids."""
    tok = tiny_tokenizer
    losses, batches = {}, {}
    for packing in (False, True):
        recipe = recipe_for(
            tiny_folder, tmp_path, data=SFTDataConfig(n_train=16, n_eval=0, max_length=512, packing=packing)
        )
        trainer = build_trainer(recipe, tok, dataset(tok))
        trainer.model.eval()
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses[packing] = trainer.compute_loss(trainer.model, dict(batch)).item()
        batches[packing] = (trainer, batch)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)

    # per conversation: the packed row's logits, cut at the position restarts, equal each one run alone
    trainer, batch = batches[True]
    model = trainer.model
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [packed.shape[0]]
        for a, b in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-5)
        # the control: the same row without the position restarts attends across conversations
        flat = torch.arange(packed.shape[0])[None]
        crossed = model(input_ids=batch["input_ids"], position_ids=flat, use_cache=False).logits[0]
        assert (crossed[starts[1] :] - packed[starts[1] :]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Training: full and LoRA


def test_a_few_steps_lower_the_loss_and_change_every_parameter(tiny_folder, tiny_tokenizer, tmp_path) -> None:
    recipe = recipe_for(tiny_folder, tmp_path, train=SFTTrainConfig(batch_size=6, max_steps=8, log_every=1))
    trainer = build_trainer(recipe, tiny_tokenizer, dataset(tiny_tokenizer))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    final = save_policy(trainer.model, tmp_path / "final", tiny_tokenizer)
    ours = load_pretrained(final)
    assert ours.config.eos_token_ids == tuple(turn_terminator_ids(tiny_tokenizer))
    x = torch.tensor([encode_conversation(tiny_tokenizer, CHATS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, return_logits=True).logits, trainer.model(input_ids=x).logits, atol=1e-5, rtol=1e-5
        )


def test_lora_trains_adapters_only_and_merges_into_a_plain_folder(
    tiny_folder, tiny_tokenizer, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    lora = LoRAConfig(enabled=True, r=4, alpha=8, target_modules=("qkv_proj", "down_proj"))
    recipe = recipe_for(tiny_folder, tmp_path, model=SFTModelConfig(init_from=str(tiny_folder), lora=lora))
    trainer = build_trainer(recipe, tiny_tokenizer, dataset(tiny_tokenizer))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "down_proj",
    }
    trainer.train()
    x = torch.tensor([encode_conversation(tiny_tokenizer, CHATS[0])["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        adapted = trainer.model(input_ids=x, use_cache=False).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_folder)(input_ids=x).logits
    assert (adapted - base).abs().max() > 1e-4  # the adapters learned something
    final = save_policy(trainer.model.merge_and_unload(), tmp_path / "merged", tiny_tokenizer)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(final)(input_ids=x).logits
        ours = load_pretrained(final)(x, return_logits=True).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, adapted, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The recipe


def test_sft_recipe_end_to_end(tiny_folder, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from glmwb.recipes.cli import main

    run = tmp_path / "run"
    code = main([
        "run", "recipes/sft.yaml", f"run.dir={run}", f"model.init_from={tiny_folder}", "data.n_train=48",
        "data.n_eval=8", "train.max_steps=3", "train.batch_size=8", "train.log_every=1", "train.max_minutes=null",
        "train.num_threads=1", "eval.heldout_prompts=6", "eval.max_new_tokens=6", "data.packing=true",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out loss on assistant tokens" in out and "| before |" in out and "| sft |" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["lora"] and summary["packing"]
    assert summary["budget"] == {"stage": "sft", "planned_steps": 3, "steps_done": 3, "stopped_early": False,
                                 "reason": None, "line": "3 of 3 steps"}  # fmt: skip
    assert f"| sft | {run / 'final'} | sft: 3 of 3 steps |" in out  # which model the table's row is
    assert json.loads((run / "final" / "glmwb_run.json").read_text())["init_from"] == str(tiny_folder)
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["heldout_loss_after"])
    train, held = summary["data"]["train"], summary["data"]["heldout"]
    assert train["conversations"] + train["too_long"] == 48 and held["conversations"] + held["too_long"] == 8
    assert train["conversations"] > 40
    assert set(summary["eval"]["reports"]) == {"before", "sft"} and summary["eval"]["n_prompts"] == 6
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    for name in ("loss.png", "config.yaml", "eval/table.md", "eval/answers.jsonl"):
        assert (run / name).stat().st_size > 50, name
    assert not (run / "trainer").exists()
    assert type(AutoModelForCausalLM.from_pretrained(run / "final")).__name__ == "GlmForCausalLM"
    assert load_pretrained(run / "final").config.num_layers == 2


def test_sft_recipe_on_files_and_recipe_errors(tiny_folder, tmp_path, capsys) -> None:
    from glmwb.recipes.cli import main

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(30)] + [
        {"instruction": "x"}
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = [
        f"model.init_from={tiny_folder}",
        "train.max_steps=2",
        "train.batch_size=4",
        "eval.heldout_prompts=0",
    ]
    args = ["run", "recipes/sft.yaml", f"run.dir={tmp_path}/f", "data.source=files", f"data.paths=[{path}]"]
    assert main([*args, *common, "data.skip_invalid=true", "model.lora.enabled=false"]) == 0
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["data"]["skipped_rows"] == 1 and summary["data"]["formats"] == {str(path): "alpaca"}
    assert summary["data"]["train"]["conversations"] + summary["data"]["heldout"]["conversations"] == 30
    capsys.readouterr()

    bad = [
        ([*args[3:], *common], f"{path}, row 31: missing field 'output'"),
        (["model.init_from=/nowhere"], "model.init_from: no model folder"),
        (["data.source=files", "data.paths=[]"], "data.paths is empty"),
        (["model.lora.target_modules=[qkv_proj, lm_head]"], "unknown ['lm_head']"),
        (["data.max_length=8"], "data.max_length must be >= 16"),
        ([f"model.init_from={tiny_folder}", "data.max_length=16", "eval.heldout_prompts=0"], "no training conversation fits"),
    ]  # fmt: skip
    for overrides, message in bad:
        assert main(["run", "recipes/sft.yaml", f"run.dir={tmp_path}/x", *overrides]) == 2
        assert message in capsys.readouterr().err, message
