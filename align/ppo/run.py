"""`glmwb run recipes/ppo.yaml`: load config -> policy, critic, reference, reward -> held-out evaluation ->
PPO -> held-out evaluation -> save (a Hugging Face policy folder, the critic as a one-head reward folder)."""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from glmwb.align.ppo.config import (
    CriticConfig,
    GenerationConfig,
    KLConfig,
    PolicyConfig,
    PPOConfig,
    PPOEvalConfig,
    PPOTrainConfig,
    PromptsConfig,
    RewardSection,
)
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.settings import RunConfig


def _ppo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0, betas=(0.9, 0.95))


@dataclass(frozen=True)
class PPORecipe:
    """`stage: ppo` — our own PPO on a GLM policy, with rule / RM / HTTP rewards, on the world's prompts."""

    stage: Literal["ppo"] = "ppo"
    run: RunConfig = field(default_factory=RunConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    optim: OptimConfig = field(default_factory=_ppo_optim)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)

    def __post_init__(self) -> None:
        if self.critic.backbone == "shared" and self.critic.init_from != "policy":
            raise ValueError(
                "critic.init_from must be 'policy' with critic.backbone 'shared' (the value head sits on the "
                f"actor's own backbone), got {self.critic.init_from!r}"
            )
        if self.critic.backbone == "shared" and self.critic.lora.enabled:
            raise ValueError(
                "critic.lora applies to a separate critic; with backbone 'shared' use policy.lora"
            )
        if self.ppo.score_norm == "group" and self.train.samples_per_prompt < 2:
            raise ValueError(
                "ppo.score_norm 'group' compares each answer with the other answers to the same prompt: set "
                f"train.samples_per_prompt >= 2 (got {self.train.samples_per_prompt})"
            )
        if self.critic.init_from == "reward" and not self.reward.rm:
            raise ValueError("critic.init_from is 'reward' but reward.rm (a reward-model folder) is not set")
        if self.policy.reference == "adapter_off" and not self.policy.lora.enabled:
            raise ValueError(
                "policy.reference 'adapter_off' needs policy.lora.enabled (else there is no adapter)"
            )


def _need_folder(path: str | None, key: str, what: str) -> None:
    if path and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: no {what} at {path!r} (expected config.json there)")


def build_models(recipe: PPORecipe, device: torch.device):
    """(actor, critic or None, reference, tokenizer, resident / trainable parameter counts)."""
    from glmwb.align.ppo.models import Actor, Critic, Reference, ValueHead, apply_lora, parameter_count
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.tokenizer import load_glm_tokenizer

    p, c = recipe.policy, recipe.critic
    tok = load_glm_tokenizer(p.init_from)
    glm = load_pretrained(p.init_from)
    glm.gradient_checkpointing = p.gradient_checkpointing
    if p.lora.enabled:
        apply_lora(glm, p.lora)
    shared = c.backbone == "shared"
    actor = Actor(glm, ValueHead(glm.config.hidden_size) if shared else None)
    mode = (
        "adapter_off"
        if p.reference == "adapter_off" or (p.reference == "auto" and p.lora.enabled)
        else "copy"
    )
    reference = Reference(actor, mode)
    critic = None
    if not shared:
        folder = {"policy": p.init_from, "reward": recipe.reward.rm}.get(c.init_from, c.init_from)
        _need_folder(folder, "critic.init_from", "GLM or reward folder")
        critic = Critic.from_folder(folder, head=recipe.reward.head if c.init_from == "reward" else None)
        if critic.backbone.config.vocab_size != glm.config.vocab_size:
            raise ConfigError(
                f"critic.init_from: {folder} has a vocabulary of {critic.backbone.config.vocab_size}, the policy "
                f"{glm.config.vocab_size}; the critic reads the policy's token ids, so it needs the same tokenizer"
            )
        if c.lora.enabled:
            apply_lora(critic.backbone, c.lora)
        critic.to(device)
    actor.to(device)
    reference.to(device)
    counts = parameter_count(actor, critic, reference.glm)
    return actor, critic, reference, tok, counts


def rollout_prompts(world, pc, seed: int = 0) -> list:
    """PPO's rollout prompts: ``pc.train_prompts`` of ``world.train_split`` plus ``world.anchor_prompts`` of
    ``train`` (a ``dev`` run's anchors), each in ``world.train_phrasings``, kept to ``world.families``."""
    w = pc.world
    out = world.prompts(w.train_split, pc.train_prompts, seed=seed, phrasings=w.train_phrasings)
    if w.anchor_prompts:
        out += world.prompts("train", w.anchor_prompts, seed=seed, phrasings=w.train_phrasings)
    return [q for q in out if not w.families or q.family in w.families]


