"""Stage recipes: each one composes the frozen config sections of the components it runs.

A component receives only its own section (the model its `GLMConfig`, the optimizer its
`OptimConfig`, ...), never the whole recipe. `STAGES` maps a recipe's `stage:` to its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pretrain.config import GLMConfig
from pretrain.train import DataConfig, OptimConfig, TrainConfig


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
    "pipeline": PipelineRecipe,
}
