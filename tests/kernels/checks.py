"""What the kernel tests share: the device they run on and the house tolerance rules (STYLE.md, "Kernels")."""

from __future__ import annotations

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# On a CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors.
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def gpu(test):
    """GLM-4-9B-sized checks: CUDA only (deselected by default with -m "not gpu", skipped without CUDA)."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")(test))


# fp32: tight allclose.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def assert_low_precision_close(
    name: str, kernel: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor
) -> None:
    """Kernel error vs the fp32 reference <= 2 x plain PyTorch's error (same dtype) + 1e-6, max abs."""
    assert kernel.dtype == plain.dtype, f"{name}: kernel dtype {kernel.dtype} != plain dtype {plain.dtype}"
    assert kernel.shape == reference.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(reference.shape)}"
    kernel_err = max_abs_err(kernel, reference)
    plain_err = max_abs_err(plain, reference)
    assert kernel_err <= 2 * plain_err + 1e-6, (
        f"{name}: kernel error {kernel_err:.3g} > 2 x plain {plain.dtype} error {plain_err:.3g} + 1e-6"
    )


def assert_fp32_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, **FP32_TOL, msg=lambda m: f"{name}: {m}")
