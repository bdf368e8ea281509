"""Config sections of the PPO stage: plain frozen dataclasses with no heavy imports (the recipe schema and the
CLI import them). Each component receives only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from glmwb.pretrain.ranges import (
    AnyFloat,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Range,
)
from glmwb.pretrain.settings import LoRAConfig

RULE_NAMES = (
    "world_correct",
    "world_score",
    "world_on_topic",
    "gsm8k",
    "exact",
    "format",
    "length",
)  # rewards.rules.RULES


@dataclass(frozen=True)
class PolicyConfig:
    """The actor: a causal-LM GLM folder (SFT or base), optionally with a LoRA adapter."""

    init_from: str = "runs/sft/final"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # the frozen reference: "auto" = the base with the adapter switched off for a LoRA actor (no extra
    # copy), else a frozen copy of the initial policy
    reference: Literal["auto", "copy", "adapter_off"] = "auto"
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class CriticConfig:
    """The value function: a scalar head on a GLM.

    backbone "separate": its own GLM, initialised from ``init_from``: "policy" (the policy's folder), "reward"
    (the reward section's RM folder, head included) or a folder path (a GLM or reward folder). "shared": the
    head sits on the actor's backbone (one model fewer; the value loss then also shapes the actor's features,
    weighted by ppo.vf_coef)."""

    backbone: Literal["separate", "shared"] = "separate"
    init_from: str = "policy"
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # separate critic only
    lr: PositiveFloat | None = None  # default: optim.lr
    # PPO steps during which only the critic trains (values settle before the policy moves)
    warmup_steps: NonNegInt = 0


@dataclass(frozen=True)
class RewardSection:
    """What scores a response: rules, a reward model in-process, the HTTP scoring API, or rules + RM.

    kind rule: sum of ``rules`` (name -> weight; rewards.rules.RULES). rm: ``rm_weight`` x the RM folder's score.
    http: ``rm_weight`` x the score from ``url`` (rewards.server). combined: rules + RM (``rm`` or ``url``).
    """

    kind: Literal["rule", "rm", "http", "combined"] = "rule"
    rules: dict = field(default_factory=lambda: {"world_correct": 1.0})
    rm: str | None = None  # reward folder (kind rm / combined)
    url: str | None = None  # scoring API (kind http, or combined without rm)
    rm_weight: NonNegFloat = 1.0
    normalize_rm: bool = True  # standardise RM scores with the mean / std saved in the reward folder
    head: str | None = None  # RM head (default: the first, the overall reward)
    empty_score: AnyFloat = -1.0  # the RM term of an empty response (the RM refuses to score one)
    # subtracted when a response hits max_new_tokens unterminated
    missing_terminator_penalty: NonNegFloat = 0.0
    length_penalty: NonNegFloat = 0.0  # subtracted per response token (rule "length" penalises characters)
    clip: PositiveFloat | None = None  # clip the final score to [-clip, clip] (after the penalties)

    def __post_init__(self) -> None:
        if not isinstance(self.rules, dict):
            raise ValueError("reward.rules must be a mapping rule name -> weight")
        unknown = sorted(set(self.rules) - set(RULE_NAMES))
        if unknown:
            raise ValueError(f"reward.rules: unknown rule(s) {unknown}; known: {', '.join(RULE_NAMES)}")
        for name, w in self.rules.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError(f"reward.rules.{name} must be a number (the rule's weight), got {w!r}")
        if self.kind == "rule" and not self.rules:
            raise ValueError("reward.kind is 'rule' but reward.rules is empty; e.g. {world_correct: 1.0}")
        if self.kind == "rm" and not self.rm:
            raise ValueError("reward.kind is 'rm' but reward.rm (a reward-model folder) is not set")
        if self.kind == "http" and not self.url:
            raise ValueError(
                "reward.kind is 'http' but reward.url (the scoring API, e.g. http://127.0.0.1:8008) is not set"
            )
        if self.kind == "combined" and not (self.rm or self.url):
            raise ValueError("reward.kind is 'combined' but neither reward.rm nor reward.url is set")
        if self.missing_terminator_penalty < 0 or self.length_penalty < 0:
            raise ValueError(
                "reward.missing_terminator_penalty and reward.length_penalty are subtracted: use >= 0"
            )
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"reward.clip must be > 0 or null, got {self.clip}")


@dataclass(frozen=True)
class WorldPromptsConfig:
    """Which of the embedded world's prompts PPO rolls out on and is graded on (world-only settings).

    ``train_split``: ``train`` (instances the SFT chats ask) or ``dev`` (held-out instances the policy has
    only read as prose); ``heldout_split``: ``heldout`` or ``test`` (the half of heldout that ``dev`` is
    not). Training on ``dev`` and grading on ``test`` is the design that can show transfer (docs/align_ppo.md).
    """

    seed: NonNegInt = 0
    num_entities: PositiveInt = 96
    train_split: Literal["train", "dev"] = "train"
    heldout_split: Literal["heldout", "test"] = "heldout"
    # rollout prompts' phrasings: null = the split's own (train / dev: the three the SFT chats ask); 4 adds the
    # fourth, which only held-out prompts otherwise use (new instances stay new; docs/align_ppo.md)
    train_phrasings: Annotated[int, Range(1, 4)] | None = None
    # that many prompts of ``train`` instances (the ones the SFT chats ask) mixed into the rollouts of a
    # ``dev`` run: answers the policy already gets right, so that a value learnt on a dev instance is not
    # rewarded on every question of its kind (docs/align_ppo.md)
    anchor_prompts: NonNegInt = 0
    families: tuple[str, ...] = ()  # restrict to these task families (arithmetic, conversion, fact); () = all

    def __post_init__(self) -> None:
        bad = sorted(set(self.families) - {"arithmetic", "conversion", "fact"})
        if bad:
            raise ValueError(f"prompts.world.families: unknown {bad}; known: arithmetic, conversion, fact")
        if self.train_phrasings is not None and not 1 <= self.train_phrasings <= 4:
            raise ValueError(
                f"prompts.world.train_phrasings must be 1 to 4 or null, got {self.train_phrasings}"
            )
        if self.anchor_prompts < 0 or (self.anchor_prompts and self.train_split != "dev"):
            raise ValueError(
                f"prompts.world.anchor_prompts must be >= 0 and needs train_split: dev, got {self.anchor_prompts} "
                f"with train_split {self.train_split!r}"
            )
        if self.train_split == "dev" and self.heldout_split == "heldout":
            raise ValueError(
                "prompts.world: train_split 'dev' is half of heldout_split 'heldout'; grade on heldout_split: test"
            )


@dataclass(frozen=True)
class PromptsConfig:
    """Rollout prompts and evaluation prompts (from the embedded world: ``world``)."""

    source: Literal["world"] = "world"
    world: WorldPromptsConfig = field(default_factory=WorldPromptsConfig)
    train_prompts: PositiveInt = 2000
    heldout_prompts: NonNegInt = 200
    max_prompt_tokens: PositiveInt = 256

    def __post_init__(self) -> None:
        if self.train_prompts < 1 or self.heldout_prompts < 0:
            raise ValueError("prompts.train_prompts must be >= 1 and prompts.heldout_prompts >= 0")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: PositiveInt = 48
    temperature: PositiveFloat = 1.0  # the policy optimised is softmax(logits / temperature)
    # < 1 or top_k > 0 samples from a truncated policy: PPO's ratio is then off-policy
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    top_k: NonNegInt = 0
    batch_size: PositiveInt = 64  # sequences generated at once

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 for PPO rollouts, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class PPOConfig:
    gamma: Fraction = 1.0
    lam: Fraction = 0.95
    clip_range: PositiveFloat = 0.2  # policy ratio clip epsilon
    clip_range_value: PositiveFloat | None = 0.2  # value clip (null: plain squared error)
    vf_coef: NonNegFloat = 0.1
    entropy_coef: NonNegFloat = 0.0  # + entropy bonus (loss -= coef x mean entropy)
    # normalise the sequence score before GAE: running / batch = divide by the std (running across steps, or
    # this batch's); group = subtract the mean of the same prompt's other samples (leave-one-out, as RLOO does;
    # needs train.samples_per_prompt >= 2), then divide by the running std. A Bradley-Terry RM is fitted on
    # pairs of answers to one prompt, so its score carries a per-prompt offset the pairs never pinned down;
    # the group baseline cancels it and leaves only what the RM was trained to judge.
    score_norm: Literal["none", "running", "batch", "group"] = "running"
    score_norm_shift: bool = False  # subtract the mean too (else divide by the std only)
    score_clip: PositiveFloat | None = 10.0  # clip the normalised score to [-clip, clip] (null: no clip)
    whiten_rewards: bool = False  # whiten per-token rewards (after KL) across the batch, mean kept
    whiten_advantages: bool = True
    # stop this step's updates once the approx KL to pi_old exceeds it
    early_stop_kl: PositiveFloat | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.clip_range <= 0:
            raise ValueError(f"ppo.clip_range must be > 0, got {self.clip_range}")


@dataclass(frozen=True)
class KLConfig:
    controller: Literal["adaptive", "fixed"] = "adaptive"
    coef: NonNegFloat = 0.05  # beta (the adaptive controller's initial value)
    target: PositiveFloat = 6.0  # adaptive: the per-response KL (nats, summed over tokens) to hold
    horizon: PositiveFloat = 10_000  # adaptive: samples to correct an error (Ziegler et al.)
    estimator: Literal["k1", "k2", "k3", "abs", "mse"] = "k1"  # per-token penalty

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"kl.coef must be >= 0, got {self.coef}")
        if self.controller == "adaptive" and (self.target <= 0 or self.horizon <= 0):
            raise ValueError("kl.target and kl.horizon must be > 0 with the adaptive controller")


@dataclass(frozen=True)
class PPOTrainConfig:
    steps: PositiveInt = 100  # PPO steps: rollout -> score -> epochs of minibatch updates
    batch_size: PositiveInt = 64  # prompts per step
    samples_per_prompt: PositiveInt = 1
    minibatch_size: PositiveInt = 32  # responses per optimizer step
    # responses per forward / backward (gradients accumulate to the minibatch)
    microbatch_size: PositiveInt = 32
    epochs: PositiveInt = 2  # passes over each step's rollouts
    max_minutes: PositiveFloat | None = None
    log_every: PositiveInt = 1
    sample_every: NonNegInt = 10  # the sample table (per-token KL) every N steps; 0 = never
    samples_shown: NonNegInt = 8
    eval_every: NonNegInt = 0  # held-out evaluation during training every N steps; 0 = before / after only
    # checkpoints/step_N every N steps (policy folder + trainer_state.pt); 0 = final only
    save_every: NonNegInt = 0
    keep_checkpoints: NonNegInt = 2  # the newest N checkpoints are kept; 0 = all
    resume: bool = True  # continue from the newest checkpoint in run.dir (single process), if there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto = bf16 autocast on CUDA
    num_threads: PositiveInt | None = None
    strategy: Literal["single", "deepspeed"] = "single"
    zero_stage: Annotated[int, Range(0, 3)] = 2
    # log-probs / entropy of the chosen tokens: "triton" = kernels.logprobs (chunked LM head, never the full
    # logits; GPU), "torch" = plain log-softmax; auto = triton on CUDA
    logprob_kernel: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        rollouts = self.batch_size * self.samples_per_prompt
        if min(self.steps, self.batch_size, self.samples_per_prompt, self.epochs) < 1:
            raise ValueError("train.steps, batch_size, samples_per_prompt and epochs must be >= 1")
        if self.minibatch_size < 1 or rollouts % self.minibatch_size:
            raise ValueError(
                f"train.minibatch_size ({self.minibatch_size}) must divide the responses per step "
                f"(batch_size x samples_per_prompt = {rollouts})"
            )
        if self.microbatch_size < 1 or self.minibatch_size % self.microbatch_size:
            raise ValueError(
                f"train.microbatch_size ({self.microbatch_size}) must divide train.minibatch_size ({self.minibatch_size})"
            )
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {self.zero_stage}")


@dataclass(frozen=True)
class PPOEvalConfig:
    before: bool = True  # held-out evaluation of the initial policy
    after: bool = True
    max_new_tokens: PositiveInt = 48
    rm_scores: bool = True  # add RM rewards to the evaluation when the reward section has an RM
    # also grade the first N rollout (train-split) prompts before / after: did PPO learn what it was rewarded
    # for, on the prompts it saw? (held-out accuracy answers whether that carries over to new instances)
    rollout_prompts: NonNegInt = 0
    # also k temperature-1 answers per held-out prompt before / after (sample_accuracy, Wilcoxon p): PPO
    # trains the sampling distribution, and greedy accuracy moves only where the argmax flips
    samples: NonNegInt = 0
    sample_temperature: PositiveFloat = 1.0

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"eval.samples must be >= 0, got {self.samples}")
        if self.samples and self.sample_temperature <= 0:
            raise ValueError(f"eval.sample_temperature must be > 0 to sample, got {self.sample_temperature}")
