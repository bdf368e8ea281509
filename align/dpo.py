"""`glmwb run recipes/dpo.yaml`: preference pairs → DPO-family training of a GLM policy → before / after.

Two engines (``engine:``):

- ``trl``: TRL 1.16 on ``transformers``' ``GlmForCausalLM`` loaded from ``model.init_from`` (a folder, so
  TRL can load its reference copy). ``trainer: dpo`` is ``DPOTrainer`` (losses sigmoid / ipo / robust /
  hinge), except the reference-free ``loss.type: simpo``, which TRL 1.16 has only in
  ``trl.experimental.cpo.CPOTrainer`` (``loss_type="simpo"``, ``cpo_alpha=0``); ``trainer: kto`` is
  ``KTOTrainer`` on unpaired examples (from pairs: chosen desirable, rejected undesirable; or the world's
  single answers rated by its checker). Reference: TRL's copy of init_from, or ``reference: precomputed``
  (TRL's ``precompute_ref_log_probs``: one pass before training, no reference kept); with LoRA TRL keeps no
  reference at all and switches the adapter off to get it (tested).
- ``packed``: our own padding-free loop on ``pretrain.model.GLM`` (``align/packed_dpo.py``): sequences of
  many pairs packed into rows, reference log-probs precomputed once; the same losses plus ``cdpo``.

GLM has no end-of-turn token: an answer ends with ``<|endoftext|>``, which the policy must learn to emit.
TRL renders a conversational ``prompt + chosen`` through the chat template, which writes nothing after the
last answer (as GLM-4's official template), so every row asks the template to end a final assistant turn
with the tokenizer's eos token (``chat_template_kwargs: {"end_final_turn": true}``, the same column the
store's export writes); the ids equal ``pretrain.tokenizer.encode_chat``'s (tested). Ties
("tie" / "both bad") carry no preference direction and are dropped (counted in the summary).

Evaluation before and after, on held-out data: the held-out pairs' log-prob margins and implicit-reward
margin / accuracy (policy vs reference log-ratios; 0 before training by definition), and
``align.evaluate.evaluate_policy`` on held-out world prompts (accuracy, language, concision, score, RM
reward when ``eval.reward_model`` is set), printed as a table and saved (eval/table.md, summary.json).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from glmwb.align.hf_common import metrics_callback, optim_arguments
from glmwb.annotation.preference_data import PreferenceDataConfig, WorldPairsConfig, load_records
from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.run_folder import (
    METRICS,
    Budget,
    Curve,
    MetricsLog,
    Panel,
    plot_curves,
    read_metrics,
    run_title,
    write_model_record,
    write_summary,
)
from glmwb.pretrain.settings import LoRAConfig, RunConfig

# ----------------------------------------------------------------------------------------------------------
# Recipe sections


@dataclass(frozen=True)
class DPODataConfig(PreferenceDataConfig):
    """The preference pairs (``annotation.preference_data``; ties are dropped: a tie says neither answer is
    better), and where KTO's unpaired examples come from."""

    world: WorldPairsConfig = field(
        default_factory=lambda: WorldPairsConfig(train_prompts=1000, heldout_prompts=200)
    )
    truncation: Literal["left", "drop", "error"] = "drop"  # longer pairs are left out (counted)
    # trainer: kto — unpaired examples from the pairs (chosen desirable, rejected undesirable) or, world
    # only, one world answer per prompt rated by the world's checker (desirable = correct, right language)
    unpaired: Literal["from_pairs", "world_ratings"] = "from_pairs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncation != "drop":
            raise ValueError("data.truncation: DPO leaves pairs longer than data.max_length out ('drop')")
        if self.unpaired == "world_ratings" and self.source != "world":
            raise ValueError("data.unpaired 'world_ratings' needs data.source 'world'")


