"""Config sections of the reward stage (plain frozen dataclasses, no heavy imports: the recipe schema
imports them). Each component gets only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.settings import LoRAConfig, RunConfig, WorldConfig

# rewards/verifier.py: statistics of a frozen LM's per-token predictions over the judged answer, each
# divided by its scale so that all are O(1) for the optimiser (name -> scale)
VERIFIER_FEATURES: dict[str, float] = {
    "contradiction": 5.0,
    "contradiction_sum": 10.0,
    "confident_misses": 2.0,
    "logp_sum": 20.0,
    "logp_min": 10.0,
    "length": 32.0,
    "opening_contradiction": 5.0,
    "body_contradiction": 5.0,
    "body_contradiction_sum": 10.0,
    "body_confident_misses": 2.0,
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
    # feature weights that also read the answer's representation: W + U·h_T (U zero at the start), so the value
    # check can count for more where the answer's form (filler, another language) dilutes it; a list of
    # feature names gates only those (the rest keep fixed weights)
    gate: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        check_verifier_features(self.features)
        if isinstance(self.gate, (list, tuple)):
            object.__setattr__(self, "gate", tuple(self.gate))
            bad = [n for n in self.gate if n not in self.features]
            if bad or not self.gate:
                raise ValueError(
                    f"model.verifier.gate {list(self.gate)}: {bad or 'empty'} not among model.verifier.features "
                    f"{list(self.features)}; give true, false or some of those names"
                )
        elif not isinstance(self.gate, bool):
            raise ValueError(
                f"model.verifier.gate must be true, false or a list of feature names, got {self.gate!r}"
            )


@dataclass(frozen=True)
class RewardLossConfig:
    tie_model: Literal["drop", "davidson", "rao_kupper"] = "davidson"  # "drop" = plain Bradley-Terry
    tie_param: float = 1.0  # initial nu (Davidson, >= 0) or theta (Rao-Kupper, > 1)
    learn_tie_param: bool = True  # fit it with the model (one per head)
    tie_param_lr: float = 0.05  # its own learning rate: the model's fine-tuning lr would barely move it
    use_margin: bool = False  # -log sigma(d - margin_scale * record.margin) on strict pairs
    margin_scale: float = 1.0
    centering: float = 0.0  # coefficient of mean((r_c + r_r)^2)
    weights: Literal["record", "reliability", "none"] = "record"  # per-pair weights (reliability: data.py)
    # + lm_coef x next-token loss on the chosen responses through the base's lm_head, a regulariser that keeps
    # the hidden states those of a language model (GRM, Yang et al. 2024); needs a causal-LM init_from
    lm_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.tie_model == "davidson" and self.tie_param < 0:
            raise ValueError(f"loss.tie_param (Davidson's nu) must be >= 0, got {self.tie_param}")
        if self.tie_model == "rao_kupper" and self.tie_param <= 1:
            raise ValueError(f"loss.tie_param (Rao-Kupper's theta) must be > 1, got {self.tie_param}")


@dataclass(frozen=True)
class RewardTrainConfig:
    batch_size: int = 16  # pairs per micro-batch
    grad_accum: int = 1
    max_steps: int = 200
    epochs: float | None = None  # when set, max_steps = ceil(epochs x pairs / (batch_size x grad_accum))
    max_minutes: float | None = None
    eval_every: int = 50  # held-out evaluation every N steps (and at the end; 0: only at the end)
    log_every: int = 10
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 1
    resume: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = False  # padding-free batches (doc ids) instead of right padding
    verifier_lr: float = 0.02  # learning rate of the likelihood-feature weights (model.verifier)
    head_lr: float | None = None  # the score head's own learning rate (None: optim.lr, as the backbone)
    # fit those weights alone on this many training pairs (cached features, L-BFGS) before the joint training
    verifier_prefit_pairs: int = 0
    pack_tokens: int = 2048  # row length of packed batches
    num_threads: int | None = None
    strategy: Literal["single", "deepspeed"] = "single"
    zero_stage: int = 2
    # value first, form second (docs/rewards.md, "Session 25"): the backbone and head learn only from the pairs
    # whose records call this attribute equal (both answers right, say), with the likelihood-feature weights held
    # at 0; then those weights are fitted on the other pairs with the head's rewards as offset and scaled by the
    # entry of value_scales that ranks the training pairs best. null: one joint fit on every pair
    value_first: str | None = None
    value_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)

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
class AnnotatorsConfig:
    """Simulated annotators labelling the embedded world's pairs (pretrain/world.py ``preference_pairs``)."""

    n: int = 3
    noise: float = 0.1  # P(a label is replaced by a uniformly random one), for every annotator...
    noise_per_annotator: tuple[float, ...] = ()  # ...or one value per annotator (reliable and careless ones)
    labels_per_pair: int = 1  # annotators labelling each pair (>= 2 lets reliability be estimated)
    # they also say how much better the winner is (negligible / slight / clear / strong, from the utility
    # gap); the records' margin is then that level's (annotation.records.STRENGTH_MARGINS), for loss.use_margin
    strength: bool = False

    def __post_init__(self) -> None:
        if self.noise_per_annotator and len(self.noise_per_annotator) != self.n:
            raise ValueError(
                f"noise_per_annotator has {len(self.noise_per_annotator)} values for n={self.n} annotators"
            )
        if not 1 <= self.labels_per_pair <= self.n:
            raise ValueError(f"labels_per_pair must be in [1, n={self.n}], got {self.labels_per_pair}")


