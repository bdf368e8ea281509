"""The pretraining loop: loss falls, golden equivalences (resume = never stopped, 1x8 = 8x1 accumulation),
and the CLI stages end to end on a tiny world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from glmwb.pretrain.data import DedupConfig, FilterConfig, build_dataset, load_packed
from glmwb.pretrain.model import GLM
from glmwb.pretrain.optim import OptimConfig, lr_at
from glmwb.pretrain.train import TrainConfig, train
from glmwb.pretrain.world import make_world
from glmwb.recipes.cli import main
from tests.tiny import TINY


@pytest.fixture(scope="module")
def packed(tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    texts = make_world(seed=0, num_entities=16).corpus(600, seed=0)
    build_dataset(
        texts,
        tiny_tokenizer,
        64,
        out,
        heldout_fraction=0.1,
        filter_cfg=FilterConfig.accept_all(),
        dedup_cfg=DedupConfig(near=False),
        show_progress=False,
    )
    return load_packed(out / "train"), load_packed(out / "heldout")


def _run(packed, tok, run_dir, kernels=None, **train_kw):
    torch.manual_seed(0)
    model = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tok))), kernels=kernels)
    cfg = TrainConfig(
        **{
            "batch_size": 4,
            "max_steps": 6,
            "eval_every": 1000,
            "eval_batches": 2,
            "log_every": 1,
            "save_every": 1000,
            **train_kw,
        }
    )
    optim = OptimConfig(lr=3e-3, warmup_steps=2)
    summary = train(model, tok, packed[0], packed[1], optim, cfg, run_dir, seed=0, log=lambda s: None)
    return model, summary


@torch.no_grad()
def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 110) >= lr_at(s + 1, cfg, 110) for s in range(10, 110))


def test_loss_falls_params_change_and_outputs_written(packed, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    before = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tiny_tokenizer))))
    model, summary = _run(packed, tiny_tokenizer, tmp_path, max_steps=30, save_every=10, eval_every=15)
    assert math.isfinite(summary["heldout_loss_after"])
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.5
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        assert not torch.equal(p, q), f"{name} did not change"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(train_losses) == 30 and sum(train_losses[-5:]) < sum(train_losses[:5])
    assert (tmp_path / "loss.png").stat().st_size > 5000
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000030"]  # keep_checkpoints=2
    assert {"config.json", "model.safetensors", "trainer_state.pt"} <= {
        p.name for p in (tmp_path / "checkpoints" / "step_000030").iterdir()
    }


def test_resume_equals_never_stopped(packed, tiny_tokenizer, tmp_path):
    straight, _ = _run(packed, tiny_tokenizer, tmp_path / "a", max_steps=6)
    # interrupted: max_minutes=0 stops (and saves) after the first step, schedule still planned for 6
    _, first = _run(packed, tiny_tokenizer, tmp_path / "b", max_steps=6, max_minutes=0.0)
    assert first["stopped_early"] and first["steps"] == 1
    # a new process: fresh model and optimizer, resumed from the newest checkpoint, goes on to 6
    resumed, summary = _run(packed, tiny_tokenizer, tmp_path / "b", max_steps=6)
    assert summary["start_step"] == 1
    assert _max_diff(straight, resumed) < 1e-6
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_grad_accumulation_1x8_equals_8x1(packed, tiny_tokenizer, tmp_path):
    big, _ = _run(packed, tiny_tokenizer, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3)
    small, _ = _run(packed, tiny_tokenizer, tmp_path / "b", batch_size=1, grad_accum=8, max_steps=3)
    assert _max_diff(big, small) < 2e-5


def test_kernels_on_equals_kernels_off_in_the_loop(packed, tiny_tokenizer, tmp_path):
    """The loop asks for no logits, so a model built with the kernels takes the fused LM head + CE too."""
    pytest.importorskip("triton")
    from glmwb.kernels.config import KernelConfig

    runs = {}
    for name, kernels in (("plain", None), ("kernels", KernelConfig())):
        _run(
            packed,
            tiny_tokenizer,
            tmp_path / name,
            kernels=kernels,
            batch_size=2,
            max_steps=3,
            eval_batches=1,
        )
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = torch.tensor(
            [r["loss"] for r in rows if r["kind"] == "train"] + [rows[-1]["heldout_loss"]]
        )
    assert len(runs["plain"]) == 4 and runs["plain"][2] < runs["plain"][0]
    assert (runs["kernels"] - runs["plain"]).abs().max() < 1e-4


def test_quickstart_pipeline_end_to_end(tmp_path, capsys):
    """The quickstart pipeline, shrunk: world → tokenizer → pretrain → summary and HF folder."""
    code = main(
        [
            "run",
            "recipes/quickstart.yaml",
            f"run.dir={tmp_path}",
            "tokenizer.corpus.num_docs=1500",
            "tokenizer.tokenizer.vocab_size=600",
            "pretrain.corpus.num_docs=1500",
            "pretrain.model.vocab_size=640",
            "pretrain.model.num_layers=2",
            "pretrain.model.hidden_size=64",
            "pretrain.model.intermediate_size=128",
            "pretrain.model.head_dim=16",
            "pretrain.train.max_steps=40",
            "pretrain.train.eval_every=20",
            "pretrain.train.batch_size=8",
            "pretrain.data.seq_len=128",
            "preferences.prompts.n=48",
            "preferences.sampling.max_new_tokens=12",
            "reward.data.world.train_prompts=64",
            "reward.data.world.heldout_prompts=48",
            "reward.train.max_steps=4",
            "reward.train.eval_every=2",
            "dpo.rounds.prompts_per_round=8",  # the quickstart's DPO stage is iterative RPO (online_dpo)
            "dpo.rounds.max_new_tokens=8",
            "dpo.train.max_steps=2",
            "ppo.train.steps=3",
            "ppo.train.eval_every=0",
            "ppo.prompts.heldout_prompts=48",
            "ppo.generation.max_new_tokens=12",
            "ppo_rm.train.steps=3",
            "ppo_rm.train.eval_every=0",
            "ppo_rm.prompts.heldout_prompts=48",
            "ppo_rm.generation.max_new_tokens=12",
            "eval.data.n_prompts=40",  # the wiring, not the figures: a small slice of each stage's evaluation
            "eval.data.samples=2",
            "eval.data.max_new_tokens=12",
            "sft.train.max_minutes=0.0001",  # the clock's net fires after SFT's first step: the summaries say so
            "arena.prompts.n=12",
            "arena.sampling.max_new_tokens=8",
            "arena.battles.n=40",
            "arena.battles.refit_every=20",
            "arena.leaderboard.bootstrap=50",
            "benchmarks.max_new_tokens=8",
            "benchmarks.tasks=[{name: world, limit: 8}, {name: arithmetic, limit: 4}]",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    early = "stopped early at step 1 of 48 (train.max_minutes=0.0001 reached)"
    assert "=== sft done in " in out and early in out
    lines = out[out.index("pipeline finished") :].splitlines()
    assert [ln.split()[0] for ln in lines[1:11]] == [
        "tokenizer", "pretrain", "sft", "preferences", "reward", "dpo", "ppo", "ppo_rm", "eval", "arena"
    ]  # fmt: skip
    assert "40 battles among 5 policies" in lines[10]
    assert (
        lines[3].endswith(early) and lines[2].endswith("40 of 40 steps") and "note: stopped early: sft" in out
    )
    pipeline = json.loads((tmp_path / "summary.json").read_text())
    assert pipeline["finished"] and pipeline["stopped_early"] == ["sft"]
    assert [s["budget"]["steps_done"] if s["budget"] else None for s in pipeline["stages"]][:3] == [
        None,
        40,
        1,
    ]
    for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "ppo_rm"):
        record = json.loads((tmp_path / stage / "final" / "glmwb_run.json").read_text())
        assert (record["stage"] in stage or stage in record["stage"]) and record["line"] == pipeline["stages"][
            [s["name"] for s in pipeline["stages"]].index(stage)]["line"]  # fmt: skip
    # the evaluation names each policy's folder and training; the SFT-based ones are flagged
    evaluation = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluation["policies"]["sft"]["training"]["stopped_early"] is True
    assert evaluation["stopped_early"] == ["sft", "dpo", "ppo", "ppo_rm"]
    assert f"| base | {tmp_path / 'pretrain' / 'final'} | pretrain: 40 of 40 steps |" in out
    summary = json.loads((tmp_path / "pretrain" / "summary.json").read_text())
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert summary["heldout_loss_after"] < summary["unigram_baseline"] + 0.5
    assert {s["lang"] for s in summary["samples"]} == {"en", "zh"}
    for stage in (
        "tokenizer",
        "pretrain",
        "sft",
        "preferences",
        "reward",
        "dpo",
        "ppo",
        "ppo_rm",
        "eval",
        "arena",
    ):
        assert (tmp_path / stage / "config.yaml").is_file(), stage
    arena = json.loads((tmp_path / "arena" / "summary.json").read_text())
    assert arena["battles"] == 40 and (tmp_path / "arena" / "leaderboard.png").is_file()
    prefs = json.loads((tmp_path / "preferences" / "summary.json").read_text())
    assert prefs["votes"] == 3 * (prefs["items_added"]) > 0  # the SFT policy's samples, voted on in the store
    reward_data = json.loads((tmp_path / "reward" / "summary.json").read_text())["data"]
    assert reward_data["extra_pairs"] == prefs["rows"]  # ... and read by the reward stage
    reward = json.loads((tmp_path / "reward" / "summary.json").read_text())
    assert reward["eval"]["world"]["pairs"] > 0 and "fraction_of_ceiling" in reward["eval"]["world"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrain" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "pretrain" / "final")
    assert type(model).__name__ == "GlmForCausalLM" and tok.chat_template
    assert "held-out loss" in out


def test_vocab_too_small_is_a_user_error(tmp_path, tiny_tokenizer, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    code = main(
        [
            "run",
            "recipes/pretrain_tiny.yaml",
            f"run.dir={tmp_path}/run",
            f"data.tokenizer={tmp_path}/tok",
            "model.vocab_size=64",
        ]
    )
    assert code == 2
    assert "model.vocab_size (64) is smaller than the tokenizer's" in capsys.readouterr().err
    code = main(["run", "recipes/pretrain_tiny.yaml", f"data.tokenizer={tmp_path}/nowhere"])
    assert code == 2
    assert "no tokenizer folder" in capsys.readouterr().err


def test_checkpoint_folder_is_complete_or_absent(packed, tiny_tokenizer, tmp_path):
    _run(packed, tiny_tokenizer, tmp_path, max_steps=2, save_every=1)
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert not any(n.endswith(".tmp") for n in names)
    assert Path(tmp_path / "checkpoints" / "step_000002" / "trainer_state.pt").is_file()