@dataclass(frozen=True)
class DPOModelConfig:
    init_from: str | None = None  # an SFT (or base) GLM folder with its tokenizer
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass(frozen=True)
class DPOLossConfig:
    type: Literal["sigmoid", "ipo", "robust", "cdpo", "hinge", "simpo"] = "sigmoid"
    beta: PositiveFloat = 0.1  # deviation from the reference (IPO's tau; SimPO's reward scale)
    # robust / cdpo: assumed label-flip rate, in [0, 0.5)
    label_smoothing: Annotated[float, Range(0, 0.5, hi_open=True)] = 0.0
    simpo_gamma: NonNegFloat = 0.5  # SimPO's target reward margin
    # + sft_weight x the chosen answers' mean token NLL (RPO, Pang et al. 2024; CPO's alpha for simpo): keeps
    # the chosen answers likely while the rejected ones are pushed down
    sft_weight: NonNegFloat = 0.0
    kto_desirable_weight: NonNegFloat = 1.0
    kto_undesirable_weight: NonNegFloat = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"loss.sft_weight must be >= 0, got {self.sft_weight}")


@dataclass(frozen=True)
class DPOTrainConfig:
    batch_size: PositiveInt = 8  # pairs (KTO: examples) per micro-batch
    grad_accum: PositiveInt = 1
    max_steps: PositiveInt = 100
    max_minutes: PositiveFloat | None = None  # stop early (and save) when the wall clock says so
    log_every: PositiveInt = 5
    reference: Literal["model", "precomputed"] = "model"  # trl engine; packed always precomputes
    pack_tokens: PositiveInt = 512  # packed engine: row length (a CPU attends over whole rows: keep it short)
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # trl engine: bfloat16 trains with bf16 autocast and, with LoRA, keeps the frozen base in bf16 (9B: 18.8 GB,
    # not 37.6); auto is float32, the CPU default the suite's figures were measured with
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # trl engine: a DeepSpeed config (JSON file) for transformers' Trainer, e.g. recipes/deepspeed_zero2.json
    deepspeed: str | None = None
    num_threads: PositiveInt | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("train.batch_size, train.grad_accum and train.max_steps must be >= 1")


@dataclass(frozen=True)
class DPOEvalConfig:
    world_prompts: NonNegInt = 100  # held-out world prompts answered before / after (0: skip)
    max_new_tokens: PositiveInt = 48
    reward_model: str | None = None  # a reward folder: RM reward of the answers and RM win rate


@dataclass(frozen=True)
class DPORecipe:
    """`stage: dpo` — DPO / IPO / robust / cDPO / SimPO / KTO on preference data, then before / after."""

    stage: Literal["dpo"] = "dpo"
    run: RunConfig = field(default_factory=RunConfig)
    trainer: Literal["dpo", "kto"] = "dpo"
    engine: Literal["trl", "packed"] = "trl"
    data: DPODataConfig = field(default_factory=DPODataConfig)
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0, min_lr_ratio=0.1)
    )
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    kernels: KernelConfig | None = None  # null: plain PyTorch; a section applies our kernels to the policy

    def __post_init__(self) -> None:
        check_combination(self.trainer, self.engine, self.loss, self.model.lora.enabled, self.train)


def check_combination(trainer: str, engine: str, loss: DPOLossConfig, lora: bool, train: DPOTrainConfig):
    """Recipe combinations that cannot run, each with what would."""
    if trainer == "kto" and engine != "trl":
        raise ValueError("trainer 'kto' runs on engine 'trl' only (TRL's KTOTrainer)")
    if trainer == "kto" and train.batch_size < 2:
        raise ValueError("trainer 'kto' needs train.batch_size >= 2 (its KL term pairs examples in a batch)")
    if engine == "packed" and lora:
        raise ValueError("engine 'packed' trains the full model; for LoRA use engine 'trl'")
    if engine == "trl" and trainer == "dpo" and loss.type == "cdpo":
        raise ValueError(
            "TRL 1.16's DPOTrainer has no conservative-DPO loss: use engine 'packed', or type 'robust'"
        )
    if loss.type == "simpo" and lora:
        raise ValueError(
            "loss 'simpo' (TRL's experimental CPOTrainer) is run here without LoRA; disable model.lora"
        )
    if loss.type == "simpo" and train.reference == "precomputed":
        raise ValueError(
            "loss 'simpo' is reference-free: train.reference 'precomputed' has nothing to compute"
        )


# ----------------------------------------------------------------------------------------------------------
# Data


