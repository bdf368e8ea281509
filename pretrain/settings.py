"""Config sections that every stage shares: the run folder and seed, the embedded world, LoRA.

Plain frozen dataclasses with no heavy imports (the recipe schema imports them); a component receives only
its own section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from glmwb.pretrain.ranges import NonNegInt, PositiveFloat, PositiveInt, Range


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # the run folder: resolved config, metrics, checkpoints, outputs
    seed: NonNegInt = 0


@dataclass(frozen=True)
class WorldConfig:
    """The embedded synthetic world (glmwb.pretrain.world): entities and task families from a seed."""

    seed: NonNegInt = 0
    num_entities: PositiveInt = 96


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """PEFT LoRA on the GLM's linear layers (names as in ``pretrain/model.py``)."""

    enabled: bool = False
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
