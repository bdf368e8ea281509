"""Config sections of the reward stage (plain frozen dataclasses, no heavy imports: the recipe schema
imports them). Each component gets only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from glmwb.annotation.preference_data import PreferenceDataConfig
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.settings import LoRAConfig, RunConfig

# rewards/verifier.py: statistics of a frozen LM's per-token predictions over the judged answer, each
# divided by its scale, the unit it is counted in, so that all are O(1) for the optimiser and one learning
# rate (train.verifier_lr) suits every weight (name -> scale; tests/rewards/test_verifier.py checks each unit).
# A saved folder's feature weights W are in these units: changing a scale changes what every saved W means.
VERIFIER_FEATURES: dict[str, float] = {
    "contradiction": 5.0,  # nats: one token against a sure belief (m ~ 1) at p = e^-5 is 1
    "contradiction_sum": 10.0,  # nats: two such tokens sum to 1
    "confident_misses": 2.0,  # two tokens off a first choice held at m > 0.5
    "logp_sum": 20.0,  # nats: 32 tokens at p = e^-0.625 each sum to -1
    "logp_min": 10.0,  # nats: the least likely token at p = e^-10 is -1
    "length": 32.0,  # tokens: a 32-token answer is 1
    "opening_contradiction": 5.0,  # as contradiction, over the opening
    "body_contradiction": 5.0,  # as contradiction, over the body
    "body_contradiction_sum": 10.0,  # as contradiction_sum, over the body
    "body_confident_misses": 2.0,  # as confident_misses, over the body
}


def check_verifier_features(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The names as a tuple, or a ValueError naming the unknown / repeated ones and the choices."""
    names = tuple(names)
    bad = [n for n in names if n not in VERIFIER_FEATURES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"model.verifier.features {list(names)}: unknown {bad}, or empty, or a name repeated; "
            f"choose from {list(VERIFIER_FEATURES)}"
        )
    return names


