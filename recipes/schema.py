"""Stage recipes: each one composes the frozen config sections of the components it runs.

A component receives only its own section (the model its `GLMConfig`, the optimizer its
`OptimConfig`, ...), never the whole recipe. `STAGES` maps a recipe's `stage:` to its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.train import DataConfig, OptimConfig, TrainConfig
from glmwb.rewards.config import LoRAConfig, RewardLossConfig, RewardTrainConfig, VerifierConfig


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # the run folder: resolved config, metrics, checkpoints, outputs
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    """The embedded synthetic world (pretrain/world.py): entities and task families from a seed."""

    seed: int = 0
    num_entities: int = 96


@dataclass(frozen=True)
class CorpusConfig:
    """Where pretraining / tokenizer text comes from: the embedded world or JSONL / text files."""

    source: Literal["world", "files"] = "world"
    paths: tuple[str, ...] = ()  # JSONL ("text" field, .gz allowed) or .txt files when source is "files"
    world: WorldConfig = field(default_factory=WorldConfig)
    num_docs: int = 20_000  # documents drawn from the world
    max_docs: int | None = None  # cap on documents read from files

    def __post_init__(self) -> None:
        if self.source == "files" and not self.paths:
            raise ValueError("corpus.source is 'files' but corpus.paths is empty; list JSONL or .txt files")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 2048
    cjk: Literal["char", "run"] = "char"  # Han / kana: one token per character at most, or BPE over runs


@dataclass(frozen=True)
class TokenizerRecipe:
    """`stage: tokenizer` — train a byte-level BPE tokenizer with GLM's special tokens and chat template."""

    stage: Literal["tokenizer"] = "tokenizer"
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(frozen=True)
class PretrainRecipe:
    """`stage: pretrain` — data pipeline, then the pretraining loop, then samples."""

    stage: Literal["pretrain"] = "pretrain"
    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GLMConfig = field(default_factory=GLMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelConfig | None = None  # null: plain PyTorch; a section picks Triton kernels per op (GPU)


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


@dataclass(frozen=True)
class StageRef:
    """One stage of a pipeline: a recipe file (relative to the pipeline's file) and its overrides.

    Override values may use `${run.dir}`, the pipeline's run folder.
    """

    name: str
    recipe: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineRecipe:
    """`stage: pipeline` — several stage recipes run in order (the quickstart)."""

    stage: Literal["pipeline"] = "pipeline"
    run: RunConfig = field(default_factory=RunConfig)
    stages: tuple[StageRef, ...] = ()

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {', '.join(dupes)}")


STAGES: dict[str, type] = {
    "tokenizer": TokenizerRecipe,
    "pretrain": PretrainRecipe,
    "reward": RewardRecipe,
    "pipeline": PipelineRecipe,
}

# Stages whose recipe class lives beside its trainer ("module:Class"), imported on first use so that the
# CLI starts without TRL and friends; each module also has the runner named in RUNNERS.
LAZY_STAGES: dict[str, str] = {
    "sft": "glmwb.align.sft:SFTRecipe",
    "dpo": "glmwb.align.dpo:DPORecipe",
    "online_dpo": "glmwb.align.online_dpo:OnlineDPORecipe",
    "ppo": "glmwb.align.ppo.run:PPORecipe",
    "grpo": "glmwb.align.grpo:GRPORecipe",
    "align_eval": "glmwb.align.evaluate:EvalRecipe",
    "preferences": "glmwb.annotation.collect:PreferencesRecipe",
}

RUNNERS: dict[str, str] = {
    "tokenizer": "glmwb.pretrain.run:run_tokenizer",
    "pretrain": "glmwb.pretrain.run:run_pretrain",
    "reward": "glmwb.rewards.run:run_reward",
    "sft": "glmwb.align.sft:run_sft",
    "dpo": "glmwb.align.dpo:run_dpo",
    "online_dpo": "glmwb.align.online_dpo:run_online_dpo",
    "ppo": "glmwb.align.ppo.run:run_ppo",
    "grpo": "glmwb.align.grpo:run_grpo",
    "align_eval": "glmwb.align.evaluate:run_eval",
    "preferences": "glmwb.annotation.collect:run_preferences",
}


def _resolve(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def stage_names() -> list[str]:
    return [*STAGES, *LAZY_STAGES]


def stage_class(stage: str) -> type:
    """The recipe class of ``stage`` (KeyError for an unknown stage)."""
    if stage in STAGES:
        return STAGES[stage]
    return _resolve(LAZY_STAGES[stage])


def stage_runner(stage: str):
    """The function that runs a built recipe of ``stage`` and returns its summary dict."""
    return _resolve(RUNNERS[stage])