def run_ppo(recipe: PPORecipe) -> dict[str, Any]:
    from glmwb.align.ppo.rollout import PromptCycle
    from glmwb.pretrain.run_folder import METRICS

    s = _setup(recipe)
    critic = _build(s)
    t, run_dir = recipe.train, s.run_dir
    cycle = PromptCycle(s.items, recipe.run.seed)
    resumed = _resume(run_dir, t, s.strategy, s.trainer, cycle, s.print)
    if resumed is not None:
        before, seen_before = resumed.get("before"), resumed.get("seen_before")
    else:
        for stale in (METRICS, "samples.jsonl", "samples.txt"):
            if s.strategy.is_main:
                (run_dir / stale).unlink(missing_ok=True)
        before = s.evaluate(samples=recipe.eval.samples) if recipe.eval.before and s.heldout else None
        seen_before = s.evaluate(s.seen) if s.seen else None
        if before:
            s.trainer.write_metrics({"step": 0, **_eval_row(before)})
    if before:
        s.print(
            f"held-out before PPO: accuracy {before['accuracy']:.3f}, score {before['score']:.3f} (n={before['n']})"
        )
    on_step = _checkpointer(s, cycle, {"before": before, "seen_before": seen_before})
    periodic_eval = (lambda: _eval_row(s.evaluate())) if s.heldout else None
    last = s.trainer.train(cycle, t.steps, t.max_minutes, periodic_eval, t.eval_every, on_step)
    after = s.evaluate(samples=recipe.eval.samples) if recipe.eval.after and s.heldout else None
    seen_after = s.evaluate(s.seen) if s.seen else None
    budget = s.trainer.budget()
    if after:
        s.trainer.write_metrics({"step": s.trainer.step_count, **_eval_row(after)})
    final = _save(s, critic, budget)
    if not s.strategy.is_main:
        return {}
    summary: dict[str, Any] = {"steps": s.trainer.step_count, "final": str(final), "parameters": s.counts,
                               "last_step": last, "minutes": last.get("time/elapsed_min"),
                               "stopped_early": budget.stopped_early}  # fmt: skip
    _report(s, final, summary, before, after, seen_before, seen_after)
    from glmwb.pretrain.run_folder import write_summary

    write_summary(run_dir, summary, budget, default=_plain)
    s.print(
        f"policy → {final} ({budget.line()}); metrics → {run_dir / METRICS}; "
        f"curves → {run_dir / 'training.png'}"
    )
    return summary


class _Session:
    """What the steps of ``run_ppo`` share (plain attributes, set by ``_setup`` and ``_build``)."""

    recipe: PPORecipe
    run_dir: Path
    strategy: Any
    print: Any
    device: torch.device
    tok: Any
    world: Any
    items: list
    heldout: list
    seen: list
    trainer: Any
    counts: dict[str, float]
    eval_scorer: Any

    def evaluate(self, prompts: list | None = None, samples: int = 0) -> dict[str, Any]:
        """Held-out (or ``prompts``) accuracy of the current policy, on the main rank ({} on the others)."""
        from glmwb.align.evaluate import evaluate_policy

        e = self.recipe.eval
        prompts = self.heldout if prompts is None else prompts
        with self.strategy.generation_context(self.trainer.actor) as a:
            if not self.strategy.is_main:
                return {}
            return evaluate_policy(
                a.glm, self.tok, self.world, prompts, self.eval_scorer, e.max_new_tokens, samples=samples,
                sample_temperature=e.sample_temperature, seed=self.recipe.run.seed,
            )  # fmt: skip


def _setup(recipe: PPORecipe) -> _Session:
    """Folders checked, threads, the strategy (one rank talks), the device, the seed."""
    from glmwb.pretrain.strategy import make_strategy
    from glmwb.pretrain.train import resolve_device, seed_everything

    s = _Session()
    s.recipe, s.run_dir, t = recipe, Path(recipe.run.dir), recipe.train
    _need_folder(
        recipe.policy.init_from, "policy.init_from", "policy folder (run SFT first, or point at a GLM folder)"
    )
    if recipe.reward.kind in ("rm", "combined"):
        _need_folder(recipe.reward.rm, "reward.rm", "reward-model folder")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    s.strategy = make_strategy(t.strategy, t.zero_stage, recipe.optim.grad_clip)
    s.strategy.setup()
    s.print = builtins.print if s.strategy.is_main else (lambda *a, **k: None)  # one rank talks
    s.device = torch.device(f"cuda:{torch.cuda.current_device()}") if t.strategy == "deepspeed" and torch.cuda.is_available() else resolve_device(t.device)  # fmt: skip
    seed_everything(recipe.run.seed)
    return s


