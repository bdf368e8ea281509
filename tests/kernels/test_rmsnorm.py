"""RMSNorm and fused residual-add + RMSNorm kernels against their fp32 references and GlmRMSNorm."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import glmwb.kernels._common  # noqa: E402
from glmwb.kernels.rmsnorm import (  # noqa: E402
    GLM_RMS_NORM_EPS,
    TritonRMSNorm,
    rmsnorm,
    rmsnorm_add,
    rmsnorm_add_ref,
    rmsnorm_ref,
)
from tests.kernels.checks import (  # noqa: E402
    DEVICE,
    assert_fp32_close,
    assert_low_precision_close,
    gpu,
)

# Odd, non-power-of-two sizes; (200, 48) makes each backward program loop over several row blocks.
SHAPES = [(7, 48), (2, 13, 80), (37, 72), (200, 48)]
LOW_PRECISION = [torch.float16, torch.bfloat16]
EPS = GLM_RMS_NORM_EPS


def make_inputs(shape, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    residual = torch.randn(shape, generator=gen).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    dres = torch.randn(shape, generator=gen).to(device, dtype)
    return x, weight, residual, dy, dres


def leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_()


def run_norm(fn, x, weight, dy, dtype=None):
    """(y, dx, dweight) of fn(x, weight, eps) under the upstream gradient dy, in ``dtype`` (default: x's)."""
    x, weight = leaf(x, dtype), leaf(weight, dtype)
    y = fn(x, weight, EPS)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, weight.grad


def run_norm_add(fn, x, residual, weight, dy, dres, dtype=None):
    """(y, new_residual, dx, dresidual, dweight); the loss uses both outputs."""
    x, residual, weight = leaf(x, dtype), leaf(residual, dtype), leaf(weight, dtype)
    y, new_residual = fn(x, residual, weight, EPS)
    torch.autograd.backward((y, new_residual), (dy.to(y.dtype), dres.to(new_residual.dtype)))
    return y.detach(), new_residual.detach(), x.grad, residual.grad, weight.grad


NORM_NAMES = ("y", "dx", "dweight")
NORM_ADD_NAMES = ("y", "new_residual", "dx", "dresidual", "dweight")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_fp32_matches_reference(shape):
    x, weight, _, dy, _ = make_inputs(shape, torch.float32)
    for name, got, want in zip(
        NORM_NAMES, run_norm(rmsnorm, x, weight, dy), run_norm(rmsnorm_ref, x, weight, dy), strict=True
    ):
        assert_fp32_close(name, got, want)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_add_fp32_matches_reference(shape):
    x, weight, residual, dy, dres = make_inputs(shape, torch.float32, seed=1)
    got = run_norm_add(rmsnorm_add, x, residual, weight, dy, dres)
    want = run_norm_add(rmsnorm_add_ref, x, residual, weight, dy, dres)
    for name, g, w in zip(NORM_ADD_NAMES, got, want, strict=True):
        assert_fp32_close(name, g, w)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(7, 48), (2, 13, 80), (200, 48)], ids=str)
def test_rmsnorm_low_precision_within_twice_plain_pytorch_error(shape, dtype):
    x, weight, _, dy, _ = make_inputs(shape, dtype, seed=2)
    kernel = run_norm(rmsnorm, x, weight, dy)
    plain = run_norm(rmsnorm_ref, x, weight, dy)  # GlmRMSNorm's own ops, in the low-precision dtype
    reference = run_norm(rmsnorm_ref, x, weight, dy, dtype=torch.float32)
    for name, k, p, r in zip(NORM_NAMES, kernel, plain, reference, strict=True):
        assert_low_precision_close(name, k, p, r)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(7, 48), (2, 13, 80)], ids=str)
