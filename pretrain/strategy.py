"""The one place a trainer meets a distributed engine (OpenRLHF's idea): setup, prepare, backward, step,
all-reduce, gathered parameters, generation and save. ``SingleDevice`` is plain PyTorch; ``DeepSpeed`` wraps
ZeRO stages 1-3 (``deepspeed`` is imported only when chosen). The reward trainer, PPO and pretraining call
these methods and never ``deepspeed`` itself.

Two ways to accumulate gradients, both supported by each strategy:
- the trainer accumulates: ``prepare(model, optimizer)`` (the engine is told one accumulation step), then
  ``backward`` per micro-batch and one ``step`` per optimizer step (the reward trainer, pretraining);
- the engine counts: ``prepare(model, optimizer, grad_accum=k)``, then ``backward`` and
  ``micro_step(..., boundary)`` after every micro-batch; the optimizer steps at the boundary (PPO, which may
  train two models, actor and critic, each its own engine).

Gradients over ranks: ``backward(loss)`` gives the mean over ranks of each rank's gradient of ``loss`` (what
DeepSpeed does). A trainer whose per-rank loss is its share of one global mean (the reward trainer) passes
``loss * world_size`` to get the gradient of that global mean.

Generation under ZeRO-3: the parameters are partitioned over ranks, and each rank samples a different number
of tokens, so per-layer gathers inside the sampling loop would deadlock or crawl. ``generation_context``
gathers every parameter once (``deepspeed.zero.GatheredParameters``), takes ZeRO-3's fetch / release hooks
off for the duration (the module then runs as a plain one), and puts them back (with the prefetch trace
invalidated) before training resumes.

Two ranks on one CPU (tests/rewards/test_distributed.py checks 2 ranks = 1 rank with 2 accumulation steps;
tests/align/test_ppo_trainer.py runs PPO under ZeRO-2 and ZeRO-3):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m glmwb.recipes.cli run recipes/reward.yaml train.strategy=deepspeed
Resuming a DeepSpeed run from a checkpoint is not supported yet (the trainers refuse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class SingleDevice:
    """One process, one device: backward is ``loss.backward()``, a step clips then steps."""

    world_size = 1
    rank = 0
    is_main = True
    zero_stage = 0

    def setup(self) -> None:
        pass

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1
    ) -> tuple[nn.Module, Any]:
        """The model and optimizer the trainer then uses (an engine under DeepSpeed); ``grad_accum``: the
        micro-batches per optimizer step when the trainer calls ``micro_step``."""
        return model, optimizer

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer: Any, grad_clip: float) -> float:
        """Clip the gradients of ``model``'s trainable parameters to ``grad_clip`` (0: no clipping), step and
        zero them; returns the norm before clipping (nan without clipping)."""
        params = [
            p for p in model.parameters() if p.requires_grad
        ]  # the model's order: the norm is a float sum
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def micro_step(self, model: nn.Module, optimizer: Any, boundary: bool, grad_clip: float) -> float | None:
        """Called after every micro-batch's backward; steps (and returns the grad norm) at the boundary."""
        return self.step(model, optimizer, grad_clip) if boundary else None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over ranks."""
        return x

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def gathered(self, model: nn.Module):
        """A context in which every parameter is whole on this rank (for saving); collective under ZeRO-3:
        every rank enters it."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def generation_context(self, model: nn.Module) -> Iterator[nn.Module]:
        """The plain module to sample from, with whole parameters."""
        yield self.unwrap(model)


class DeepSpeed(SingleDevice):
    """ZeRO stage 1-3 through ``deepspeed.initialize``, one engine per ``prepare``; the engine is told the
    accumulation steps the trainer asks for, and the trainer's own loss normalisation stands
    (``scale_wrt_gas=False``).

    On a CPU: ``DS_ACCELERATOR=cpu`` and the gloo backend, bf16 off; the optimizer is the trainer's torch
    AdamW (param groups, weight decay, per-parameter learning rates) handed to the engine as is.
    """

    def __init__(
        self, zero_stage: int = 2, grad_clip: float = 1.0, bf16: bool | None = None, offload: bool = False
    ) -> None:
        self.zero_stage = zero_stage
        self.grad_clip = grad_clip
        self.bf16 = torch.cuda.is_available() if bf16 is None else bf16
        self.offload = (
            offload  # ZeRO-Offload: optimizer states (and under ZeRO-3 the parameters) in CPU memory
        )

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1
    ) -> tuple[nn.Module, Any]:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,  # informational: the trainer makes its own micro-batches
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": self.zero_config(),
            "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
            "zero_force_ds_cpu_optimizer": False,  # ... kept under offload too (DeepSpeedCPUAdam is faster)
            "bf16": {"enabled": self.bf16},
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, optimizer

    def zero_config(self) -> dict[str, Any]:
        """The ``zero_optimization`` section: the stage, and with ``offload`` the optimizer states (and under
        ZeRO-3 the parameters) in pinned CPU memory."""
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            if self.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        return zero

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the trainer already normalised the loss

    def step(self, model: nn.Module, optimizer: Any, grad_clip: float) -> float:
        return self.micro_step(model, optimizer, True, grad_clip)

    def micro_step(self, model: nn.Module, optimizer: Any, boundary: bool, grad_clip: float) -> float | None:
        # the engine clips (gradient_clipping), steps and zeroes the gradients at its accumulation boundary
        model.step()
        if not boundary:
            return None
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.to("cuda") if torch.cuda.is_available() else x.clone()  # nccl reduces CUDA tensors only
        dist.all_reduce(y)
        return y.to(x.device)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gathered(self, model: nn.Module):
        if self.zero_stage < 3:  # stages 1-2 partition optimizer state and gradients, not parameters
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.unwrap(model).parameters()), modifier_rank=None)

    @contextlib.contextmanager
    def generation_context(self, model: nn.Module) -> Iterator[nn.Module]:
        if self.zero_stage < 3:
            yield self.unwrap(model)
            return
        offload = _zero3_offload(model)
        with self.gathered(model):
            if offload is not None:
                for p in self.unwrap(model).parameters():
                    p.ds_active_sub_modules.clear()
                for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield self.unwrap(model)
            finally:
                if offload is not None:
                    coordinator = getattr(offload, "param_coordinator", None)
                    if coordinator is not None and not coordinator.is_invalid_trace():
                        coordinator._invalidate_trace()
                    offload._register_deepspeed_module(offload.module)


def _zero3_offload(engine: nn.Module) -> Any:
    """The object holding ZeRO-3's module hooks (the optimizer's ``parameter_offload``), if any."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", None)


def make_strategy(
    name: str, zero_stage: int = 2, grad_clip: float = 1.0, offload: bool = False
) -> SingleDevice:
    if name == "single":
        return SingleDevice()
    if name == "deepspeed":
        return DeepSpeed(zero_stage=zero_stage, grad_clip=grad_clip, offload=offload)
    raise ValueError(f"train.strategy must be 'single' or 'deepspeed', got {name!r}")