def _build(s: _Session):
    """Actor, critic, reference, reward, the world's rollout and held-out prompts, and the trainer; returns the
    separate critic (None with a shared backbone)."""
    from glmwb.align.ppo.rollout import build_reward, world_items
    from glmwb.align.ppo.trainer import PPOTrainer
    from glmwb.pretrain.tokenizer import turn_terminator_ids
    from glmwb.pretrain.train import autocast_dtype
    from glmwb.pretrain.world import make_world

    recipe, device, t, print = s.recipe, s.device, s.recipe.train, s.print  # noqa: A001
    actor, critic, reference, s.tok, s.counts = build_models(recipe, device)
    print(f"ppo: actor {'LoRA ' if recipe.policy.lora.enabled else ''}from {recipe.policy.init_from}; critic "
          f"{recipe.critic.backbone} ({recipe.critic.init_from}); reference {reference.mode}; "
          f"{s.counts['resident_M']:.2f}M parameters resident, {s.counts['trainable_M']:.2f}M trainable")  # fmt: skip
    reward_fn, scorer = build_reward(recipe.reward, device=str(device))
    pc = recipe.prompts
    s.world = make_world(seed=pc.world.seed, num_entities=pc.world.num_entities)
    train_prompts = rollout_prompts(s.world, pc, seed=recipe.run.seed)
    s.heldout = [q for q in s.world.prompts(pc.world.heldout_split, pc.heldout_prompts, seed=recipe.run.seed)
                 if not pc.world.families or q.family in pc.world.families] if pc.heldout_prompts else []  # fmt: skip
    s.items, dropped = world_items(s.tok, train_prompts, pc.max_prompt_tokens)
    if not s.items:
        raise ConfigError(
            f"prompts: no training prompt fits prompts.max_prompt_tokens={pc.max_prompt_tokens}"
        )
    print(
        f"prompts: {len(s.items)} train (dropped {dropped} over {pc.max_prompt_tokens} tokens), {len(s.heldout)} held-out"
    )
    kernel = (
        t.logprob_kernel if t.logprob_kernel != "auto" else ("triton" if device.type == "cuda" else "torch")
    )
    s.trainer = PPOTrainer(
        actor, critic, reference, s.tok, reward_fn, recipe.ppo, recipe.kl, recipe.generation, t, recipe.optim,
        critic_lr=recipe.critic.lr, critic_warmup_steps=recipe.critic.warmup_steps, stop_ids=turn_terminator_ids(s.tok),
        strategy=s.strategy, device=device, amp_dtype=autocast_dtype(t.dtype, device), seed=recipe.run.seed,
        run_dir=s.run_dir, log=print, logprob_kernel=kernel,
    )  # fmt: skip
    s.eval_scorer = scorer if recipe.eval.rm_scores else None
    s.seen = [it.world_prompt for it in s.items[: recipe.eval.rollout_prompts]]
    return critic


def _eval_row(report: dict[str, Any] | None) -> dict[str, float]:
    keys = ("accuracy", "score", "right_language", "mean_chars", "reward_mean")
    return {f"eval/{k}": report[k] for k in keys if report and k in report}


def _write_policy(s: _Session, folder: Path) -> Path:
    from glmwb.align.ppo.models import merged_glm
    from glmwb.pretrain.hf import save_pretrained

    return save_pretrained(merged_glm(s.trainer.actor_module.glm), folder, s.tok)


def _checkpointer(s: _Session, cycle, start_evals: dict[str, Any]):
    """The trainer's ``on_step``: every ``train.save_every`` steps a policy folder, and on one rank the state
    that resume needs (DeepSpeed runs keep the policy folder only)."""
    from glmwb.pretrain.run_folder import rng_state, save_checkpoint

    t, strategy, trainer = s.recipe.train, s.strategy, s.trainer

    def on_step(step: int) -> None:
        if not (t.save_every and step % t.save_every == 0):
            return
        state = None
        if strategy.world_size == 1:  # what resume needs; DeepSpeed runs keep the policy folder only
            state = {"trainer": trainer.state_dict(), "prompts": cycle.state_dict(), "rng": rng_state(),
                     **start_evals}  # fmt: skip
        with strategy.gathered(trainer.actor):
            if strategy.is_main:
                save_checkpoint(
                    s.run_dir, step, lambda f: _write_policy(s, f), state, t.keep_checkpoints, digits=5
                )

    return on_step


