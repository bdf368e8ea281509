"""``KernelConfig``: which implementation each op uses, as a recipe's ``kernels:`` section names it.

Our GLM reads it when it is built (``GLM(config, kernels=KernelConfig(...))``, pretrain/model.py);
``apply_kernels`` (apply.py) reads it for ``transformers``' Glm / Glm4 models. This file imports no Triton,
so the model can import it on a machine without Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

KERNEL_CHOICES: dict[str, tuple[str, ...]] = {
    "rmsnorm": ("triton", "torch"),
    "swiglu": ("triton", "torch"),
    "rotary": ("triton", "torch"),
    "fused_ce": ("triton", "torch"),
    "attention": ("auto", "sdpa", "flash_attn", "torch"),  # auto: flash-attn where it can run, else SDPA
}


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation each op uses; "torch" is the model's own PyTorch code.

    The defaults (every kernel on, attention ``auto``) are what a ``kernels:`` section means for the keys it
    leaves out; ``KernelConfig.all_torch()`` is the plain PyTorch model."""

    rmsnorm: str = "triton"
    swiglu: str = "triton"
    rotary: str = "triton"
    fused_ce: str = "triton"
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in KERNEL_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"KernelConfig: {name} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> KernelConfig:
        """Strict: unknown keys are an error naming the allowed ones; booleans mean our kernel / torch."""
        section = dict(section or {})
        unknown = sorted(set(section) - set(KERNEL_CHOICES))
        if unknown:
            raise ValueError(f"KernelConfig: unknown key(s) {unknown}; allowed: {sorted(KERNEL_CHOICES)}")
        return cls(**{name: kernel_choice(name, value) for name, value in section.items()})

    @classmethod
    def all_torch(cls) -> KernelConfig:
        return cls(**{name: "torch" for name in KERNEL_CHOICES})

    def uses_triton(self) -> bool:
        return "triton" in (self.rmsnorm, self.swiglu, self.rotary, self.fused_ce)


def kernel_choice(name: str, value: Any) -> str:
    """A choice as written in a config: True = our kernel (the first allowed choice), False = torch."""
    if value is True:
        return KERNEL_CHOICES[name][0]
    if value is False:
        return "torch"
    return value


def check_triton_can_run(who: str) -> None:
    """Raise unless the Triton kernels can run here: a CUDA GPU, or the interpreter (``TRITON_INTERPRET=1``
    set before triton is first imported)."""
    from glmwb.kernels._common import is_interpreted
    from glmwb.kernels.rmsnorm import _rmsnorm_fwd_kernel

    if not torch.cuda.is_available() and not is_interpreted(_rmsnorm_fwd_kernel):
        raise ValueError(
            f"{who}: the Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 before triton is "
            "first imported, or choose 'torch' for rmsnorm / swiglu / rotary / fused_ce"
        )
