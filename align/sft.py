"""`glmwb run recipes/sft.yaml`: supervised fine-tuning of a GLM chat policy with TRL's ``SFTTrainer``.

Who does what:
- ours (``align/data.py``, ``pretrain/tokenizer.py``): conversations (the embedded world's correct answers,
  or alpaca / oasst-zh / ShareGPT tool-call / messages files) -> ``input_ids`` + ``assistant_masks`` through
  ``encode_chat``: 1 on what the model generates in assistant turns, each turn's terminator included
  (GLM has no end-of-turn token: the next ``<|user|>`` / ``<|observation|>``, or the final
  ``<|endoftext|>``). TRL receives the tokenised data set, so its own chat-template masking never runs.
- TRL 1.16 ``SFTTrainer``: labels from the masks (-100 elsewhere), best-fit-decreasing packing with
  padding-free batches (``position_ids`` restart at each conversation), the fused LM-head loss, the
  training loop (``transformers.Trainer``: AdamW, warm-up + cosine, accumulation, clipping, tqdm).
- ``transformers`` 5.23 ``GlmForCausalLM``: without flash-attn, its SDPA / eager mask builder reads the
  document boundaries of a packed row from the ``position_ids`` restarts when no attention mask and no KV
  cache are given (TRL trains with ``use_cache=False``), so packed conversations never attend to each
  other (tests/align/test_sft.py compares packed and unpacked losses).
- PEFT: LoRA on the attention / MLP linears, merged into the weights at the end.
- ours: the time limit, ``metrics.jsonl`` / ``loss.png`` / ``summary.json``, the final folder written by
  ``pretrain.hf.save_pretrained`` (loadable by ``load_pretrained`` and ``AutoModelForCausalLM``; its eos
  ids are the turn terminators), and before / after answers on held-out world prompts
  (``align.evaluate``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from glmwb.align.hf_common import HF_LORA_TARGETS, metrics_callback, optim_arguments, peft_config, save_policy
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveFloat, PositiveInt
from glmwb.pretrain.run_folder import Curve, Panel, plot_curves, run_title, write_model_record, write_summary
from glmwb.pretrain.settings import LoRAConfig, RunConfig


@dataclass(frozen=True)
class SFTWorldConfig:
    """``source: world``: the embedded world's conversations (world-only settings)."""

    seed: NonNegInt = 0
    num_entities: PositiveInt = 96
    multi_turn: Fraction = 0.2  # share of conversations with 2-3 user turns
    # each prompt's reference answer (it restates the question), or any correct phrasing ("varied")
    answers: Literal["reference", "varied"] = "reference"

    def __post_init__(self) -> None:
        if not 0.0 <= self.multi_turn <= 1.0:
            raise ValueError(f"data.world.multi_turn must be in [0, 1], got {self.multi_turn}")


@dataclass(frozen=True)
class SFTDataConfig:
    """Chat data: the embedded world's correct answers, or SFT files (align/data.py's formats)."""

    source: Literal["world", "files"] = "world"
    paths: tuple[str, ...] = ()  # files: JSONL / JSON / .gz / parquet / datasets folder
    format: Literal["auto", "alpaca", "oasst_zh", "sharegpt", "messages"] = "auto"
    skip_invalid: bool = False  # leave out (and count) malformed rows instead of stopping at the first
    world: SFTWorldConfig = field(default_factory=SFTWorldConfig)
    n_train: PositiveInt | None = 1200  # world: conversations; files: a cap (null: every row)
    # held-out conversations for the held-out loss (world: held-out prompts; files: split off, <= a tenth)
    n_eval: NonNegInt = 100
    max_length: PositiveInt = 128  # tokens; longer conversations are left out (counted), never cut mid-answer
    packing: bool = True  # best-fit-decreasing rows of max_length tokens, padding-free

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("data.source is 'files' but data.paths is empty; list SFT files")
        if self.source == "world" and not self.n_train:
            raise ValueError("data.n_train: the world needs a number of conversations (>= 1)")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"data.n_train must be >= 1 or null, got {self.n_train}")
        if self.n_eval < 0:
            raise ValueError(f"data.n_eval must be >= 0, got {self.n_eval}")
        if self.max_length < 16:
            raise ValueError(f"data.max_length must be >= 16, got {self.max_length}")


