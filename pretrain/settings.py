"""Config sections that every stage shares: the run folder and seed, the embedded world, LoRA.

Plain frozen dataclasses with no heavy imports (the recipe schema imports them); a component receives only
its own section.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # the run folder: resolved config, metrics, checkpoints, outputs
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    """The embedded synthetic world (glmwb.pretrain.world): entities and task families from a seed."""

    seed: int = 0
    num_entities: int = 96


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """PEFT LoRA on the GLM's linear layers (names as in ``pretrain/model.py``)."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
