"""The PPO loop: rollout -> score -> reference log-probs and values -> KL-penalised rewards -> GAE -> epochs of
clipped minibatch updates, with every diagnostic written per step to metrics.jsonl.

    exp   = trainer.make_experience(prompt_items)   # generation, scoring, inference forwards, GAE
    stats = trainer.update(exp)                     # PPO epochs over exp
    trainer.train(prompt_cycle, steps)              # both, per step, + logging / samples / plots

Memory: the actor (+ the value head when the critic shares its backbone), a separate critic or none, the
reference (a frozen copy, or nothing extra with a LoRA actor), and a reward model only when one is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glmwb.align.ppo import core
from glmwb.align.ppo.config import GenerationConfig, KLConfig, PPOConfig, PPOTrainConfig
from glmwb.align.ppo.models import Actor, Critic, Reference
from glmwb.align.ppo.rollout import PromptItem, RewardFunction, Samples, decode_responses, sample_batched
from glmwb.pretrain.run_folder import METRICS, Budget, MetricsLog, TimeLimit
from glmwb.pretrain.strategy import SingleDevice

# ----------------------------------------------------------------------------------------------------------
# A step's experience


@dataclass
class Experience:
    """Everything one PPO step trains on; (B, N) tensors are 0 on padding."""

    input_ids: Tensor  # (B, P + N)
    attention_mask: Tensor  # (B, P + N)
    response_mask: Tensor  # (B, N) float
    prompt_width: int
    old_logprobs: Tensor  # (B, N) log pi_old(a_t), recomputed by the training forward
    ref_logprobs: Tensor  # (B, N)
    values: Tensor  # (B, N) V_old(s_t)
    advantages: Tensor  # (B, N) (whitened when ppo.whiten_advantages)
    returns: Tensor  # (B, N)
    # diagnostics only
    kl: Tensor = None  # (B, N) k1 per token
    rewards: Tensor = None  # (B, N) per-token rewards fed to GAE
    entropy: Tensor = None  # (B, N) of pi_old
    sampling_logprobs: Tensor = None  # (B, N) from the sampler
    scores: Tensor = None  # (B,) after the penalties, before normalisation
    norm_scores: Tensor = None  # (B,) what GAE saw
    terminated: Tensor = None  # (B,) bool
    texts: list[str] = field(default_factory=list)
    items: list[PromptItem] = field(default_factory=list)
    breakdown: list[dict[str, float]] = field(default_factory=list)

    def select(self, idx: Tensor) -> Experience:
        """Rows ``idx``, trimmed to their own widths: the common left padding of the prompts and the padding
        after the longest response go, so micro-batches of short responses cost less."""
        mask = self.response_mask[idx]
        attn = self.attention_mask[idx]
        P = self.prompt_width
        prompt_lens = attn[:, :P].sum(1)
        start = int(P - prompt_lens.max())
        n = int(mask.sum(1).max().clamp(min=1))

        def rows(t: Tensor) -> Tensor:
            return t[idx, :n]

        return Experience(
            self.input_ids[idx, start : P + n], attn[:, start : P + n], rows(self.response_mask), P - start,
            rows(self.old_logprobs), rows(self.ref_logprobs), rows(self.values), rows(self.advantages),
            rows(self.returns),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Trainer


class PPOTrainer:
    def __init__(
        self,
        actor: Actor,
        critic: Critic | None,
        reference: Reference,
        tokenizer: Any,
        reward_fn: RewardFunction | Callable,
        ppo: PPOConfig,
        kl: KLConfig,
        generation: GenerationConfig,
        train: PPOTrainConfig,
        optim: Any,  # pretrain.train.OptimConfig
        critic_lr: float | None = None,
        critic_warmup_steps: int = 0,
        stop_ids: Sequence[int] = (),
        strategy: SingleDevice | None = None,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
        run_dir: str | Path | None = None,
        log: Callable[[str], None] = print,
        logprob_kernel: str = "torch",
    ) -> None:
        if critic is None and actor.value_head is None:
            raise ValueError(
                "PPOTrainer: give a separate critic or an actor with a value head (shared backbone)"
            )
        if ppo.score_norm == "group" and train.samples_per_prompt < 2:
            raise ValueError("PPOTrainer: ppo.score_norm 'group' needs train.samples_per_prompt >= 2")
        if critic is not None and actor.value_head is not None:
            raise ValueError("PPOTrainer: a separate critic and a shared value head at once; pick one")
        self.strategy = strategy or SingleDevice()
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.ppo, self.kl_cfg, self.gen, self.cfg, self.optim_cfg = ppo, kl, generation, train, optim
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.stop_ids = list(stop_ids) or list(actor.config.eos_token_ids)
        if not self.stop_ids:
            raise ValueError("PPOTrainer: no turn terminators (stop_ids) and none in the model config")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.critic_warmup_steps = critic_warmup_steps
        self.logprob_kernel = logprob_kernel
        self.log = log
        self.run_dir = Path(run_dir) if run_dir else None
        self.metrics = MetricsLog(self.run_dir / METRICS, self.strategy.is_main) if self.run_dir else None
        self.stopped_early, self.stop_reason, self.planned_steps = False, None, train.steps
        self.shared = critic is None
        self.reference = reference

        self.kl_ctl = core.make_kl_controller(kl.controller, kl.coef, kl.target, kl.horizon)
        self.score_moments = core.RunningMoments(self.strategy.all_reduce)
        # score_norm 'group': the moments of the leave-one-out differences
        self.loo_moments = core.RunningMoments(self.strategy.all_reduce)
        self.generator = torch.Generator(device=self.device).manual_seed(seed + 1000 * self.strategy.rank)
        self.shuffle_generator = torch.Generator().manual_seed(seed + 7)
        self.step_count = 0
        self.updates_done = 0
        micro_per_mini = train.minibatch_size // train.microbatch_size
        rollouts = train.batch_size * train.samples_per_prompt
        self.total_updates = train.steps * train.epochs * (rollouts // train.minibatch_size)

        critic_lr = critic_lr or optim.lr
        actor_groups = _param_groups(actor, optim, value_lr=critic_lr)
        self.actor_opt = _adamw(actor_groups, optim, self.device)
        self.actor, self.actor_opt = self.strategy.prepare(actor, self.actor_opt, micro_per_mini)
        self.critic, self.critic_opt = None, None
        if critic is not None:
            self.critic_opt = _adamw(_param_groups(critic, optim, base_lr=critic_lr), optim, self.device)
            self.critic, self.critic_opt = self.strategy.prepare(critic, self.critic_opt, micro_per_mini)
        if self.run_dir is not None and self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- helpers ------------------------------------------------------------------------------------------

    @property
    def actor_module(self) -> Actor:
        return self.strategy.unwrap(self.actor)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _set_lr(self) -> float:
        from glmwb.pretrain.optim import lr_at

        base = self.optim_cfg.lr
        scale = lr_at(self.updates_done, self.optim_cfg, self.total_updates) / base if base > 0 else 0.0
        for opt in (self.actor_opt, self.critic_opt):
            if opt is None:
                continue
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        return self.optim_cfg.lr * scale

    # -- rollout ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, items: Sequence[PromptItem]) -> Samples:
        g = self.gen
        with self.strategy.generation_context(self.actor) as actor, self._autocast():
            return sample_batched(
                actor.glm, [it.ids for it in items], g.batch_size, max_new_tokens=g.max_new_tokens,
                stop_ids=self.stop_ids, pad_id=self.pad_id, temperature=g.temperature, top_p=g.top_p,
                top_k=g.top_k, generator=self.generator,
            )  # fmt: skip

    @torch.no_grad()
    def _inference(self, s: Samples) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(old log-probs, entropy, reference log-probs, values), each (B, N) fp32, in chunks."""
        B = s.input_ids.shape[0]
        size = max(self.cfg.microbatch_size, self.gen.batch_size)
        T = self.gen.temperature
        outs: dict[str, list[Tensor]] = {"lp": [], "ent": [], "ref": [], "v": []}
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        probe = Experience(
            s.input_ids, s.attention_mask, s.response_mask.float(), s.prompt_width,
            *(torch.zeros_like(s.sampling_logprobs),) * 5,
        )  # fmt: skip
        N = s.response_mask.shape[1]
        for start in range(0, B, size):
            b = probe.select(torch.arange(start, min(B, start + size)))
            args = (b.input_ids.to(self.device), b.attention_mask.to(self.device), b.response_mask.to(self.device),
                    b.prompt_width)  # fmt: skip
            with self._autocast():
                out = self.actor(*args, temperature=T, return_entropy=True, kernel=self.logprob_kernel)
                ref = self.reference.logprobs(*args, temperature=T, kernel=self.logprob_kernel)
                values = out.values if self.shared else self.critic(*args)
            n = b.response_mask.shape[1]
            for key, t in (("lp", out.logprobs), ("ent", out.entropy), ("ref", ref), ("v", values)):
                outs[key].append(torch.nn.functional.pad(t.float().cpu(), (0, N - n)))
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        return tuple(torch.cat(outs[k]) for k in ("lp", "ent", "ref", "v"))  # type: ignore[return-value]

    def make_experience(self, items: Sequence[PromptItem]) -> tuple[Experience, dict[str, float]]:
        """Generate, score and evaluate one batch of rollouts; returns it with its diagnostics."""
        t0 = time.perf_counter()
        s = self.generate(items)
        s = Samples(*(x.cpu() if isinstance(x, Tensor) else x for x in (
            s.input_ids, s.attention_mask, s.response_mask, s.prompt_width, s.sampling_logprobs, s.terminated)))  # fmt: skip
        t_gen = time.perf_counter()
        texts = decode_responses(self.tokenizer, s)
        lengths = s.lengths.tolist()
        scores, breakdown = self.reward_fn(items, texts, lengths, s.terminated.tolist())
        t_score = time.perf_counter()
        old_lp, entropy, ref_lp, values = self._inference(s)
        t_inf = time.perf_counter()

        mask = s.response_mask.float()
        p = self.ppo
        # the sequence score, normalised (running statistics across steps and ranks, or this batch's)
        batch_mean, batch_std = self.score_moments.update(scores)
        # (a floor on the std: a batch of equal scores has none, and carries no signal to amplify)
        if p.score_norm == "running":
            norm = (scores - (self.score_moments.mean if p.score_norm_shift else 0.0)) / max(
                self.score_moments.std, 1e-2
            )
        elif p.score_norm == "batch":
            norm = (scores - (batch_mean if p.score_norm_shift else 0.0)) / max(batch_std, 1e-2)
        elif p.score_norm == "group":
            loo = core.leave_one_out(scores, self.cfg.samples_per_prompt)
            self.loo_moments.update(loo)
            norm = loo / max(self.loo_moments.std, 1e-2)
        else:
            norm = scores.clone()
        if p.score_clip is not None:
            norm = norm.clamp(-p.score_clip, p.score_clip)
        kl_k1 = core.per_token_kl(old_lp, ref_lp, mask, "k1")
        kl_pen = (
            kl_k1
            if self.kl_cfg.estimator == "k1"
            else core.per_token_kl(old_lp, ref_lp, mask, self.kl_cfg.estimator)
        )
        beta = self.kl_ctl.value
        rewards = core.token_rewards(norm, kl_pen, mask, beta)
        if p.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, values, mask, p.gamma, p.lam)
        raw_adv_std = float(core.masked_var(advantages, mask).sqrt())
        if p.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)

        exp = Experience(
            s.input_ids, s.attention_mask, mask, s.prompt_width, old_lp, ref_lp, values, advantages, returns,
            kl=kl_k1, rewards=rewards, entropy=entropy, sampling_logprobs=s.sampling_logprobs, scores=scores,
            norm_scores=norm, terminated=s.terminated, texts=texts, items=list(items), breakdown=breakdown,
        )  # fmt: skip

        # diagnostics
        seq_kl = core.masked_sum(kl_k1, mask, dim=1)  # (B,) nats per response
        seq_k3 = core.masked_sum(core.per_token_kl(old_lp, ref_lp, mask, "k3"), mask, dim=1)
        lengths_t = mask.sum(1)
        gap = (s.sampling_logprobs - old_lp).abs() * mask
        m = {
            "reward/score_mean": float(scores.mean()),
            "reward/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "reward/norm_mean": float(norm.mean()),
            "reward/norm_std": float(norm.std()) if len(norm) > 1 else 0.0,
            "reward/running_mean": self.score_moments.mean,
            "reward/running_std": self.score_moments.std,
            "reward/length_corr": core.pearson(scores, lengths_t),
            "kl/coef": beta,
            "kl/seq_k1": float(seq_kl.mean()),
            "kl/seq_k3": float(seq_k3.mean()),
            "kl/token_k1": float(core.masked_mean(kl_k1, mask)),
            "kl/penalty": float(beta * core.masked_sum(kl_pen, mask, dim=1).mean()),
            "policy/entropy": float(core.masked_mean(entropy, mask)),
            "policy/logprob_gap_max": float(gap.max()),
            "policy/logprob_gap_mean": float(core.masked_mean(gap, mask)),
            "value/mean": float(core.masked_mean(values, mask)),
            "value/returns_mean": float(core.masked_mean(returns, mask)),
            "value/explained_variance": core.explained_variance(values, returns, mask),
            "value/advantage_std": raw_adv_std,
            "response/length_mean": float(lengths_t.mean()),
            "response/length_max": float(lengths_t.max()),
            "response/terminated": float(s.terminated.float().mean()),
            "response/empty": float(sum(not t.strip() for t in texts) / len(texts)),
            "time/generation": t_gen - t0,
            "time/scoring": t_score - t_gen,
            "time/inference": t_inf - t_score,
        }
        terms = getattr(self.reward_fn, "terms", [])
        for term in terms:
            m[f"reward/{term}"] = sum(r.get(term, 0.0) for r in breakdown) / len(breakdown)
        return exp, m

    # -- update -------------------------------------------------------------------------------------------

    def update(self, exp: Experience) -> dict[str, float]:
        """ppo epochs x minibatches of clipped updates (micro-batches accumulate into one optimizer step)."""
        cfg, p = self.cfg, self.ppo
        B = exp.input_ids.shape[0]
        train_policy = self.step_count >= self.critic_warmup_steps
        T = self.gen.temperature
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        grad_norms: dict[str, list[float]] = {"actor": [], "critic": []}
        early_stopped, updates = False, 0
        last_kl = float("nan")
        self.actor.train()
        if self.critic is not None:
            self.critic.train()

        def add(name: str, value: Tensor | float, w: float) -> None:
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            sums[name] = sums.get(name, 0.0) + value * w
            weights[name] = weights.get(name, 0.0) + w

        for _ in range(cfg.epochs):
            order = torch.randperm(B, generator=self.shuffle_generator)
            for mb in order.split(cfg.minibatch_size):
                lr = self._set_lr()
                n_tok = exp.response_mask[mb].sum().clamp(min=1).to(self.device)
                micro = mb.split(cfg.microbatch_size)
                mb_kl, mb_w = 0.0, 0.0
                for i, idx in enumerate(micro):
                    b = exp.select(idx)
                    b = Experience(*(x.to(self.device) if isinstance(x, Tensor) else x for x in (
                        b.input_ids, b.attention_mask, b.response_mask, b.prompt_width, b.old_logprobs,
                        b.ref_logprobs, b.values, b.advantages, b.returns)))  # fmt: skip
                    mask = b.response_mask
                    w = float(mask.sum())
                    boundary = i == len(micro) - 1
                    args = (b.input_ids, b.attention_mask, mask, b.prompt_width)
                    actor_loss = None
                    if train_policy or self.shared:
                        with self._autocast():
                            out = self.actor(
                                *args, temperature=T, return_entropy=True, kernel=self.logprob_kernel
                            )
                        pl, ps = core.policy_loss(
                            out.logprobs, b.old_logprobs, b.advantages, mask, p.clip_range, n_tok
                        )
                        entropy = core.masked_sum(out.entropy, mask) / n_tok
                        actor_loss = (pl - p.entropy_coef * entropy) if train_policy else 0.0 * pl
                        add("policy/loss", pl * n_tok / w, w)
                        add("policy/entropy_train", entropy * n_tok / w, w)
                        for k, v in ps.items():
                            add(f"policy/{k}", v, w)
                        mb_kl += float(ps["approx_kl"]) * w
                        mb_w += w
                        if self.shared:
                            vl, vs = core.value_loss(
                                out.values, b.values, b.returns, mask, p.clip_range_value, n_tok
                            )
                            actor_loss = actor_loss + p.vf_coef * vl
                    if not self.shared:
                        with self._autocast():
                            values = self.critic(*args)
                        vl, vs = core.value_loss(values, b.values, b.returns, mask, p.clip_range_value, n_tok)
                        self.strategy.backward(p.vf_coef * vl, self.critic)
                        norm = self.strategy.micro_step(
                            self.critic, self.critic_opt, boundary, self.optim_cfg.grad_clip
                        )
                        if norm is not None:
                            grad_norms["critic"].append(norm)
                    add("value/loss", vl * n_tok / w, w)
                    for k, v in vs.items():
                        add(f"value/{k}", v, w)
                    if actor_loss is not None:
                        self.strategy.backward(actor_loss, self.actor)
                        norm = self.strategy.micro_step(
                            self.actor, self.actor_opt, boundary, self.optim_cfg.grad_clip
                        )
                        if norm is not None:
                            grad_norms["actor"].append(norm)
                updates += 1
                self.updates_done += 1
                if mb_w:
                    last_kl = mb_kl / mb_w
                if p.early_stop_kl is not None and train_policy and last_kl > p.early_stop_kl:
                    early_stopped = True
                    break
            if early_stopped:
                break

        out = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        out.update({
            "ppo/updates": updates,
            "ppo/early_stopped": float(early_stopped),
            "ppo/train_policy": float(train_policy),
            "policy/approx_kl_last": last_kl,
            "grad_norm/actor": _mean(grad_norms["actor"]),
            "grad_norm/critic": _mean(grad_norms["critic"]),
            "lr": lr,
        })  # fmt: skip
        return out

    # -- one step and the loop ------------------------------------------------------------------------------

    def step(self, items: Sequence[PromptItem]) -> tuple[Experience, dict[str, float]]:
        t0 = time.perf_counter()
        exp, m = self.make_experience(items)
        t1 = time.perf_counter()
        m.update(self.update(exp))
        m["time/training"] = time.perf_counter() - t1
        m["time/step"] = time.perf_counter() - t0
        # the controller sees this batch's KL (before the update; averaged over ranks), per Ziegler et al.
        B = exp.input_ids.shape[0]
        total = self.strategy.all_reduce(torch.tensor([m["kl/seq_k1"] * B, float(B)], dtype=torch.float64))
        self.kl_ctl.update(float(total[0] / total[1]), int(total[1]))
        self.step_count += 1
        m["step"] = self.step_count
        if self.device.type == "cuda":
            m["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return exp, m

    def train(
        self,
        prompts: Any,  # rollout.PromptCycle
        steps: int,
        max_minutes: float | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        eval_every: int = 0,
        on_step: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Run PPO up to step ``steps`` (from ``step_count``: a resumed run goes on), or until ``max_minutes``;
        metrics.jsonl, the sample table and training.png in the run folder. Each rank draws its own prompts. Returns the last step's metrics."""
        from tqdm.auto import tqdm

        from glmwb.align.ppo.plots import plot_training
        from glmwb.align.ppo.samples import sample_rows, write_samples

        cfg = self.cfg
        world, rank = self.strategy.world_size, self.strategy.rank
        limit = TimeLimit(max_minutes)
        self.planned_steps = steps
        last: dict[str, Any] = {}
        bar = tqdm(
            range(self.step_count, steps), desc="ppo", disable=not self.strategy.is_main, dynamic_ncols=True,
            initial=self.step_count, total=steps,
        )  # fmt: skip
        for _ in bar:
            drawn = prompts.next(cfg.batch_size * world)[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            items = [it for it in drawn for _ in range(cfg.samples_per_prompt)]
            exp, m = self.step(items)
            if evaluate is not None and eval_every and self.step_count % eval_every == 0:
                m.update(evaluate())
            m["time/elapsed_min"] = (time.time() - limit.started) / 60
            self.write_metrics(m)
            if (
                self.run_dir is not None
                and self.strategy.is_main
                and cfg.sample_every
                and (self.step_count % cfg.sample_every == 0 or self.step_count == 1)
            ):
                write_samples(
                    self.run_dir, sample_rows(exp, self.tokenizer, self.step_count, cfg.samples_shown)
                )
            bar.set_postfix(
                score=f"{m['reward/score_mean']:.3f}", kl=f"{m['kl/seq_k1']:.2f}",
                len=f"{m['response/length_mean']:.1f}", ent=f"{m['policy/entropy']:.2f}",
            )  # fmt: skip
            if self.step_count % max(cfg.log_every, 1) == 0:
                self.log(format_step(m))
            if on_step is not None:
                on_step(self.step_count)
            last = m
            if limit.reached() and self.step_count < steps:  # (the last step done in time is no early stop)
                self.stopped_early, self.stop_reason = True, limit.reason
                self.log(f"ppo: stopping after {self.step_count} of {steps} steps: {limit.reason}")
                break
        if self.run_dir is not None and self.strategy.is_main:
            plot_training(self.run_dir / METRICS, self.run_dir / "training.png", f"PPO\nrun {self.run_dir}")
        return last

    def budget(self) -> Budget:
        """Steps done of the planned ones, and whether (and why) the clock stopped the run early."""
        return Budget("ppo", self.planned_steps, self.step_count, self.stopped_early, self.stop_reason)

    def write_metrics(self, m: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(m)

    def state_dict(self) -> dict[str, Any]:
        """Everything a stopped run needs to go on as if it had not stopped (one process): the actor (LoRA
        and value head included) and critic weights, both optimizers, the counters, the KL controller, the
        running score moments and the samplers' generators."""
        if self.strategy.world_size > 1:
            raise NotImplementedError(
                "PPOTrainer.state_dict: one process only (DeepSpeed runs do not resume)"
            )
        critic = self.strategy.unwrap(self.critic) if self.critic is not None else None
        return {
            "step": self.step_count, "updates": self.updates_done, "kl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(), "loo_moments": self.loo_moments.state_dict(),
            "generator": self.generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "actor": self.actor_module.state_dict(), "actor_opt": self.actor_opt.state_dict(),
            "critic": critic.state_dict() if critic is not None else None,
            "critic_opt": self.critic_opt.state_dict() if self.critic_opt is not None else None,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["critic"] is None) != (self.critic is None):
            raise ValueError(
                "PPOTrainer.load_state_dict: the checkpoint and this run disagree on critic.backbone "
                "(shared vs separate); resume with the recipe the checkpoint was written with"
            )
        self.actor_module.load_state_dict(state["actor"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        if self.critic is not None:
            self.strategy.unwrap(self.critic).load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.step_count, self.updates_done = state["step"], state["updates"]
        self.kl_ctl.load_state_dict(state["kl"])
        self.score_moments.load_state_dict(state["score_moments"])
        if "loo_moments" in state:  # checkpoints written before score_norm 'group' existed lack it
            self.loo_moments.load_state_dict(state["loo_moments"])
        self.generator.set_state(state["generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])


def format_step(m: dict[str, Any]) -> str:
    """One log line: the numbers to watch."""
    acc = f" | held-out acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
    return (
        f"step {m['step']:>4} | score {m['reward/score_mean']:+.3f} ± {m['reward/score_std']:.3f} | "
        f"KL {m['kl/seq_k1']:.3f} (beta {m['kl/coef']:.3f}) | ent {m['policy/entropy']:.3f} | "
        f"clip {m.get('policy/clipfrac', float('nan')):.3f} | akl {m.get('policy/approx_kl', float('nan')):.4f} | "
        f"vloss {m.get('value/loss', float('nan')):.4f} ev {m['value/explained_variance']:+.2f} | "
        f"len {m['response/length_mean']:.1f} end {m['response/terminated']:.2f} | "
        f"t gen {m['time/generation']:.1f} score {m['time/scoring']:.1f} inf {m['time/inference']:.1f} "
        f"train {m['time/training']:.1f} s{acc}"
    )


def _param_groups(
    model: torch.nn.Module, optim: Any, value_lr: float | None = None, base_lr: float | None = None
) -> list[dict]:
    """AdamW groups: matrices decayed, norms / biases / embeddings not; a shared value head at the critic's lr."""
    decay, no_decay, value = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("value_head."):
            value.append(p)
        elif p.ndim >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    lr = base_lr or optim.lr
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr},
        {"params": value, "weight_decay": 0.0, "base_lr": value_lr or lr},
    ]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], optim: Any, device: torch.device) -> torch.optim.AdamW:
    for g in groups:
        g["lr"] = g["base_lr"]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **extra)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
