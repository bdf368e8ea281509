"""Checks and launch heuristics shared by the kernel files (no kernels here).

Every host launcher validates its inputs with these helpers so that a bad call fails with a
``ValueError`` naming the op and the problem, not with a Triton compile error or a segfault.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel: object) -> bool:
    """True if ``kernel`` was built by ``TRITON_INTERPRET=1`` (runs on the CPU through numpy).

    ``triton.jit`` decides this once, when the kernel's module is imported, so the kernel object
    (not today's environment) is what tells how a launch will run.
    """
    return isinstance(kernel, InterpretedFunction)


def check_dtype(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_device(op: str, kernel: object, **tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device CUDA unless the kernel runs in the interpreter."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    (device,) = devices
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors, got tensors on {device}. On a CPU, set "
            f"TRITON_INTERPRET=1 before the kernels are first imported, or use {op}_ref."
        )


def num_warps_for(block_elems: int) -> int:
    """Warps for a program that holds ``block_elems`` elements per tensor in registers.

    About 8-16 elements per thread: enough for 16-byte vector loads of bf16, few enough that the
    fp32 copies stay in registers (the same steps Liger-Kernel and Unsloth use on A100 / H100).
    """
    if block_elems >= 32768:
        return 32
    if block_elems >= 8192:
        return 16
    if block_elems >= 2048:
        return 8
    return 4


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_persistent_programs(device: torch.device, per_sm: int = 2) -> int:
    """Programs for a persistent (grid-stride) kernel: ``per_sm`` per SM on a GPU; 4 in the interpreter, so
    that small test inputs still exercise several programs that each loop over several blocks."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return per_sm * _cuda_sm_count(index)
    return 4


next_power_of_2 = triton.next_power_of_2
cdiv = triton.cdiv