def load_pairs(cfg: DPODataConfig, seed: int) -> tuple[list, list, dict[str, Any]]:
    """(train records, held-out records, facts) with ties dropped: a tie says neither answer is better."""
    train, held, facts = load_records(cfg, seed)
    facts = dict(facts)
    facts["ties_dropped"] = {"train": sum(r.tie for r in train), "heldout": sum(r.tie for r in held)}
    train = [r for r in train if not r.tie]
    held = [r for r in held if not r.tie]
    if cfg.max_train_pairs:
        train = train[: cfg.max_train_pairs]
    if cfg.max_eval_pairs:
        held = held[: cfg.max_eval_pairs]
    if not train:
        raise ConfigError(
            "data: no strict (non-tie) training pairs; every pair was a tie or the data is empty"
        )
    return train, held, facts


def fits(tok, record, max_length: int) -> bool:
    from glmwb.pretrain.packing import encode_pair

    p = encode_pair(tok, record.prompt, record.chosen, record.rejected)
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_length


# What TRL passes to the chat template with every row: control tokens inside message text are escaped, and a
# final assistant turn ends with the tokenizer's eos token, GLM's turn terminator, so TRL trains the model to
# stop (pretrain/tokenizer.py, GLM4_CHAT_TEMPLATE). The store's export writes the same column.
CHAT_TEMPLATE_KWARGS: dict[str, bool] = {"sanitize_control_tokens": True, "end_final_turn": True}


def conversational_rows(records) -> list[dict[str, Any]]:
    """TRL's conversational preference rows, with ``CHAT_TEMPLATE_KWARGS``."""
    return [
        {
            "prompt": [dict(m) for m in r.prompt],
            "chosen": [{"role": "assistant", "content": r.chosen}],
            "rejected": [{"role": "assistant", "content": r.rejected}],
            "chat_template_kwargs": dict(CHAT_TEMPLATE_KWARGS),
        }
        for r in records
    ]


def unpaired_rows(records) -> list[dict[str, Any]]:
    """KTO's unpaired rows from pairs: the chosen answer desirable, the rejected one undesirable."""
    rows = []
    for r in records:
        for text, label in ((r.chosen, True), (r.rejected, False)):
            rows.append(
                {
                    "prompt": [dict(m) for m in r.prompt],
                    "completion": [{"role": "assistant", "content": text}],
                    "label": label,
                    "chat_template_kwargs": dict(CHAT_TEMPLATE_KWARGS),
                }
            )
    return rows


def world_rated_rows(cfg: DPODataConfig, seed: int) -> list[dict[str, Any]]:
    """KTO's unpaired rows from single world answers (one random kind per prompt), labelled by the checker:
    desirable when the answer is correct and in the prompt's language."""
    from glmwb.pretrain.world import make_world
    from glmwb.pretrain.world.responses import KINDS

    world = make_world(seed=cfg.world.seed, num_entities=cfg.world.num_entities)
    rng = random.Random(seed)
    rows = []
    for prompt in world.prompts("train", cfg.world.train_prompts, seed=seed):
        answer = world.responses(prompt, seed=rng.randrange(2**31))[KINDS.index(rng.choice(KINDS))]
        c = world.check(prompt, answer.text)
        rows.append(
            {
                "prompt": [dict(m) for m in prompt.messages],
                "completion": [{"role": "assistant", "content": answer.text}],
                "label": bool(c.correct and c.right_language),
                "chat_template_kwargs": dict(CHAT_TEMPLATE_KWARGS),
            }
        )
    return rows


def training_tokenizer(tok):
    """A copy of ``tok`` for TRL: this project's GLM-4 chat template (``glm_tokenizer``: any GLM-4 tokenizer,
    THUDM's too) and left padding; the saved folders keep the tokenizer as it was."""
    from glmwb.pretrain.tokenizer import glm_tokenizer

    train_tok = glm_tokenizer(copy.deepcopy(tok))
    train_tok.padding_side = "left"
    return train_tok


# ----------------------------------------------------------------------------------------------------------
# TRL engine


def _device(train: DPOTrainConfig) -> str:
    if train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return train.device


def hf_lora_config(cfg: LoRAConfig):
    """PEFT LoRA for transformers' Glm: our fused ``qkv_proj`` is q_proj / k_proj / v_proj there."""
    from peft import LoraConfig

    names = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    targets = [n for t in cfg.target_modules for n in names.get(t, [t])]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )


