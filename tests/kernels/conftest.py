"""Kernel tests run the Triton kernels themselves: on a GPU when there is one, else on the CPU under the
Triton interpreter.

``TRITON_INTERPRET`` is read when Triton's own jitted helpers (``tl.sigmoid``, ...) and our kernels are
defined, i.e. when ``triton`` is first imported, so it is set here, before pytest imports this folder's
test modules. Anything that imports Triton earlier in the session (``transformers``' model files and
``torch._dynamo`` do) is too early: then every kernel test fails with the message below, and the fix is to
set ``TRITON_INTERPRET=1`` earlier (in the environment, or at the top of ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _triton_interprets() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sigmoid, InterpretedFunction)


TRITON_IMPORTED_TOO_EARLY = HAS_TRITON and not ON_GPU and not _triton_interprets()


@pytest.fixture(autouse=True)
def _triton_runs_here():
    if TRITON_IMPORTED_TOO_EARLY:
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so its kernels "
            "cannot run on this CPU; set TRITON_INTERPRET=1 in the environment or at the top of "
            "tests/conftest.py",
            pytrace=False,
        )


def _fp32_to_bf16_bits_rne(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (what the GPU's cvt.rn.bf16.f32 does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) & 0x8000).astype(np.uint16) | np.uint16(0x7FC0)
    return np.where(np.isnan(values), quiet_nan, rounded).reshape(np.shape(values))


@pytest.fixture(autouse=True)
def bf16_round_to_nearest(monkeypatch):
    """Make the interpreter round fp32 -> bf16 to nearest even, as a GPU does.

    Triton 3.9's interpreter converts fp32 to bf16 by truncating the mantissa (round toward zero), so a
    bf16 kernel there is up to twice as far from the fp32 reference as the same kernel on a GPU, and the
    low-precision tolerance rule (kernel error <= 2 x plain PyTorch error) would measure the interpreter,
    not the kernel. Only that one conversion changes; ``test_interpreter_bf16_rounds_like_torch`` checks it.
    """
    if ON_GPU:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            return _fp32_to_bf16_bits_rne(data)
        return original(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert_float)
    yield


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Counts of each Triton launcher called, to prove the kernels (not the torch code) ran."""
    import glmwb.kernels.fused_linear_ce
    import glmwb.kernels.rmsnorm
    import glmwb.kernels.rotary
    import glmwb.kernels.swiglu

    counts = {"rmsnorm": 0, "swiglu": 0, "rotary": 0, "fused_ce": 0, "rmsnorm_add": 0}
    for key, module, name in [
        ("rmsnorm", glmwb.kernels.rmsnorm, "_rmsnorm_fwd"),
        ("swiglu", glmwb.kernels.swiglu, "_swiglu_fwd"),
        ("rotary", glmwb.kernels.rotary, "_rotary_fwd"),
        ("rotary", glmwb.kernels.rotary, "_rotary_inplace"),  # our GLM's path: in place on the fused qkv
        ("fused_ce", glmwb.kernels.fused_linear_ce, "_fused_linear_ce_fwd"),
    ]:
        original = getattr(module, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            if _key == "rmsnorm" and len(args) > 3 and args[3] is not None:  # (x, weight, eps, residual)
                counts["rmsnorm_add"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts
