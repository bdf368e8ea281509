"""`glmwb run recipes/grpo.yaml`: GRPO or RLOO on a GLM chat policy with TRL's ``GRPOTrainer`` / ``RLOOTrainer``
and our reward functions.

Who does what:
- ours (``align/reward_funcs.py``): the rewards — rules of ``rewards/rules.py`` (the world's checker, GSM8K
  final answers, format, length) reading the answer's context from dataset columns, and reward models
  in-process (``RewardScorer``) or over HTTP (``RewardClient`` against ``glmwb serve-rewards``). Our reward
  folders are not handed to TRL as models: TRL would read the reward at the last non-pad token, and GLM's pad
  token is its ``<|endoftext|>``, the very token our reward models read the reward at.
- ours (here): the prompts (the embedded world's train prompts with a ``world_prompt`` column for the checker,
  or GSM8K-style files with a ``gold`` column) as chat messages; the policy folder loaded as
  ``transformers.GlmForCausalLM`` with its generation config's eos ids set to GLM's turn terminators
  (``<|user|>``, ``<|observation|>``, ``<|endoftext|>``: GLM has no end-of-turn token), which TRL uses to stop
  sampling and to cut the completion mask after the terminator (the terminator itself is trained on);
  the time limit, ``metrics.jsonl``, ``rewards.png``, ``summary.json``, the final folder, and the before /
  after table on held-out world prompts (``align.evaluate``).
- TRL 1.16: the GLM chat template applied to the prompts, sampling ``num_generations`` completions per prompt
  (``transformers`` generate with a KV cache), group-relative (GRPO) or leave-one-out (RLOO) advantages,
  the clipped policy loss and its variants (``loss_type``), the KL to the reference (``beta``; with LoRA the
  reference is the adapter switched off), the training loop (``transformers.Trainer``: AdamW, schedule,
  clipping, tqdm).
- PEFT: LoRA on the attention / MLP linears, merged into the weights before saving.
- ours (``kernels/``): Triton kernels swapped into the transformers GLM when a ``kernels:`` section is set.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from glmwb.align.hf_common import metrics_callback, optim_arguments, peft_config, save_policy
from glmwb.align.reward_funcs import RewardSetupError, RewardSpec, RuleReward, build_reward_funcs
from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import AnyFloat, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.run_folder import Curve, Panel, plot_curves, run_title, write_model_record, write_summary
from glmwb.pretrain.settings import LoRAConfig, RunConfig, WorldConfig

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's GRPO losses


# ----------------------------------------------------------------------------------------------------------
# Recipe sections


@dataclass(frozen=True)
class GRPOModelConfig:
    init_from: str | None = None  # the policy: an SFT (or base) GLM folder with its tokenizer
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass(frozen=True)
class GRPODataConfig:
    """Prompts: the embedded world's train prompts, or files (GSM8K ``{question, answer}`` rows, or
    ``{prompt, gold?}`` rows where ``prompt`` is a string or chat messages)."""

    source: Literal["world", "files"] = "world"
    world: WorldConfig = field(default_factory=WorldConfig)
    train_prompts: NonNegInt = 512  # world: distinct train prompts; files: a cap (0: every row)
    split: Literal["train", "dev"] = "train"  # world: the prompts' split (dev: PPO's rollout pool)
    paths: tuple[str, ...] = ()  # files: JSONL (.gz allowed)
    eval_paths: tuple[str, ...] = ()  # files: held-out rows for the before / after rule rewards
    system_prompt: str | None = None  # files: a system turn in front of every question
    max_prompt_tokens: PositiveInt = 512  # longer prompts are left out (and counted)

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("data.source is 'files' but data.paths is empty; list JSONL prompt files")
        if self.train_prompts < (1 if self.source == "world" else 0):
            raise ValueError(
                f"data.train_prompts must be >= 1 (world) / >= 0 (files), got {self.train_prompts}"
            )


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled during training."""

    num_generations: Annotated[int, Range(2)] = 8  # completions per prompt (the group)
    max_completion_length: PositiveInt = 32  # tokens, the terminator included
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    top_k: NonNegInt = 0  # 0: no top-k
    repetition_penalty: PositiveFloat = 1.0

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"generation.num_generations must be >= 2 (a group), got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ValueError(
                f"generation.max_completion_length must be >= 1, got {self.max_completion_length}"
            )
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 (sampling), got {self.temperature}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The policy-gradient objective. ``beta``: KL coefficient to the reference (0: no reference model)."""

    beta: NonNegFloat = 0.0
    epsilon: PositiveFloat = 0.2  # clip range of the importance ratio
    epsilon_high: PositiveFloat | None = None  # upper clip (DAPO: 0.28); default epsilon
    num_iterations: PositiveInt = 1  # optimisation passes over each generation batch
    mask_truncated_completions: bool = False  # leave completions that hit the length limit out of the loss
    # GRPO only
    loss_type: str = "dapo"  # one of LOSS_TYPES
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    # RLOO only
    normalize_advantages: bool = False
    reward_clip_range: tuple[AnyFloat, ...] | None = None  # (min, max)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"algo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {self.beta}")
        if self.reward_clip_range is not None and (
            len(self.reward_clip_range) != 2 or self.reward_clip_range[0] >= self.reward_clip_range[1]
        ):
            raise ValueError(
                f"algo.reward_clip_range must be [min, max] with min < max, got {self.reward_clip_range}"
            )
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("algo.loss_type 'luspo' needs algo.importance_sampling_level: sequence")


_GRPO_ONLY = ("loss_type", "scale_rewards", "importance_sampling_level", "multi_objective_aggregation")
_RLOO_ONLY = ("normalize_advantages", "reward_clip_range")


@dataclass(frozen=True)
class GRPOTrainConfig:
    prompts_per_step: PositiveInt = 4  # prompts per optimizer step (x num_generations completions)
    micro_batch: PositiveInt | None = None  # completions per forward / backward (default: all of a step's)
    max_steps: PositiveInt = 50
    max_minutes: PositiveFloat | None = None  # stop early (and save) when the wall clock says so
    log_every: PositiveInt = 5
    save_every: NonNegInt = 0  # 0: only the final folder
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA
    gradient_checkpointing: bool = False
    num_threads: PositiveInt | None = None  # torch CPU threads; default: torch's
    log_completions: bool = False  # TRL prints a sample table every log step

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.max_steps < 1:
            raise ValueError("train.prompts_per_step and train.max_steps must be >= 1")


@dataclass(frozen=True)
class GRPOEvalConfig:
    """Before / after: greedy answers to held-out world prompts (world data) or to data.eval_paths (files)."""

    heldout_prompts: NonNegInt = 200  # 0: no evaluation
    max_new_tokens: PositiveInt = 48
    batch_size: PositiveInt = 64
    before: bool = True  # evaluate model.init_from too (the table's baseline)
    reward_model: str | None = None  # a reward folder: RM rewards and RM win rates in the table


@dataclass(frozen=True)
class GRPORecipe:
    """`stage: grpo` — GRPO (or RLOO, ``trainer: rloo``) from a chat policy with rule / RM rewards."""

    stage: Literal["grpo"] = "grpo"
    run: RunConfig = field(default_factory=RunConfig)
    trainer: Literal["grpo", "rloo"] = "grpo"
    model: GRPOModelConfig = field(default_factory=GRPOModelConfig)
    data: GRPODataConfig = field(default_factory=GRPODataConfig)
    rewards: tuple[RewardSpec, ...] = (RewardSpec("world_correct"),)
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    algo: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0)
    )
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    eval: GRPOEvalConfig = field(default_factory=GRPOEvalConfig)
    kernels: KernelConfig | None = None  # null: the model's own torch code

    def __post_init__(self) -> None:
        if not self.model.init_from:
            raise ValueError("model.init_from: set it to the policy's folder (an SFT or base GLM folder)")
        other = _GRPO_ONLY if self.trainer == "rloo" else _RLOO_ONLY
        default = PolicyLossConfig()
        changed = [k for k in other if getattr(self.algo, k) != getattr(default, k)]
        if changed:
            raise ValueError(
                f"algo.{', algo.'.join(changed)}: not used by trainer {self.trainer!r} "
                f"(GRPO only: {', '.join(_GRPO_ONLY)}; RLOO only: {', '.join(_RLOO_ONLY)})"
            )
        if not self.rewards:
            raise ValueError("rewards: name at least one reward (e.g. {name: world_correct})")
        completions = self.train.prompts_per_step * self.generation.num_generations
        micro = self.train.micro_batch or completions
        if completions % micro:
            raise ValueError(
                f"train.micro_batch ({micro}) must divide prompts_per_step x num_generations ({completions})"
            )
        needs_world = {"world_correct", "world_score", "world_on_topic"} & {r.name for r in self.rewards}
        if needs_world and self.data.source != "world":
            raise ValueError(
                f"rewards {sorted(needs_world)} need world prompts (data.source: world); for files use gsm8k / exact"
            )


# ----------------------------------------------------------------------------------------------------------
# Prompts


def world_rows(world, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Dataset rows for world prompts: the chat ``prompt`` and the columns the rule rewards read."""
    return [
        {"prompt": [dict(m) for m in p.messages], "world_prompt": json.dumps(p.to_dict(), ensure_ascii=False),
         "gold": p.gold, "lang": p.lang}
        for p in world.prompts(split, n, seed=seed)
    ]  # fmt: skip


