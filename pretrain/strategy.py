"""The one place a trainer meets a distributed engine (OpenRLHF's idea): setup, prepare, backward, step,
all-reduce, save. ``SingleDevice`` is plain PyTorch; ``DeepSpeed`` wraps ZeRO 1-3 (``deepspeed`` is imported
only when chosen). Trainers call these methods and never ``deepspeed`` itself.

Two ranks on one CPU (tests/rewards/test_distributed.py checks 2 ranks = 1 rank with 2 accumulation steps):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m glmwb.recipes.cli run recipes/reward.yaml train.strategy=deepspeed
Resuming a DeepSpeed run from a checkpoint is not supported yet (the trainer refuses).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class SingleDevice:
    """One process, one device: backward is ``loss.backward()``, step clips then steps."""

    world_size = 1
    rank = 0
    is_main = True

    def setup(self) -> None:
        pass

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return model, optimizer

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def gathered(self, model: nn.Module):
        """A context in which every parameter is whole on this rank (for saving)."""
        return contextlib.nullcontext()


class DeepSpeed(SingleDevice):
    """ZeRO stage 1-3 through ``deepspeed.initialize``; gradient accumulation stays in the trainer (it
    normalises each micro-batch by the whole step's weight), so the engine is told GAS = 1 and every
    optimizer step is one ``engine.step()`` after the trainer's micro-batches.

    On a CPU: ``DS_ACCELERATOR=cpu`` and the gloo backend; the optimizer is DeepSpeed's AdamW with
    ``torch_adam`` (FIELD_NOTES).
    """

    def __init__(self, zero_stage: int = 2, grad_clip: float = 1.0) -> None:
        self.zero_stage = zero_stage
        self.grad_clip = grad_clip
        self.engine = None

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
            "bf16": {"enabled": torch.cuda.is_available()},
        }
        # the trainer's AdamW (param groups, weight decay, tie-parameter lr) is handed to the engine as is
        self.engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return self.engine, optimizer

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        # the trainer's loss is this rank's share of the step's global mean; the engine averages gradients
        # over ranks, so scale back up to get their sum
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self, model: nn.Module, optimizer: Any, grad_clip: float) -> float:
        self.engine.step()  # clips (gradient_clipping), steps, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gathered(self, model: nn.Module):
        if self.zero_stage < 3:  # stages 1-2 partition optimizer state and gradients, not parameters
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.unwrap(model).parameters()), modifier_rank=None)


def make_strategy(name: str, zero_stage: int = 2, grad_clip: float = 1.0) -> SingleDevice:
    if name == "single":
        return SingleDevice()
    if name == "deepspeed":
        return DeepSpeed(zero_stage=zero_stage, grad_clip=grad_clip)
    raise ValueError(f"train.strategy must be 'single' or 'deepspeed', got {name!r}")