@dataclass(frozen=True)
class VerifierConfig:
    """Likelihood features of a frozen causal LM added to the reward through learned weights
    (docs/rewards.md, "Likelihood features")."""

    enabled: bool = False
    lm: str = "init"  # a causal-LM GLM folder (same tokenizer), or "init": model.init_from
    features: tuple[str, ...] = (
        "opening_contradiction", "body_contradiction", "body_contradiction_sum", "body_confident_misses"
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_verifier_features(self.features)


@dataclass(frozen=True)
class RewardLossConfig:
    tie_model: Literal["drop", "davidson", "rao_kupper"] = "davidson"  # "drop" = plain Bradley-Terry
    tie_param: NonNegFloat = 1.0  # initial nu (Davidson, >= 0) or theta (Rao-Kupper, > 1)
    learn_tie_param: bool = True  # fit it with the model (one per head)
    tie_param_lr: NonNegFloat = 0.05  # its own learning rate: the model's fine-tuning lr would barely move it
    use_margin: bool = False  # -log sigma(d - margin_scale * record.margin) on strict pairs
    margin_scale: NonNegFloat = 1.0
    centering: NonNegFloat = 0.0  # coefficient of mean((r_c + r_r)^2)
    weights: Literal["record", "reliability", "none"] = "record"  # per-pair weights (reliability: data.py)
    # + lm_coef x next-token loss on the chosen responses through the base's lm_head, a regulariser that keeps
    # the hidden states those of a language model (GRM, Yang et al. 2024); needs a causal-LM init_from
    lm_coef: NonNegFloat = 0.0

    def __post_init__(self) -> None:
        if self.tie_model == "davidson" and self.tie_param < 0:
            raise ValueError(f"loss.tie_param (Davidson's nu) must be >= 0, got {self.tie_param}")
        if self.tie_model == "rao_kupper" and self.tie_param <= 1:
            raise ValueError(f"loss.tie_param (Rao-Kupper's theta) must be > 1, got {self.tie_param}")


@dataclass(frozen=True)
class RewardTrainConfig:
    batch_size: PositiveInt = 16  # pairs per micro-batch
    grad_accum: PositiveInt = 1
    max_steps: PositiveInt = 200
    # when set, max_steps = ceil(epochs x pairs / (batch_size x grad_accum))
    epochs: PositiveFloat | None = None
    max_minutes: PositiveFloat | None = None
    eval_every: NonNegInt = 50  # held-out evaluation every N steps (and at the end; 0: only at the end)
    log_every: PositiveInt = 10
    save_every: NonNegInt = 0  # 0: only the final checkpoint
    keep_checkpoints: NonNegInt = 1
    resume: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False  # padding-free batches (doc ids) instead of right padding
    verifier_lr: PositiveFloat = 0.02  # learning rate of the likelihood-feature weights (model.verifier)
    # the score head's own learning rate (None: optim.lr, as the backbone)
    head_lr: PositiveFloat | None = None
    # fit those weights alone on this many training pairs (cached features, L-BFGS) before the joint training
    verifier_prefit_pairs: NonNegInt = 0
    pack_tokens: PositiveInt = 2048  # row length of packed batches
    num_threads: PositiveInt | None = None
    strategy: Literal["single", "deepspeed"] = "single"
    zero_stage: Annotated[int, Range(0, 3)] = 2
    # value first, form second (docs/rewards.md): the backbone and head learn only from the pairs
    # whose records call this attribute equal (both answers right, say), with the likelihood-feature weights held
    # at 0; then those weights are fitted on the other pairs with the head's rewards as offset and scaled by the
    # entry of value_scales that ranks the training pairs best. null: one joint fit on every pair
    value_first: str | None = None
    value_scales: tuple[PositiveFloat, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_scales", tuple(float(k) for k in self.value_scales))
        if not self.value_scales or min(self.value_scales) <= 0:
            raise ValueError(f"train.value_scales must be positive numbers, got {list(self.value_scales)}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"train.head_lr must be > 0 (or null: optim.lr), got {self.head_lr}")
        if self.verifier_prefit_pairs < 0:
            raise ValueError(
                f"train.verifier_prefit_pairs must be >= 0 (0 = off), got {self.verifier_prefit_pairs}"
            )


@dataclass(frozen=True)
class RewardModelConfig:
    init_from: str | None = None  # a base / SFT GLM folder (new head), or a reward folder
    heads: tuple[str, ...] = ("reward",)  # first: the overall preference; more: attributes in the records
    # the token after the response where the reward is read: GLM's turn terminators, or none (its last token)
    score_token: Literal["<|endoftext|>", "<|user|>", "none"] = "<|endoftext|>"
    config: GLMConfig | None = None  # random initialisation when init_from is null (baselines, tests)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # likelihood features of a frozen LM
    # > 1: that many RMs on the same pairs from seeds seed, seed+1, ...; final/ is their ensemble (rewards/ensemble.py:
    # the mean reward, minus ensemble_penalty x the members' std), evaluated as one
    ensemble: PositiveInt = 1
    ensemble_penalty: NonNegFloat = 0.0

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise ValueError(f"model.ensemble must be >= 1 (1 = a single reward model), got {self.ensemble}")
        if self.ensemble_penalty < 0:
            raise ValueError(f"model.ensemble_penalty must be >= 0, got {self.ensemble_penalty}")


@dataclass(frozen=True)
class RewardEvalConfig:
    ensemble: NonNegInt = 0  # extra members trained with other seeds, for the ensemble-disagreement metrics
    bins: PositiveInt = 10  # calibration bins
    target_fraction_of_ceiling: Fraction = 0.9  # world: held-out accuracy / annotators' agreement ceiling
    # a causal-LM folder whose own Σ log p(response | prompt) is scored on the held-out pairs beside the RM
    # ("init": model.init_from); null: skip
    likelihood_baseline: str | None = None


@dataclass(frozen=True)
class RewardRecipe:
    """`stage: reward` — preference pairs → a GLM reward model (+ evaluation) → a Hugging Face folder."""

    stage: Literal["reward"] = "reward"
    run: RunConfig = field(default_factory=RunConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    eval: RewardEvalConfig = field(default_factory=RewardEvalConfig)

    def __post_init__(self) -> None:
        if self.model.init_from is None and self.model.config is None:
            raise ValueError("set model.init_from (a GLM folder) or model.config (random initialisation)")
        if self.model.ensemble > 1 and self.eval.ensemble:
            raise ValueError(
                "model.ensemble > 1 already trains the members whose disagreement is evaluated; set eval.ensemble: 0"
            )
