"""Stage recipes: each one composes the frozen config sections of the components it runs.

A component receives only its own section (the model its `GLMConfig`, the optimizer its
`OptimConfig`, ...), never the whole recipe. `STAGES` maps a recipe's `stage:` to its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glmwb.pretrain.settings import RunConfig


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


STAGES: dict[str, type] = {"pipeline": PipelineRecipe}

# Every stage's recipe class lives in the package that runs it ("module:Class"), imported on first use so
# that the CLI starts without TRL and friends; each module also has the runner named in RUNNERS.
LAZY_STAGES: dict[str, str] = {
    "tokenizer": "glmwb.pretrain.run:TokenizerRecipe",
    "pretrain": "glmwb.pretrain.run:PretrainRecipe",
    "data": "glmwb.pretrain.stream:DataRecipe",
    "reward": "glmwb.rewards.config:RewardRecipe",
    "sft": "glmwb.align.sft:SFTRecipe",
    "dpo": "glmwb.align.dpo:DPORecipe",
    "online_dpo": "glmwb.align.online_dpo:OnlineDPORecipe",
    "ppo": "glmwb.align.ppo.run:PPORecipe",
    "grpo": "glmwb.align.grpo:GRPORecipe",
    "align_eval": "glmwb.align.evaluate:EvalRecipe",
    "eval": "glmwb.align.evals.harness:BenchRecipe",
    "preferences": "glmwb.annotation.collect:PreferencesRecipe",
    "arena": "glmwb.annotation.arena_round:ArenaRecipe",
    "compare_methods": "glmwb.recipes.compare_methods:CompareRecipe",
}

RUNNERS: dict[str, str] = {
    "tokenizer": "glmwb.pretrain.run:run_tokenizer",
    "pretrain": "glmwb.pretrain.run:run_pretrain",
    "data": "glmwb.pretrain.stream:run_data",
    "reward": "glmwb.rewards.run:run_reward",
    "sft": "glmwb.align.sft:run_sft",
    "dpo": "glmwb.align.dpo:run_dpo",
    "online_dpo": "glmwb.align.online_dpo:run_online_dpo",
    "ppo": "glmwb.align.ppo.run:run_ppo",
    "grpo": "glmwb.align.grpo:run_grpo",
    "align_eval": "glmwb.align.evaluate:run_eval",
    "eval": "glmwb.align.evals.harness:run_bench",
    "preferences": "glmwb.annotation.collect:run_preferences",
    "arena": "glmwb.annotation.arena_round:run_arena",
    "compare_methods": "glmwb.recipes.compare_methods:run_compare",
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