def trl_config(recipe: DPORecipe, out_dir: Path, device: str):
    """Our sections → TRL's argument class (DPOConfig, KTOConfig or CPOConfig), in this one place."""
    o, t, loss = recipe.optim, recipe.train, recipe.loss
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        **optim_arguments(o),
        logging_steps=t.log_every,
        save_strategy="no",
        report_to="none",
        bf16=t.dtype == "bfloat16",  # fp32 by default (the CPU); bf16 autocast on a GPU recipe
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        deepspeed=t.deepspeed,
        seed=recipe.run.seed,
        beta=loss.beta,
        max_length=recipe.data.max_length,
        dataloader_num_workers=0,
    )
    if recipe.trainer == "kto":
        from trl import KTOConfig

        return KTOConfig(
            **common,
            desirable_weight=loss.kto_desirable_weight,
            undesirable_weight=loss.kto_undesirable_weight,
            precompute_ref_log_probs=t.reference == "precomputed",
        )
    if loss.type == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(**common, loss_type="simpo", cpo_alpha=loss.sft_weight, simpo_gamma=loss.simpo_gamma)
    from trl import DPOConfig

    return DPOConfig(
        **common,
        loss_type=[loss.type, "sft"] if loss.sft_weight > 0 else [loss.type],
        loss_weights=[1.0, loss.sft_weight] if loss.sft_weight > 0 else None,
        label_smoothing=loss.label_smoothing,
        precompute_ref_log_probs=t.reference == "precomputed",
    )


def make_trl_trainer(recipe: DPORecipe, init_from: str, train_records, tok, out_dir: Path, callbacks=()):
    """The TRL trainer for ``recipe`` on a policy loaded from ``init_from`` (kernels applied when set)."""
    import datasets
    from transformers import AutoModelForCausalLM

    device = _device(recipe.train)
    args = trl_config(recipe, out_dir, device)
    lora_bf16 = recipe.train.dtype == "bfloat16" and recipe.model.lora.enabled
    model = AutoModelForCausalLM.from_pretrained(
        init_from, dtype=torch.bfloat16 if lora_bf16 else torch.float32
    )
    if recipe.kernels is not None:
        from glmwb.kernels.apply import apply_kernels

        apply_kernels(model, recipe.kernels)
    peft_config = hf_lora_config(recipe.model.lora) if recipe.model.lora.enabled else None
    train_tok = training_tokenizer(tok)
    common = dict(model=model, args=args, processing_class=train_tok, callbacks=list(callbacks))
    if recipe.trainer == "kto":
        from trl import KTOTrainer

        if recipe.data.unpaired == "world_ratings":
            rows = world_rated_rows(recipe.data, recipe.run.seed)
        else:
            rows = unpaired_rows(train_records)
        random.Random(recipe.run.seed).shuffle(rows)  # KTO samples sequentially
        return KTOTrainer(**common, train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config)
    dataset = datasets.Dataset.from_list(conversational_rows(train_records))
    if recipe.loss.type == "simpo":
        from trl.experimental.cpo import CPOTrainer

        # CPO renders the template to text, then tokenises it: control tokens inside message text are not
        # escaped on this path (the option needs tokenize=True), so the column is left out
        return CPOTrainer(**common, train_dataset=dataset.remove_columns("chat_template_kwargs"))
    from trl import DPOTrainer

    return DPOTrainer(**common, train_dataset=dataset, peft_config=peft_config)


def train_trl(
    recipe: DPORecipe, init_from: str, train_records, tok, run_dir: Path, log=print
) -> dict[str, Any]:
    """Train with TRL and save the (merged, when LoRA) policy to run_dir/final with its tokenizer."""
    from accelerate.utils import is_peft_model

    callback = metrics_callback(run_dir / METRICS, recipe.train.max_minutes, "dpo")
    trainer = make_trl_trainer(recipe, init_from, train_records, tok, run_dir / "trl", [callback])
    facts = {"reference": reference_kind(trainer), "train_examples": len(trainer.train_dataset)}
    log(f"TRL {type(trainer).__name__}: {facts['train_examples']} examples, reference = {facts['reference']}")
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    budget = callback.budget(trainer.state)
    model = trainer.model
    if is_peft_model(model):
        model = model.merge_and_unload()
    final = run_dir / "final"
    save_hf_policy(model, tok, final, like=init_from)
    return {
        "engine": "trl",
        "trainer": type(trainer).__name__,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "train_loss": result.training_loss,
        "stopped_early": budget.stopped_early,
        "final": str(final),
        "budget": budget.to_dict(),
        **facts,
    }