def _save(s: _Session, critic, budget) -> Path | None:
    """The curves, final/ (the policy, LoRA merged) and critic/ (collective under ZeRO-3); the main rank
    returns final/ with its run record."""
    from glmwb.pretrain.run_folder import METRICS, run_title, write_model_record

    recipe, strategy, trainer, run_dir = s.recipe, s.strategy, s.trainer, s.run_dir
    if strategy.is_main:
        from glmwb.align.ppo.plots import plot_training

        what = f"policy from {recipe.policy.init_from}, {recipe.reward.kind} reward"
        plot_training(run_dir / METRICS, run_dir / "training.png", run_title("PPO", run_dir, what, budget))
    with strategy.gathered(trainer.actor):
        final = _write_policy(s, run_dir / "final") if strategy.is_main else None
    if critic is not None:
        with strategy.gathered(trainer.critic):
            if strategy.is_main:
                strategy.unwrap(trainer.critic).save(run_dir / "critic", s.tok)
    if strategy.is_main:
        write_model_record(final, budget, run_dir, recipe.policy.init_from)
    return final


def _report(s: _Session, final: Path, summary, before, after, seen_before, seen_after) -> None:
    """Before / after tables (held-out, and the rollout prompts PPO trained on) on the console, in eval/ and
    in the summary."""
    from glmwb.align.evaluate import compare, format_models, format_table, significance_line

    run_dir = s.run_dir
    if before and after:
        reports = {"before": before, "after": after}
        comparison = compare(before, after)
        table = format_table(reports, {"after": comparison})
        models = format_models({"before": s.recipe.policy.init_from, "after": final})
        s.print(f"\nheld-out world prompts (n={after['n']}), before vs after PPO:\n{table}\n\n{models}")
        s.print(significance_line(comparison))
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / "table.md").write_text(
            f"{table}\n\n{significance_line(comparison)}\n\n{models}\n"
        )
        for name, r in reports.items():
            (run_dir / "eval" / f"{name}.json").write_text(json.dumps(r, indent=2, ensure_ascii=False))
        summary["eval"] = {"before": _brief(before), "after": _brief(after), "comparison": comparison}
    if seen_before and seen_after:
        table = format_table(
            {"before": seen_before, "after": seen_after}, {"after": compare(seen_before, seen_after)}
        )
        s.print(
            f"\nrollout (train-split) prompts PPO trained on (n={seen_after['n']}), before vs after:\n{table}"
        )
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / "rollout_prompts.md").write_text(table + "\n")
        summary["eval_rollout_prompts"] = {"before": _brief(seen_before), "after": _brief(seen_after)}


def _resume(run_dir: Path, t, strategy, trainer, cycle, log) -> dict[str, Any] | None:
    """Load the newest checkpoint of ``run_dir`` into the trainer and the prompt order (``train.resume``);
    returns the saved evaluations of the start policy, or None when there is nothing to resume."""
    from glmwb.pretrain.run_folder import (
        METRICS,
        checkpoint_dirs,
        latest_checkpoint,
        load_trainer_state,
        set_rng_state,
        truncate_metrics,
    )

    if not t.resume:
        return None
    if strategy.world_size > 1:
        if checkpoint_dirs(run_dir, with_state=True):
            raise ConfigError(
                f"{run_dir} has PPO checkpoints; resuming a multi-rank (DeepSpeed) run is not supported: "
                "train.resume=false, or a new run.dir"
            )
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    state = load_trainer_state(ckpt, map_location=trainer.device)
    trainer.load_state_dict(state["trainer"])
    cycle.load_state_dict(state["prompts"])
    set_rng_state(state["rng"])
    step = trainer.step_count
    for name in (METRICS, "samples.jsonl"):  # drop what was written after that checkpoint
        truncate_metrics(run_dir / name, step)
    log(f"ppo: resumed from {ckpt} at step {step} of {t.steps}")
    return {"before": state.get("before"), "seen_before": state.get("seen_before")}


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "answers"}


def _plain(x: Any) -> Any:
    if isinstance(x, float):
        return None
    return str(x)