def _open_text(path: Path):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_prompt_file(path: str | Path, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{prompt: messages, gold?}`` from JSONL: GSM8K ``{question, answer}`` (gold = the number after
    ``####``) or ``{prompt, gold?}`` (``answer`` accepted for ``gold``). Errors name the file, row and field."""
    from glmwb.rewards.rules import gsm8k_gold

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.paths: no file at {path}")
    rows = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            if "question" in row:
                question, gold = row["question"], row.get("answer")
                if isinstance(gold, str) and "####" in gold:
                    try:
                        gold = gsm8k_gold(gold)
                    except ValueError as e:
                        raise ConfigError(f"{where}: field 'answer': {e}") from None
                prompt: Any = question
            elif "prompt" in row:
                prompt, gold = row["prompt"], row.get("gold", row.get("answer"))
            else:
                raise ConfigError(
                    f"{where}: expected fields 'question' (+ 'answer', GSM8K) or 'prompt' (+ 'gold'); got {sorted(row)}"
                )
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ConfigError(f"{where}: empty prompt")
                messages = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
                messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt]
                bad = [i for i, m in enumerate(messages) if m["role"] not in ("system", "user", "assistant")
                       or not isinstance(m["content"], str)]  # fmt: skip
                if bad or messages[-1]["role"] != "user":
                    raise ConfigError(
                        f"{where}: field 'prompt' must be chat messages ending with a user turn "
                        f"(roles system / user / assistant, string content)"
                    )
            else:
                raise ConfigError(f"{where}: field 'prompt' must be a string or a list of chat messages")
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            out = {"prompt": messages}
            if gold is not None:
                out["gold"] = str(gold)
            rows.append(out)
    if not rows:
        raise ConfigError(f"data.paths: {path} has no rows")
    return rows


def load_prompts(cfg: GRPODataConfig, seed: int) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train rows, held-out rows for the files' before / after, facts)."""
    if cfg.source == "world":
        from glmwb.pretrain.world import make_world

        world = make_world(seed=cfg.world.seed, num_entities=cfg.world.num_entities)
        rows = world_rows(world, cfg.split, cfg.train_prompts, seed)
        return rows, [], {"source": "world", "split": cfg.split}
    train = [row for p in cfg.paths for row in read_prompt_file(p, cfg.system_prompt)]
    held = [row for p in cfg.eval_paths for row in read_prompt_file(p, cfg.system_prompt)]
    random.Random(seed).shuffle(train)
    if cfg.train_prompts:
        train = train[: cfg.train_prompts]
    return train, held, {"source": "files", "paths": list(cfg.paths)}


def drop_long_prompts(rows: list[dict], tok, max_tokens: int) -> tuple[list[dict], int]:
    from glmwb.pretrain.tokenizer import render_chat

    kept = [
        r for r in rows
        if len(tok(render_chat(tok, r["prompt"], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
        <= max_tokens
    ]  # fmt: skip
    return kept, len(rows) - len(kept)


# ----------------------------------------------------------------------------------------------------------
# Policy and trainer


def load_policy_model(folder: str, device: str = "cpu"):
    """(``GlmForCausalLM``, tokenizer) with generation stopping at GLM's turn terminators."""
    from transformers import AutoModelForCausalLM

    from glmwb.pretrain.tokenizer import load_glm_tokenizer, turn_terminator_ids

    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: no model folder at {folder!r} (expected config.json there); run the SFT stage "
            "first or point model.init_from at a GLM folder"
        )
    if not (Path(folder) / "tokenizer_config.json").is_file():
        raise ConfigError(f"model.init_from: {folder} has no tokenizer (tokenizer_config.json)")
    tok = load_glm_tokenizer(folder)
    tok.padding_side = "left"  # TRL generates from left-padded prompts
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    stops = turn_terminator_ids(tok)
    declared = model.generation_config.eos_token_id
    declared = [declared] if isinstance(declared, int) else list(declared or [])
    if set(declared) != set(stops):  # a folder from elsewhere may list <|endoftext|> only
        print(
            f"policy: generation stops set to GLM's turn terminators {stops} (the folder declared {declared})"
        )
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _common_args(recipe: GRPORecipe, use_cuda: bool) -> dict[str, Any]:
    """TRL arguments shared by GRPOConfig and RLOOConfig."""
    t, o, g, a = recipe.train, recipe.optim, recipe.generation, recipe.algo
    completions = t.prompts_per_step * g.num_generations
    micro = t.micro_batch or completions
    return dict(
        output_dir=str(Path(recipe.run.dir) / "trainer"),
        seed=recipe.run.seed,
        max_steps=t.max_steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,  # one generation batch per optimizer step
        **optim_arguments(o),
        logging_steps=t.log_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        report_to="none",
        use_cpu=not use_cuda,
        bf16=t.dtype == "bfloat16" or (t.dtype == "auto" and use_cuda),
        gradient_checkpointing=t.gradient_checkpointing,  # TRL turns it on by default; on a CPU it only costs
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        beta=a.beta,
        epsilon=a.epsilon,
        epsilon_high=a.epsilon_high,
        num_iterations=a.num_iterations,
        mask_truncated_completions=a.mask_truncated_completions,
        log_completions=t.log_completions,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def grpo_config(recipe: GRPORecipe, weights: Sequence[float], use_cuda: bool):
    """Our recipe sections -> TRL's ``GRPOConfig`` (the one place its argument names appear)."""
    from trl import GRPOConfig

    a = recipe.algo
    return GRPOConfig(
        **_common_args(recipe, use_cuda),
        reward_weights=list(weights),
        loss_type=a.loss_type,
        scale_rewards=a.scale_rewards,
        importance_sampling_level=a.importance_sampling_level,
        multi_objective_aggregation=a.multi_objective_aggregation,
    )


def rloo_config(recipe: GRPORecipe, weights: Sequence[float], use_cuda: bool):
    """Our recipe sections -> TRL's ``RLOOConfig``."""
    from trl import RLOOConfig

    a = recipe.algo
    return RLOOConfig(
        **_common_args(recipe, use_cuda),
        reward_weights=list(weights),
        normalize_advantages=a.normalize_advantages,
        reward_clip_range=tuple(a.reward_clip_range) if a.reward_clip_range else None,
    )


def build_trainer(recipe: GRPORecipe, model, tok, reward_funcs, weights, rows: list[dict], callbacks=()):
    """A TRL GRPOTrainer / RLOOTrainer on ``rows`` (``prompt`` + reward columns) with our reward functions."""
    from datasets import Dataset

    use_cuda = next(model.parameters()).is_cuda
    make_args, trainer_cls = {
        "grpo": (grpo_config, "GRPOTrainer"),
        "rloo": (rloo_config, "RLOOTrainer"),
    }[recipe.trainer]
    import trl

    args = make_args(recipe, weights, use_cuda)
    return getattr(trl, trainer_cls)(
        model=model,
        reward_funcs=list(reward_funcs),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=list(callbacks),
        peft_config=peft_config(recipe.model.lora) if recipe.model.lora.enabled else None,
    )


def plot_rewards(
    metrics_path: Path, out_png: Path, reward_names: Sequence[str], title: str = "GRPO"
) -> Path | None:
    """The sampled completions' reward (weighted sum, and each reward on its own), their length, the KL to the
    reference and the policy's entropy per logged step, one quantity per panel."""
    rewards = (Curve("reward", "weighted sum"),) + tuple(Curve(f"rewards/{n}/mean", n) for n in reward_names)
    panels = (
        Panel("reward of the sampled completions", "mean reward per completion", rewards),
        Panel("completion length", "mean length (tokens)", (Curve("completions/mean_length", "sampled"),)),
        Panel("KL to the reference", "KL (nats / token)", (Curve("kl", "policy vs reference"),)),
        Panel("policy entropy", "entropy (nats / token)", (Curve("entropy", "sampled tokens"),)),
    )
    return plot_curves(metrics_path, out_png, panels, title, ncols=2)


# ----------------------------------------------------------------------------------------------------------
# Before / after


def evaluate_world(recipe: GRPORecipe, folders: dict[str, str]) -> dict[str, Any]:
    """Greedy answers of each policy folder to the same held-out world prompts; table + win rates."""
    from glmwb.align.evaluate import compare, evaluate_policy, format_table
    from glmwb.pretrain.generate import load_policy
    from glmwb.pretrain.world import make_world

    cfg, w = recipe.eval, recipe.data.world
    world = make_world(seed=w.seed, num_entities=w.num_entities)
    prompts = world.prompts("heldout", cfg.heldout_prompts, seed=recipe.run.seed)
    scorer = None
    if cfg.reward_model:
        from glmwb.rewards.scoring import RewardScorer

        scorer = RewardScorer.from_pretrained(cfg.reward_model)
    reports = {}
    for name, folder in folders.items():
        model, tok = load_policy(folder)
        reports[name] = evaluate_policy(
            model, tok, world, prompts, scorer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
        )
    names = list(reports)
    comparisons = {n: compare(reports[names[0]], reports[n]) for n in names[1:]}
    return {
        "prompts": f"world held-out (n={len(prompts)})",
        "reports": reports,
        "comparisons": comparisons,
        "table": format_table(reports, comparisons),
    }


def evaluate_files(
    recipe: GRPORecipe, folders: dict[str, str], rows: list[dict], reward_funcs
) -> dict[str, Any]:
    """Greedy answers to held-out file rows, each rule reward's mean per policy (a table)."""
    from glmwb.pretrain.generate import generate_answers, load_policy

    rows = rows[: recipe.eval.heldout_prompts]
    rules = [f for f in reward_funcs if isinstance(f, RuleReward)]
    columns = {k: [r.get(k) for r in rows] for k in ("gold",) if any(k in r for r in rows)}
    reports = {}
    for name, folder in folders.items():
        model, tok = load_policy(folder)
        texts = generate_answers(model, tok, [r["prompt"] for r in rows], recipe.eval.max_new_tokens,
                                 batch_size=recipe.eval.batch_size)  # fmt: skip
        report = {"n": len(rows), "mean_chars": sum(map(len, texts)) / len(texts)}
        for f in rules:
            values = [v for v in f([r["prompt"] for r in rows], texts, **columns) if v is not None]
            report[f.__name__] = sum(values) / len(values) if values else math.nan
        report["answers"] = [{"answer": t, "gold": r.get("gold")} for t, r in zip(texts, rows, strict=True)]
        reports[name] = report
    cols = [k for k in next(iter(reports.values())) if k not in ("n", "answers")]
    lines = ["| policy | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in reports.items()]
    return {"prompts": f"files held-out (n={len(rows)})", "reports": reports, "comparisons": {},
            "table": "\n".join(lines)}  # fmt: skip


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


# ----------------------------------------------------------------------------------------------------------
# The stage


def run_grpo(recipe: GRPORecipe) -> dict[str, Any]:
    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    run_dir = Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    model, tok = load_policy_model(recipe.model.init_from, "cuda" if use_cuda else "cpu")
    train_rows, held_rows, facts = load_prompts(recipe.data, recipe.run.seed)
    train_rows, dropped = drop_long_prompts(train_rows, tok, recipe.data.max_prompt_tokens)
    if not train_rows:
        raise ConfigError(f"data: no prompt fits data.max_prompt_tokens={recipe.data.max_prompt_tokens}")
    facts.update(train_prompts=len(train_rows), dropped_long_prompts=dropped)
    try:
        reward_funcs, weights = build_reward_funcs(recipe.rewards)
    except RewardSetupError as e:
        raise ConfigError(f"rewards: {e}") from None
    names = [f.__name__ for f in reward_funcs]
    print(
        f"{recipe.trainer.upper()}: {len(train_rows)} prompts ({facts['source']}), rewards "
        + ", ".join(f"{w:g} x {n}" for n, w in zip(names, weights, strict=True))
        + f"; {recipe.train.prompts_per_step} prompts x {recipe.generation.num_generations} completions per step"
    )

    handle = None
    if recipe.kernels is not None:
        from glmwb.kernels.apply import apply_kernels

        handle = apply_kernels(model, recipe.kernels)
    callback = metrics_callback(metrics_path, t.max_minutes, recipe.trainer)
    torch.manual_seed(recipe.run.seed)
    trainer = build_trainer(recipe, model, tok, reward_funcs, weights, train_rows, [callback])
    started = time.time()
    trainer.train()
    train_s = time.time() - started
    budget = callback.budget(trainer.state)
    if handle is not None:
        handle.remove()

    policy = trainer.model
    if recipe.model.lora.enabled:
        policy = policy.merge_and_unload()
    final = save_policy(policy, run_dir / "final", tok)
    write_model_record(final, budget, run_dir, recipe.model.init_from)
    del trainer, policy, model

    rows = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        if metrics_path.exists()
        else []
    )
    curve = [r for r in rows if "reward" in r]
    if curve:
        title = run_title(recipe.trainer.upper(), run_dir, f"policy from {recipe.model.init_from}", budget)
        plot_rewards(metrics_path, run_dir / "rewards.png", names, title)
    k = max(1, len(curve) // 5)
    summary: dict[str, Any] = {
        "trainer": recipe.trainer,
        "steps": curve[-1]["step"] if curve else 0,
        "train_seconds": round(train_s, 1),
        "stopped_early": budget.stopped_early,
        "data": facts,
        "rewards": dict(zip(names, weights, strict=True)),
        "reward_first": sum(r["reward"] for r in curve[:k]) / k if curve else None,
        "reward_last": sum(r["reward"] for r in curve[-k:]) / k if curve else None,
        "final": str(final),
    }
    print(
        f"trained {summary['steps']} steps in {train_s:.0f} s; sampled reward "
        f"{summary['reward_first']} (first {k} logs) -> {summary['reward_last']} (last {k})"
    )

    if recipe.eval.heldout_prompts > 0 and (recipe.data.source == "world" or held_rows):
        summary["eval"] = _evaluate_held_out(recipe, final, held_rows, reward_funcs, run_dir)
    write_summary(run_dir, summary, budget, default=_json_safe)
    print(
        f"policy -> {final} ({budget.line()}); curves -> {run_dir / 'rewards.png'}; "
        f"summary -> {run_dir / 'summary.json'}"
    )
    return summary


def _evaluate_held_out(
    recipe: GRPORecipe, final: Path, held_rows, reward_funcs, run_dir: Path
) -> dict[str, Any]:
    """Greedy answers of the start policy and final/ on held-out prompts: eval/table.md, eval/answers.jsonl,
    the table on the console; returns the summary's ``eval`` section."""
    from glmwb.align.evaluate import format_models

    folders = {"before": recipe.model.init_from} if recipe.eval.before else {}
    folders[recipe.trainer] = str(final)
    if recipe.data.source == "world":
        ev = evaluate_world(recipe, folders)
    else:
        ev = evaluate_files(recipe, folders, held_rows, reward_funcs)
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    (eval_dir / "table.md").write_text(ev["table"] + "\n", encoding="utf-8")
    with (eval_dir / "answers.jsonl").open("w", encoding="utf-8") as f:
        for name, r in ev["reports"].items():
            for a in r["answers"]:
                f.write(json.dumps({"policy": name, **a}, ensure_ascii=False) + "\n")
    print(f"\n{ev['prompts']}, greedy answers:\n{ev['table']}\n\n{format_models(folders)}")
    return {
        "prompts": ev["prompts"],
        "reports": {n: {k: v for k, v in r.items() if k != "answers"} for n, r in ev["reports"].items()},
        "comparisons": ev["comparisons"],
        "table": ev["table"],
    }


__all__ = [
    "GRPORecipe",
    "run_grpo",
    "build_trainer",
    "grpo_config",
    "rloo_config",
    "load_policy_model",
    "read_prompt_file",
    "world_rows",
]
