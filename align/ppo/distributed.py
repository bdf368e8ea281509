"""The PPO trainer's one door to a distributed engine: ``Single`` (plain PyTorch) or ``ZeRO`` (DeepSpeed
stages 1-3, ``deepspeed`` imported only when chosen). The trainer never calls DeepSpeed itself.

Why not ``rewards.strategy.DeepSpeed`` as is: PPO may train two models (actor and a separate critic), each its
own engine, and it accumulates a fixed number of micro-batches per optimizer step; so here every engine is
told its gradient-accumulation steps, and ``backward`` / ``micro_step`` act on the engine they are given.

Gradients: every rank trains on its own rollouts; each loss is the token mean over that rank's minibatch and
the engine averages gradients over ranks (the update of the union of the ranks' minibatches, each weighted
equally).

Generation under ZeRO-3: the parameters are partitioned over ranks, and each rank samples a different number
of tokens, so per-layer gathers inside the sampling loop would deadlock or crawl. ``generation_context``
gathers every parameter of the actor once (``deepspeed.zero.GatheredParameters``), takes ZeRO-3's
fetch / release hooks off for the duration (the module then runs as a plain one), and puts them back (with
the prefetch trace invalidated) before training resumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from glmwb.pretrain.strategy import SingleDevice


class Single(SingleDevice):
    """One process: ``rewards.strategy.SingleDevice`` (backward, all_reduce, unwrap, gathered) plus what PPO
    adds — ``prepare`` with its micro-batch count, ``micro_step`` and ``generation_context``."""

    zero_stage = 0

    def prepare(  # type: ignore[override]
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int
    ) -> tuple[nn.Module, Any]:
        return model, optimizer

    def micro_step(self, model: nn.Module, optimizer: Any, boundary: bool, grad_clip: float) -> float | None:
        """Called after every micro-batch's backward; steps (and returns the grad norm) at the boundary."""
        if not boundary:
            return None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def generation_context(self, model: nn.Module) -> Iterator[nn.Module]:
        yield self.unwrap(model)


class ZeRO(Single):
    """DeepSpeed ZeRO stage 1-3 (CPU: ``DS_ACCELERATOR=cpu`` and gloo, see FIELD_NOTES)."""

    def __init__(self, zero_stage: int = 2, grad_clip: float = 1.0, bf16: bool | None = None) -> None:
        self.zero_stage, self.grad_clip = zero_stage, grad_clip
        self.bf16 = torch.cuda.is_available() if bf16 is None else bf16

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int
    ) -> tuple[nn.Module, Any]:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,  # informational: the trainer makes its own micro-batches
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW
            "bf16": {"enabled": self.bf16},
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, optimizer

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the minibatch's tokens

    def micro_step(self, model: nn.Module, optimizer: Any, boundary: bool, grad_clip: float) -> float | None:
        model.step()  # DeepSpeed steps the optimizer only at its accumulation boundary
        if not boundary:
            return None
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.to("cuda") if torch.cuda.is_available() else x.clone()  # nccl reduces CUDA tensors only
        dist.all_reduce(y)
        return y.to(x.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gathered(self, model: nn.Module):
        if self.zero_stage < 3:
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


def make_strategy(name: str, zero_stage: int = 2, grad_clip: float = 1.0) -> Single:
    if name == "single":
        return Single()
    if name == "deepspeed":
        return ZeRO(zero_stage=zero_stage, grad_clip=grad_clip)
    raise ValueError(f"train.strategy must be 'single' or 'deepspeed', got {name!r}")