@dataclass(frozen=True)
class SFTModelConfig:
    init_from: str = "runs/quickstart/pretrain/final"  # a GLM folder (base or policy) with its tokenizer
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(enabled=True, r=16, alpha=32.0))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass(frozen=True)
class SFTTrainConfig:
    batch_size: PositiveInt = 4  # packed rows (or conversations, without packing) per micro-batch
    grad_accum: PositiveInt = 1
    max_steps: PositiveInt = 48
    # when set, max_steps = ceil(epochs x rows / (batch_size x grad_accum))
    epochs: PositiveFloat | None = None
    max_minutes: PositiveFloat | None = None  # stop early (and save) when the wall clock says so
    log_every: PositiveInt = 4
    eval_every: NonNegInt = 0  # held-out loss every N steps; 0: before and after training only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    # a DeepSpeed config (JSON file) for transformers' Trainer, e.g. recipes/deepspeed_zero2.json; null: none.
    # Launch with `deepspeed --num_gpus 1 -m glmwb.recipes.cli run ...` (or torchrun).
    deepspeed: str | None = None
    loss: Literal["nll", "dft"] = "nll"  # dft: Dynamic Fine-Tuning (TRL's loss_type)
    num_threads: PositiveInt | None = None  # torch CPU threads; default: all cores

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("train.batch_size, train.grad_accum and train.max_steps must be >= 1")


@dataclass(frozen=True)
class SFTEvalConfig:
    heldout_prompts: NonNegInt = 200  # world prompts answered greedily before and after; 0: skip
    max_new_tokens: PositiveInt = 48
    before: bool = True  # also evaluate model.init_from (the "before" column)
    batch_size: PositiveInt = 64


@dataclass(frozen=True)
class SFTRecipe:
    """`stage: sft` — chat data -> TRL SFTTrainer (assistant-only loss, packing, LoRA) -> a GLM folder."""

    stage: Literal["sft"] = "sft"
    run: RunConfig = field(default_factory=RunConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0)
    )
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)

    def __post_init__(self) -> None:
        unknown = [t for t in self.model.lora.target_modules if t not in HF_LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"model.lora.target_modules: unknown {unknown}; allowed: {', '.join(HF_LORA_TARGETS)}"
            )


# ----------------------------------------------------------------------------------------------------------
# Data