@dataclass(frozen=True)
class RewardDataConfig:
    """Preference pairs for a reward model: the embedded world's simulated annotators, or files."""

    source: Literal["world", "files"] = "world"
    tokenizer: str | None = None  # a tokenizer folder; default: the one in model.init_from
    world: WorldConfig = field(default_factory=WorldConfig)
    annotators: AnnotatorsConfig = field(default_factory=AnnotatorsConfig)
    train_prompts: int = 2000  # world: one pair per prompt (labels_per_pair labels each)
    heldout_prompts: int = 400  # world: held-out prompts (instances never asked in training)
    # world: also this many training prompts from the `dev` half of the held-out instances, the prompts PPO
    # samples on (recipes/ppo.yaml prompts.train_split): annotators label answers on the distribution RL will
    # run on, as in any RLHF loop. The evaluation then uses only the other half (heldout_split: test).
    dev_prompts: int = 0
    # world: the dev prompts' phrasings: null = dev's own three; 4 also asks them the fourth way, as PPO's
    # prompts.train_phrasings: 4 does (192 dev instances x 2 languages x 4 phrasings = 1,536 distinct prompts)
    dev_phrasings: int | None = None
    heldout_split: Literal["heldout", "test"] = "heldout"  # world: the instances the held-out pairs come from
    # world: the share of training prompts whose pair is a minimal pair (one answer sentence with a wrong value
    # or wrapped in filler, World.contrast_responses); held-out pairs are always drawn as before
    contrastive: float = 0.0
    # which minimal pairs, drawn uniformly ('a>b', a and b from correct / wrong / verbose / wrong_language and the
    # counterfactual verbose_wrong / wrong_language_wrong / terse / terse_wrong / other_subject / other_attribute /
    # terse_other; 'all': every pairing of those eleven; repeat one to weight it; the annotators give the label)
    contrast_kinds: tuple[str, ...] = ("correct>wrong", "correct>wrong", "correct>verbose")
    # training pairs an annotator marked "both bad" (provenance.label; the store's export and the world's
    # annotators): a tie (the loss's tie term pulls the two rewards together) or left out (docs/rewards.md)
    both_bad: Literal["tie", "drop"] = "tie"
    # with both_bad: tie, the weight of those tie pairs in the loss (x the record's own): < 1 lets two wrong
    # answers of different forms keep apart (a wrong sentence above a refusal) while still learning ties
    both_bad_weight: float = 1.0
    paths: tuple[str, ...] = ()  # files: training data (JSONL / JSON / .gz / parquet / datasets folder)
    eval_paths: tuple[str, ...] = ()  # files: held-out data; default: eval_fraction of paths
    extra_paths: tuple[
        str, ...
    ] = ()  # more training pairs, whatever the source (a preferences stage's export)
    format: Literal["auto", "preference", "hh_rlhf", "oasst_zh"] = "auto"
    skip_invalid: bool = False  # leave out (and count) malformed rows instead of stopping at the first
    eval_fraction: float = 0.05
    max_train_pairs: int | None = None
    max_eval_pairs: int | None = None
    max_length: int = 256  # tokens of prompt + response + terminator
    truncation: Literal["left", "drop", "error"] = "left"

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("data.source is 'files' but data.paths is empty; list preference files")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.contrastive <= 1.0:
            raise ValueError(f"data.contrastive must be a fraction in [0, 1], got {self.contrastive}")
        if self.dev_prompts < 0:
            raise ValueError(f"data.dev_prompts must be >= 0, got {self.dev_prompts}")
        if self.dev_phrasings is not None and not 1 <= self.dev_phrasings <= 4:
            raise ValueError(f"data.dev_phrasings must be 1 to 4 or null, got {self.dev_phrasings}")
        if not 0.0 < self.both_bad_weight <= 1.0:
            raise ValueError(
                f"data.both_bad_weight must be in (0, 1] (the weight of 'both bad' tie pairs; "
                f"data.both_bad: drop leaves them out), got {self.both_bad_weight}"
            )
        if self.dev_prompts and self.heldout_split != "test":
            raise ValueError(
                f"data.dev_prompts ({self.dev_prompts}) trains on the world's dev instances, which are half of "
                "heldout_split 'heldout': set data.heldout_split: test (the other half) to keep the evaluation held out"
            )
        if self.contrastive:
            from glmwb.pretrain.world import contrast_pairs  # names the allowed kinds in its error

            if not self.contrast_kinds:
                raise ValueError(
                    "data.contrast_kinds is empty; name at least one minimal pair such as 'correct>wrong'"
                )
            contrast_pairs(self.contrast_kinds)


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
    ensemble: int = 1
    ensemble_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise ValueError(f"model.ensemble must be >= 1 (1 = a single reward model), got {self.ensemble}")
        if self.ensemble_penalty < 0:
            raise ValueError(f"model.ensemble_penalty must be >= 0, got {self.ensemble_penalty}")


@dataclass(frozen=True)
class RewardEvalConfig:
    ensemble: int = 0  # extra members trained with other seeds, for the ensemble-disagreement metrics
    bins: int = 10  # calibration bins
    target_fraction_of_ceiling: float = 0.9  # world: held-out accuracy / annotators' agreement ceiling
    # a causal-LM folder whose own Σ log p(response | prompt) is scored on the held-out pairs beside the RM
    # ("init": model.init_from); null: skip
    likelihood_baseline: str | None = None


@dataclass(frozen=True)
class RewardRecipe:
    """`stage: reward` — preference pairs → a GLM reward model (+ evaluation) → a Hugging Face folder."""

    stage: Literal["reward"] = "reward"
    run: RunConfig = field(default_factory=RunConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
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