def test_rmsnorm_add_low_precision_within_twice_plain_pytorch_error(shape, dtype):
    x, weight, residual, dy, dres = make_inputs(shape, dtype, seed=3)
    kernel = run_norm_add(rmsnorm_add, x, residual, weight, dy, dres)
    plain = run_norm_add(rmsnorm_add_ref, x, residual, weight, dy, dres)
    reference = run_norm_add(rmsnorm_add_ref, x, residual, weight, dy, dres, dtype=torch.float32)
    for name, k, p, r in zip(NORM_ADD_NAMES, kernel, plain, reference, strict=True):
        assert_low_precision_close(name, k, p, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_add_equals_add_then_norm_bit_for_bit(dtype):
    # The norm must see the residual stream it returns (rounded to the dtype), as the unfused block does.
    x, weight, residual, _, _ = make_inputs((7, 48), dtype, seed=5)
    y, new_residual = rmsnorm_add(x, residual, weight, EPS)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(y, rmsnorm(x + residual, weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_glm_rmsnorm(dtype):
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    x, weight, _, _, _ = make_inputs((5, 48), dtype)
    hf = GlmRMSNorm(48, eps=EPS).to(DEVICE, dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
        assert torch.equal(rmsnorm_ref(x, weight, EPS), hf(x))


def test_fp32_weight_with_bf16_input_promotes_like_glm_rmsnorm():
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    x, _, _, _, _ = make_inputs((7, 48), torch.bfloat16)
    norm = TritonRMSNorm(48).to(DEVICE)  # fp32 weight
    hf = GlmRMSNorm(48, eps=EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
        hf.weight.copy_(norm.weight)
        y = norm(x)
        expected = hf(x)
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_module_replaces_glm_rmsnorm_and_shares_its_weight():
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    hf = GlmRMSNorm(80, eps=EPS).to(DEVICE)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    norm = TritonRMSNorm.from_module(hf)
    assert norm.weight is hf.weight and norm.eps == EPS
    assert list(TritonRMSNorm(80).state_dict()) == list(hf.state_dict()) == ["weight"]
    fresh = TritonRMSNorm(80).to(DEVICE)
    fresh.load_state_dict(hf.state_dict())
    x = torch.randn(3, 80, device=DEVICE)
    y, new_residual = fresh(x, torch.ones_like(x))
    assert_fp32_close("y", y, hf(x + 1))
    assert_fp32_close("new_residual", new_residual, x + 1)


def test_rmsnorm_add_gradient_when_only_the_residual_stream_is_used():
    x, weight, residual, _, _ = make_inputs((7, 48), torch.float32)
    x, residual, weight = leaf(x), leaf(residual), leaf(weight)
    _, new_residual = rmsnorm_add(x, residual, weight, EPS)
    (new_residual * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert torch.equal(residual.grad, torch.full_like(x, 3.0))
    assert weight.grad is None or not weight.grad.any()


def test_empty_batch():
    x, weight, _, _, _ = make_inputs((0, 48), torch.float32)
    x, weight = leaf(x), leaf(weight)
    y = rmsnorm(x, weight, EPS)
    y.sum().backward()
    assert y.shape == (0, 48) and not weight.grad.any()


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rmsnorm(_rand(7, 48), _rand(40)), "last dim of x"),
        (lambda: rmsnorm(_rand(7, 48), _rand(1, 48)), "weight must be 1-D"),
        (lambda: rmsnorm(_rand(7, 48).to(torch.int32), _rand(48)), "x must be float32, float16 or bfloat16"),
        (lambda: rmsnorm(_rand(7, 48), _rand(48).double()), "weight must be float32, float16 or bfloat16"),
        (lambda: rmsnorm_add(_rand(7, 48), _rand(6, 48), _rand(48)), "residual shape"),
        (lambda: rmsnorm_add(_rand(7, 48), _rand(7, 48).half(), _rand(48)), "residual dtype"),
        (lambda: rmsnorm(_rand(1, 65537), _rand(65537)), "single-pass limit"),
    ],
    ids=[
        "hidden-mismatch",
        "weight-2d",
        "int-x",
        "double-weight",
        "residual-shape",
        "residual-dtype",
        "too-wide",
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setattr(glmwb.kernels._common, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        rmsnorm(torch.randn(7, 48), torch.ones(48))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_glm4_9b_shapes_on_gpu(dtype):
    shape = (2, 1024, 4096)  # hidden 4,096
    x, weight, residual, dy, dres = make_inputs(shape, dtype, seed=4)
    kernel = run_norm_add(rmsnorm_add, x, residual, weight, dy, dres)
    reference = run_norm_add(rmsnorm_add_ref, x, residual, weight, dy, dres, dtype=torch.float32)
    if dtype == torch.float32:
        for name, k, r in zip(NORM_ADD_NAMES, kernel, reference, strict=True):
            torch.testing.assert_close(k, r, atol=1e-4, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    else:
        plain = run_norm_add(rmsnorm_add_ref, x, residual, weight, dy, dres)
        for name, k, p, r in zip(NORM_ADD_NAMES, kernel, plain, reference, strict=True):
            assert_low_precision_close(name, k, p, r)
    plain_norm = run_norm(rmsnorm_ref, x, weight, dy)
    reference_norm = run_norm(rmsnorm_ref, x, weight, dy, dtype=torch.float32)
    for name, k, p, r in zip(
        NORM_NAMES, run_norm(rmsnorm, x, weight, dy), plain_norm, reference_norm, strict=True
    ):
        if dtype == torch.float32:
            torch.testing.assert_close(k, r, atol=1e-4, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_low_precision_close(name, k, p, r)


@pytest.mark.parametrize("fused", [False, True], ids=["rmsnorm", "rmsnorm_add"])
def test_no_rows_give_empty_outputs_and_a_zero_weight_gradient(fused):
    x = torch.randn(0, 48, device=DEVICE, requires_grad=True)
    weight = torch.nn.Parameter(torch.rand(48, device=DEVICE) + 0.5)
    if fused:
        y, new_res = rmsnorm_add(x, torch.randn(0, 48, device=DEVICE), weight)
        (y.sum() + new_res.sum()).backward()
    else:
        y = rmsnorm(x, weight)
        y.sum().backward()
    assert y.shape == (0, 48) and x.grad.shape == (0, 48)
    assert torch.equal(weight.grad, torch.zeros(48, device=DEVICE))
