"""Pieces shared by the stages that train transformers' GLM through TRL (SFT, GRPO / RLOO): LoRA targets,
the metrics / time-limit callback, and saving a trained policy as a plain GLM folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.settings import LoRAConfig

# our LoRA target names (pretrain/model.py) -> transformers' GLM module names
HF_LORA_TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_up_proj",),
    "down_proj": ("down_proj",),
}


def peft_config(cfg: LoRAConfig):
    """PEFT's LoraConfig for transformers' GLM from our LoRA section (our module names)."""
    from peft import LoraConfig

    unknown = sorted(set(cfg.target_modules) - set(HF_LORA_TARGETS))
    if unknown:
        raise ConfigError(
            f"model.lora.target_modules: unknown {unknown}; known: {', '.join(HF_LORA_TARGETS)}"
        )
    targets = [name for ours in cfg.target_modules for name in HF_LORA_TARGETS[ours]]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )


def metrics_callback(metrics_path: Path, max_minutes: float | None, stage: str = "train"):
    """A TrainerCallback: every log line to ``metrics_path`` (JSONL, run_folder.MetricsLog); training stops
    past ``max_minutes`` (the caller still saves the final model). ``budget(state)`` is the stage's budget
    record: planned steps (``args.max_steps``), steps done, stopped early and why."""
    from transformers import TrainerCallback

    from glmwb.pretrain.run_folder import Budget, MetricsLog, TimeLimit

    class MetricsAndTimeLimit(TrainerCallback):
        def __init__(self) -> None:
            self.limit = TimeLimit(max_minutes)
            self.metrics = MetricsLog(metrics_path)
            self.stopped_early = False
            self.planned_steps: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.planned_steps = state.max_steps or args.max_steps

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {"step": state.global_step, "elapsed_s": round(time.time() - self.limit.started, 2)}
            row.update({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})
            self.metrics.write(row)

        def on_step_end(self, args, state, control, **kwargs):
            if self.limit.reached() and state.global_step < state.max_steps:
                self.stopped_early = True
                control.should_training_stop = True
                control.should_log = True

        def budget(self, state) -> Budget:
            why = self.limit.reason if self.stopped_early else None
            return Budget(
                stage, self.planned_steps or state.max_steps, state.global_step, self.stopped_early, why
            )

    return MetricsAndTimeLimit()


def save_policy(hf_model, folder: Path, tok) -> Path:
    """A plain GLM folder through ``pretrain.hf`` (merge LoRA first); eos ids = GLM's turn terminators."""
    from glmwb.pretrain.hf import from_hf_config, from_hf_state_dict, save_pretrained
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.tokenizer import turn_terminator_ids

    cfg = from_hf_config(hf_model.config).with_(
        eos_token_ids=tuple(turn_terminator_ids(tok)), pad_token_id=tok.pad_token_id
    )
    with torch.device("meta"):
        model = GLM(cfg)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in hf_model.state_dict().items()}
    model.load_state_dict(from_hf_state_dict(state, cfg), assign=True)
    tok.padding_side = "left"  # as our tokenizers ship (generation pads on the left); trainers may change it
    return save_pretrained(model, folder, tok)


def optim_arguments(o) -> dict:
    """Our ``OptimConfig`` (pretrain.train) as transformers ``TrainingArguments`` keywords: AdamW with warm-up
    and a cosine decay to ``min_lr_ratio`` of the peak, weight decay, betas, eps, gradient clipping."""
    return dict(
        learning_rate=o.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip if o.grad_clip > 0 else 0.0,
    )