def reference_kind(trainer) -> str:
    from accelerate.utils import is_peft_model

    if getattr(trainer, "precompute_ref_logps", False):
        return "precomputed log-probs (no reference model kept)"
    if type(trainer).__name__ == "CPOTrainer":
        return "none (reference-free)"
    if trainer.ref_model is None and is_peft_model(trainer.model):
        return "the policy with its LoRA adapter switched off (no second model)"
    return f"a frozen copy of the policy ({type(trainer.ref_model).__name__})"


def save_hf_policy(model, tok, folder: Path, like: str | None = None) -> Path:
    """A Hugging Face folder (GlmForCausalLM + tokenizer) that ``align.evaluate.load_policy`` reads.

    ``like``: the folder trained from; its stop tokens are put back (transformers' Trainer overwrites
    ``eos_token_id`` with the tokenizer's single eos, which would drop GLM's other turn terminators)."""
    folder.mkdir(parents=True, exist_ok=True)
    if like is not None:
        from transformers import AutoConfig

        original = AutoConfig.from_pretrained(like)
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = original.eos_token_id
            cfg.pad_token_id = original.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Packed engine


def train_packed_engine(recipe: DPORecipe, init_from: str, train_records, tok, run_dir: Path, log=print):
    from glmwb.align.packed_dpo import PackedSettings, train_packed
    from glmwb.pretrain.hf import load_pretrained, save_pretrained
    from glmwb.pretrain.packing import encode_pair

    device = _device(recipe.train)
    model = load_pretrained(init_from, device=device, kernels=recipe.kernels)
    pairs = [encode_pair(tok, r.prompt, r.chosen, r.rejected) for r in train_records]
    o, t, loss = recipe.optim, recipe.train, recipe.loss
    settings = PackedSettings(
        loss=loss.type, beta=loss.beta, label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
        sft_weight=loss.sft_weight,
        batch_size=t.batch_size, grad_accum=t.grad_accum, max_steps=t.max_steps, max_minutes=t.max_minutes,
        log_every=t.log_every, row_tokens=t.pack_tokens, packed=True, lr=o.lr, min_lr_ratio=o.min_lr_ratio,
        warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
        grad_clip=o.grad_clip, seed=recipe.run.seed,
    )  # fmt: skip
    model.gradient_checkpointing = t.gradient_checkpointing
    log(
        f"packed DPO ({loss.type}): {len(pairs)} pairs, rows of {t.pack_tokens} tokens, reference precomputed"
    )
    out = train_packed(model, pairs, tok.pad_token_id, settings, run_dir, log)
    final = run_dir / "final"
    save_pretrained(model, final, tok)
    history = out.pop("history")
    reason = out.pop("stop_reason")
    out["budget"] = Budget("dpo", t.max_steps, out["steps"], out["stopped_early"], reason).to_dict()
    return {
        "engine": "packed", "trainer": "packed_dpo", "final": str(final), "train_examples": len(pairs),
        "reference": "none (reference-free)" if loss.type == "simpo" else "precomputed log-probs (one pass)",
        "train_loss": history[-1]["loss"] if history else None, **out,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def encode_heldout(tok, records, max_length: int):
    from glmwb.pretrain.packing import encode_pair

    pairs = [encode_pair(tok, r.prompt, r.chosen, r.rejected) for r in records]
    return [p for p in pairs if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_length]


def heldout_logps(model, pairs, pad_id: int):
    from glmwb.align.packed_dpo import reference_logps

    return reference_logps(model, pairs, pad_id, batch_pairs=32, desc="held-out log-probs")


def pair_lengths(pairs):
    return (
        torch.tensor([len(p.chosen_ids) for p in pairs]),
        torch.tensor([len(p.rejected_ids) for p in pairs]),
    )


def world_eval(model, tok, world, prompts, scorer, max_new_tokens: int) -> dict[str, Any]:
    from glmwb.align.evaluate import evaluate_policy

    return evaluate_policy(model, tok, world, prompts, scorer, max_new_tokens)


ROWS = (
    ("accuracy", "world", "accuracy"),
    ("right_language", "world", "right_language"),
    ("concision", "world", "concision"),
    ("score", "world", "score"),
    ("mean_chars", "world", "mean_chars"),
    ("reward_mean (RM)", "world", "reward_mean"),
    ("held-out pairs: logp accuracy", "pairs", "logp_accuracy"),
    ("held-out pairs: logp/token accuracy", "pairs", "logp_per_token_accuracy"),
    ("held-out pairs: logp margin", "pairs", "logp_margin"),
    ("held-out pairs: implicit-reward margin", "pairs", "reward_margin"),
    ("held-out pairs: implicit-reward accuracy", "pairs", "reward_accuracy"),
)


def before_after_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for name, part, key in ROWS:
        b, a = before.get(part, {}).get(key), after.get(part, {}).get(key)
        if a is None or b is None:
            continue
        lines.append(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines)


TRAINING_PANELS = (
    Panel("preference loss", "loss (per pair)", (Curve("loss", "train (batch mean)"),)),
    Panel(
        "implicit-reward margin",
        "β · (log-ratio chosen − rejected) (nats)",
        (Curve("rewards/margins", "train"), Curve("heldout/reward_margin", "held-out pairs", markers=True)),
    ),
    Panel(
        "implicit-reward accuracy",
        "fraction of pairs with chosen > rejected",
        (
            Curve("rewards/accuracies", "train"),
            Curve("heldout/reward_accuracy", "held-out pairs", markers=True),
        ),
    ),
    Panel(
        "log-probability of the answers",
        "sum of token log-probs (nats)",
        (Curve("logps/chosen", "chosen"), Curve("logps/rejected", "rejected")),
    ),
)


def plot_metrics(
    metrics_path: Path, out: Path, title: str = "DPO", extra_rows: Sequence[dict] = ()
) -> Path | None:
    """Loss, implicit-reward margin and accuracy, answer log-probs per logged step (the keys TRL and the
    packed loop share); ``extra_rows``: held-out points (``heldout/...`` keys) drawn on the same panels."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r] + list(extra_rows)
    return plot_curves(rows, out, TRAINING_PANELS, title, ncols=2)


# ----------------------------------------------------------------------------------------------------------
# Entry points


def train_policy(recipe: DPORecipe, init_from: str, train_records, tok, run_dir: Path, log=print):
    """One training run from ``init_from`` on ``train_records`` (the online recipe calls this per round)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    MetricsLog(run_dir / METRICS).reset()
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    if recipe.engine == "packed":
        out = train_packed_engine(recipe, init_from, train_records, tok, run_dir, log)
    else:
        out = train_trl(recipe, init_from, train_records, tok, run_dir, log)
    write_model_record(out["final"], Budget.from_dict(out["budget"]), run_dir, init_from)
    plot_metrics(run_dir / METRICS, run_dir / "training.png", training_title(recipe, init_from, run_dir, out))
    return out


def training_title(recipe: DPORecipe, init_from: str, run_dir: Path, train: dict[str, Any]) -> str:
    what = f"{recipe.trainer}/{recipe.loss.type if recipe.trainer == 'dpo' else 'kto'} ({recipe.engine})"
    return run_title(what, run_dir, f"policy from {init_from}", Budget.from_dict(train["budget"]))


def evaluate_folder(
    folder: str, tok, held_pairs, ref_logps, world, prompts, scorer, recipe
) -> dict[str, Any]:
    """Held-out pair statistics and world answers of the policy in ``folder`` (our GLM, eval mode)."""
    from glmwb.align.packed_dpo import pair_metrics
    from glmwb.pretrain.generate import load_policy

    model, _ = load_policy(folder)
    out: dict[str, Any] = {}
    if held_pairs:
        logps = heldout_logps(model, held_pairs, tok.pad_token_id)
        ref = None if recipe.loss.type == "simpo" else (ref_logps if ref_logps is not None else logps)
        out["pairs"] = pair_metrics(logps, ref, pair_lengths(held_pairs), recipe.loss.beta)
        out["_logps"] = logps
    if prompts:
        out["world"] = world_eval(model, tok, world, prompts, scorer, recipe.eval.max_new_tokens)
    del model
    return out


def run_dpo(recipe: DPORecipe) -> dict[str, Any]:
    from glmwb.align.evaluate import compare, format_models
    from glmwb.pretrain.run import load_tokenizer
    from glmwb.pretrain.world import make_world

    run_dir = Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_from = recipe.model.init_from
    if not init_from or not (Path(init_from) / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: no model folder at {init_from!r} (expected config.json there); run the SFT "
            "(or pretrain) stage first, or point model.init_from at a GLM folder"
        )
    if recipe.eval.reward_model and not (Path(recipe.eval.reward_model) / "config.json").is_file():
        raise ConfigError(f"eval.reward_model: no reward folder at {recipe.eval.reward_model!r}")
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    torch.manual_seed(recipe.run.seed)
    tok = load_tokenizer(init_from)
    train_records, held_records, facts = load_pairs(recipe.data, recipe.run.seed)
    n_before = len(train_records)
    train_records = [r for r in train_records if fits(tok, r, recipe.data.max_length)]
    facts["dropped_too_long"] = n_before - len(train_records)
    facts["train_pairs"], facts["heldout_pairs"] = len(train_records), len(held_records)
    print(
        f"data: {len(train_records)} training pairs, {len(held_records)} held-out pairs; ties dropped "
        f"{facts['ties_dropped']}, too long dropped {facts['dropped_too_long']}"
    )

    world = make_world(seed=recipe.data.world.seed, num_entities=recipe.data.world.num_entities)
    prompts = (
        world.prompts("heldout", recipe.eval.world_prompts, seed=recipe.run.seed)
        if recipe.eval.world_prompts
        else []
    )
    scorer = None
    if recipe.eval.reward_model:
        from glmwb.rewards.scoring import RewardScorer

        scorer = RewardScorer.from_pretrained(recipe.eval.reward_model)
    held_pairs = encode_heldout(tok, held_records, recipe.data.max_length)

    before = evaluate_folder(init_from, tok, held_pairs, None, world, prompts, scorer, recipe)
    ref_logps = before.pop("_logps", None)
    train = train_policy(recipe, init_from, train_records, tok, run_dir, print)
    after = evaluate_folder(train["final"], tok, held_pairs, ref_logps, world, prompts, scorer, recipe)
    after.pop("_logps", None)

    table = before_after_table(before, after)
    comparison = compare(before["world"], after["world"]) if prompts else None
    what = f"{recipe.trainer}/{recipe.loss.type if recipe.trainer == 'dpo' else 'kto'} ({recipe.engine})"
    models = format_models({"before": init_from, "after": train["final"]})
    print(f"\n{what}: before → after on held-out data\n{table}\n\n{models}")
    if "pairs" in after:  # the held-out pairs' implicit reward before and after, on the training curves
        held = [{"step": s, **{f"heldout/{k}": v for k, v in r["pairs"].items()}}
                for s, r in ((0, before), (train["steps"], after))]  # fmt: skip
        title = training_title(recipe, init_from, run_dir, train)
        plot_metrics(run_dir / METRICS, run_dir / "training.png", title, held)
    if comparison:
        print(
            f"win rate vs the start policy: world score {comparison['by_world_score']['win_rate']:.3f}"
            + (
                f", RM {comparison['by_reward_model']['win_rate']:.3f}"
                if "by_reward_model" in comparison
                else ""
            )
        )
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "table.md").write_text(f"{table}\n\n{models}\n")
    for name, report in (("before", before), ("after", after)):
        if "world" in report:
            with (eval_dir / f"answers_{name}.jsonl").open("w", encoding="utf-8") as f:
                for a in report["world"]["answers"]:
                    f.write(json.dumps(a, ensure_ascii=False) + "\n")
    strip = lambda r: {  # noqa: E731
        k: ({kk: vv for kk, vv in v.items() if kk != "answers"} if k == "world" else v) for k, v in r.items()
    }
    summary = {
        "stage": "dpo",
        "trainer": recipe.trainer,
        "engine": recipe.engine,
        "loss": recipe.loss.type,
        "init_from": init_from,
        "data": facts,
        "train": train,
        "before": strip(before),
        "after": strip(after),
        "comparison": comparison,
        "table": table,
        "final": train["final"],
    }
    budget = Budget.from_dict(train["budget"])
    write_summary(run_dir, summary, budget, default=_json)
    print(f"policy → {train['final']} ({budget.line()}); summary → {run_dir / 'summary.json'}")
    return summary


def _json(x: Any) -> Any:
    if isinstance(x, float):
        return None
    return str(x)