def load_conversations(cfg: SFTDataConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    """(train conversations, held-out conversations, facts) from the world or from files."""
    from glmwb.align.data import Conversation, SFTDataError, read_sft, world_sft_conversations

    if cfg.source == "world":
        from glmwb.pretrain.world import make_world

        world = make_world(seed=cfg.world.seed, num_entities=cfg.world.num_entities)
        w = cfg.world
        train = world_sft_conversations(world, cfg.n_train, seed, "train", w.multi_turn, w.answers)
        held = (
            world_sft_conversations(world, cfg.n_eval, seed, "heldout", w.multi_turn, w.answers)
            if cfg.n_eval
            else []
        )
        as_conv = [Conversation(m, None, f"world train {i}") for i, m in enumerate(train)]
        return as_conv, [Conversation(m, None, f"world held-out {i}") for i, m in enumerate(held)], {}
    conversations, skipped, formats = [], [], {}
    for path in cfg.paths:
        try:
            res = read_sft(path, cfg.format, cfg.skip_invalid)
        except FileNotFoundError as e:
            raise ConfigError(f"data.paths: {e}") from None
        except SFTDataError as e:
            hint = "" if cfg.skip_invalid else " (data.skip_invalid=true leaves such rows out)"
            raise ConfigError(f"data: {e}{hint}") from None
        conversations += res.conversations
        skipped += res.skipped
        formats[str(path)] = res.format
    random.Random(seed).shuffle(conversations)
    n_eval = min(cfg.n_eval, len(conversations) // 10)  # never more than a tenth of the data
    held, train = conversations[:n_eval], conversations[n_eval:]
    if cfg.n_train:
        train = train[: cfg.n_train]
    facts = {"formats": formats, "skipped_rows": len(skipped), "skipped_examples": skipped[:5]}
    return train, held, facts


def encode_dataset(tok, conversations: list, max_length: int, name: str):
    """A ``datasets.Dataset`` with ``input_ids`` and ``assistant_masks``; conversations longer than
    ``max_length`` tokens are left out and counted. Returns (dataset or None, stats)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    from glmwb.align.data import encode_conversation

    rows, too_long = [], 0
    for conv in tqdm(conversations, desc=f"encoding {name}", leave=False, disable=len(conversations) < 500):
        enc = encode_conversation(tok, conv)
        if len(enc["input_ids"]) > max_length:
            too_long += 1
            continue
        rows.append(enc)
    lengths = [len(r["input_ids"]) for r in rows]
    stats = {
        "conversations": len(rows),
        "too_long": too_long,
        "tokens": sum(lengths),
        "assistant_tokens": sum(sum(r["assistant_masks"]) for r in rows),
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
    }
    return (Dataset.from_list(rows) if rows else None), stats


# ----------------------------------------------------------------------------------------------------------
# TRL / PEFT mapping


def trl_config(recipe: SFTRecipe, max_steps: int, has_eval: bool, use_cuda: bool):
    """Our recipe sections -> TRL's ``SFTConfig`` (the one place its argument names appear)."""
    from trl import SFTConfig

    t, o = recipe.train, recipe.optim
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and use_cuda)
    return SFTConfig(
        output_dir=str(Path(recipe.run.dir) / "trainer"),
        seed=recipe.run.seed,
        max_steps=max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=16,  # fixed, so held-out losses compare across runs (a mean of batch means)
        gradient_accumulation_steps=t.grad_accum,
        **optim_arguments(o),
        logging_steps=t.log_every,
        eval_strategy="steps" if has_eval and t.eval_every else "no",
        eval_steps=t.eval_every or None,
        save_strategy="no",
        report_to="none",
        use_cpu=not use_cuda,
        bf16=bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        deepspeed=t.deepspeed,
        loss_type=t.loss,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",  # whole conversations; padding-free with position_ids restarts
        eval_packing=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def build_trainer(
    recipe: SFTRecipe,
    tok,
    train_ds,
    held_ds=None,
    max_steps: int | None = None,
    use_cuda: bool = False,
    callbacks: list | None = None,
):
    """TRL's ``SFTTrainer`` on ``GlmForCausalLM`` from ``model.init_from`` (+ PEFT LoRA when enabled), fed
    the tokenised data sets (``input_ids`` + ``assistant_masks``)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    lora = recipe.model.lora
    t = recipe.train
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and use_cuda)
    # with LoRA the base is frozen: in bf16 it takes half the memory (9B: 18.8 GB, not 37.6); the adapters
    # PEFT adds stay fp32, and the optimizer sees only them
    dtype = torch.bfloat16 if bf16 and lora.enabled else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.init_from, dtype=dtype, attn_implementation=recipe.model.attn_implementation
    )
    return SFTTrainer(
        model=model,
        args=trl_config(recipe, max_steps or recipe.train.max_steps, held_ds is not None, use_cuda),
        train_dataset=train_ds,
        eval_dataset=held_ds,
        processing_class=tok,
        peft_config=peft_config(lora) if lora.enabled else None,
        callbacks=callbacks or [],
    )


LOSS_PANELS = (
    Panel(
        "loss on assistant tokens",
        "cross-entropy (nats / token)",
        (Curve("loss", "train"), Curve("eval_loss", "held-out conversations", markers=True)),
    ),
    Panel("learning rate", "learning rate", (Curve("learning_rate", "AdamW lr (warm-up + cosine)"),)),
    Panel("gradient norm", "global grad norm (before clipping)", (Curve("grad_norm", "grad norm"),)),
)


def plot_loss(metrics_path: Path, out_png: Path, title: str = "SFT") -> Path | None:
    """Training and held-out loss, learning rate and gradient norm per logged step."""
    return plot_curves(metrics_path, out_png, LOSS_PANELS, title)


# ----------------------------------------------------------------------------------------------------------
# Before / after on held-out world prompts


def evaluate_before_after(recipe: SFTRecipe, final: Path, out_dir: Path) -> dict[str, Any]:
    from glmwb.align.evaluate import compare, evaluate_policy, format_models, format_table
    from glmwb.pretrain.generate import load_policy
    from glmwb.pretrain.world import make_world

    cfg = recipe.eval
    world = make_world(seed=recipe.data.world.seed, num_entities=recipe.data.world.num_entities)
    prompts = world.prompts("heldout", cfg.heldout_prompts, seed=recipe.run.seed)
    folders = {"before": recipe.model.init_from} if cfg.before else {}
    folders["sft"] = str(final)
    reports = {}
    for name, folder in folders.items():
        model, tok = load_policy(folder)
        reports[name] = evaluate_policy(
            model, tok, world, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
        )
    comparisons = {"sft": compare(reports["before"], reports["sft"])} if cfg.before else {}
    table = format_table(reports, comparisons)
    models = format_models(folders)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(f"{table}\n\n{models}\n", encoding="utf-8")
    with (out_dir / "answers.jsonl").open("w", encoding="utf-8") as f:
        for name, r in reports.items():
            for a in r["answers"]:
                f.write(json.dumps({"policy": name, **a}, ensure_ascii=False) + "\n")
    return {
        "n_prompts": len(prompts),
        "reports": {n: {k: v for k, v in r.items() if k != "answers"} for n, r in reports.items()},
        "comparisons": comparisons,
        "table": table,
        "models": models,
    }


# ----------------------------------------------------------------------------------------------------------
# The stage


def run_sft(recipe: SFTRecipe) -> dict[str, Any]:
    from glmwb.pretrain.run import load_tokenizer

    started = time.time()
    run_dir = Path(recipe.run.dir)
    init = Path(recipe.model.init_from)
    if not (init / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: no model folder at {str(init)!r} (expected config.json there); run the "
            "pretrain stage first or point model.init_from at a GLM folder"
        )
    tok = load_tokenizer(str(init))
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    use_cuda = recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())
    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")

    train_convs, held_convs, facts = load_conversations(recipe.data, recipe.run.seed)
    train_ds, train_stats = encode_dataset(tok, train_convs, recipe.data.max_length, "train")
    held_ds, held_stats = encode_dataset(tok, held_convs, recipe.data.max_length, "held-out")
    if train_ds is None:
        raise ConfigError(
            f"data: no training conversation fits data.max_length={recipe.data.max_length} "
            f"({train_stats['too_long']} too long); raise data.max_length"
        )
    print(f"data: train {json.dumps(train_stats)}; held-out {json.dumps(held_stats)}")

    t = recipe.train
    max_steps = t.max_steps
    if t.epochs is not None:
        rows = len(train_ds)
        if recipe.data.packing:
            rows = math.ceil(train_stats["tokens"] / recipe.data.max_length)
        max_steps = max(1, math.ceil(t.epochs * rows / (t.batch_size * t.grad_accum)))

    lora = recipe.model.lora
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    callback = metrics_callback(metrics_path, t.max_minutes, "sft")
    trainer = build_trainer(recipe, tok, train_ds, held_ds, max_steps, use_cuda, [callback])
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(
        f"SFT: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.3f}M trainable{', LoRA' if lora.enabled else ''}); "
        f"{max_steps} steps x {t.batch_size} x {t.grad_accum} {'packed rows' if recipe.data.packing else 'conversations'}"
    )
    # under DeepSpeed ZeRO 1-2 the Trainer evaluates only once training has built its engine
    eval_before = trainer.evaluate()["eval_loss"] if held_ds is not None and not t.deepspeed else None
    train_start = time.time()
    result = trainer.train()
    train_seconds = time.time() - train_start
    budget = callback.budget(trainer.state)
    eval_after = trainer.evaluate()["eval_loss"] if held_ds is not None else None

    hf_model = trainer.model
    if lora.enabled:
        hf_model = hf_model.merge_and_unload()
    final = save_policy(hf_model, run_dir / "final", tok)
    write_model_record(final, budget, run_dir, init)
    if (run_dir / "trainer").is_dir() and not any((run_dir / "trainer").iterdir()):
        (run_dir / "trainer").rmdir()  # the Trainer's output_dir; nothing is saved there (save_strategy "no")
    what = f"LoRA r={lora.r} (merged)" if lora.enabled else "full fine-tuning"
    plot_loss(metrics_path, run_dir / "loss.png", run_title(f"SFT of {init}", run_dir, what, budget))

    summary: dict[str, Any] = {
        "model": str(final),
        "init_from": str(init),
        "steps": trainer.state.global_step,
        "max_steps": max_steps,
        "stopped_early": budget.stopped_early,
        "train_loss": result.training_loss,
        "heldout_loss_before": eval_before,
        "heldout_loss_after": eval_after,
        "train_seconds": round(train_seconds, 1),
        "lora": lora.enabled,
        "packing": recipe.data.packing,
        "train_rows": len(trainer.train_dataset),  # packed rows when packing, else conversations
        "data": {"train": train_stats, "heldout": held_stats, "source": recipe.data.source, **facts},
    }
    if eval_before is not None:
        print(f"held-out loss on assistant tokens: {eval_before:.3f} before → {eval_after:.3f} after")
    elif eval_after is not None:
        print(f"held-out loss on assistant tokens after training: {eval_after:.3f} (DeepSpeed: none before)")
    if recipe.eval.heldout_prompts > 0:
        report = evaluate_before_after(recipe, final, run_dir / "eval")
        summary["eval"] = report
        print(f"\nheld-out world prompts (n={report['n_prompts']}), greedy answers:\n{report['table']}")
        print(f"\n{report['models']}")
    summary["seconds"] = round(time.time() - started, 1)
    write_summary(run_dir, summary, budget)
    print(
        f"SFT policy → {final} ({budget.line()}; {summary['seconds']:.0f} s in all, "
        f"{train_seconds:.0f} s training)"
    )
    return summary
