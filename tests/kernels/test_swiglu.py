"""SwiGLU kernel on the fused gate-first layout, against its fp32 reference and GlmMLP's activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import glmwb.kernels._common  # noqa: E402
from glmwb.kernels.swiglu import TritonSwiGLU, swiglu, swiglu_ref  # noqa: E402
from tests.kernels.checks import (  # noqa: E402
    DEVICE,
    assert_fp32_close,
    assert_low_precision_close,
    gpu,
)

# (..., 2I): I = 48, 40 and 1,100 (two column blocks, the second one masked).
SHAPES = [(7, 96), (2, 13, 80), (3, 5, 2200)]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def plain_swiglu(gate_up):
    """transformers' GlmMLP activation, op for op, in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def make_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(DEVICE, dtype)
    return gate_up, dout


def run(fn, gate_up, dout, dtype=None):
    """(out, d gate_up) of fn under the upstream gradient dout, in ``dtype`` (default: gate_up's)."""
    gate_up = gate_up.detach().clone().to(dtype or gate_up.dtype).requires_grad_()
    out = fn(gate_up)
    out.backward(dout.to(out.dtype))
    return out.detach(), gate_up.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_fp32_matches_reference(shape):
    gate_up, dout = make_inputs(shape, torch.float32)
    for name, got, want in zip(
        ("out", "dgate_up"), run(swiglu, gate_up, dout), run(swiglu_ref, gate_up, dout), strict=True
    ):
        assert_fp32_close(name, got, want)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_low_precision_within_twice_plain_pytorch_error(shape, dtype):
    gate_up, dout = make_inputs(shape, dtype, seed=1)
    kernel = run(swiglu, gate_up, dout)
    plain = run(plain_swiglu, gate_up, dout)
    reference = run(swiglu_ref, gate_up, dout, dtype=torch.float32)
    for name, k, p, r in zip(("out", "dgate_up"), kernel, plain, reference, strict=True):
        assert_low_precision_close(name, k, p, r)


def test_reference_is_glm_mlp_activation_gate_first():
    gate_up, _ = make_inputs((7, 96), torch.float32)
    assert torch.equal(swiglu_ref(gate_up), plain_swiglu(gate_up))
    # Gate first: with up = 1 the output is silu(first half); a swapped layout would give silu(1) * gate.
    gate = torch.randn(7, 48, device=DEVICE)
    out = swiglu(torch.cat([gate, torch.ones_like(gate)], dim=-1))
    assert_fp32_close("silu(gate)", out, F.silu(gate))


def test_strided_rows_need_no_copy():
    gate_up, dout = make_inputs((7, 96 + 16), torch.float32, seed=2)
    view = gate_up[:, :96]  # row stride 112, last dim contiguous
    dout = dout[:, :48]
    for name, got, want in zip(
        ("out", "dgate_up"), run(swiglu, view, dout), run(swiglu_ref, view, dout), strict=True
    ):
        assert_fp32_close(name, got, want)


def test_module_and_empty_batch():
    gate_up, _ = make_inputs((2, 3, 80), torch.float32)
    assert_fp32_close("out", TritonSwiGLU()(gate_up), swiglu_ref(gate_up))
    empty = torch.zeros(0, 80, device=DEVICE, requires_grad=True)
    swiglu(empty).sum().backward()
    assert empty.grad.shape == (0, 80)


@pytest.mark.parametrize(
    "gate_up, message",
    [
        (torch.randn(7, 95), "must be even"),
        (torch.randn(7, 96).to(torch.int32), "must be float32, float16 or bfloat16"),
        (torch.randn(7, 96).double(), "must be float32, float16 or bfloat16"),
        (torch.tensor(1.0), "at least one dim"),
    ],
    ids=["odd-width", "int", "double", "scalar"],
)
def test_bad_inputs_raise_clear_errors(gate_up, message):
    with pytest.raises(ValueError, match=message):
        swiglu(gate_up.to(DEVICE))


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setattr(glmwb.kernels._common, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        swiglu(torch.randn(7, 96))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_glm4_9b_shapes_on_gpu(dtype):
    gate_up, dout = make_inputs((2, 1024, 2 * 13696), dtype, seed=3)  # intermediate 13,696
    kernel = run(swiglu, gate_up, dout)
    reference = run(swiglu_ref, gate_up, dout, dtype=torch.float32)
    if dtype == torch.float32:
        for name, k, r in zip(("out", "dgate_up"), kernel, reference, strict=True):
            assert_fp32_close(name, k, r)
    else:
        for name, k, p, r in zip(
            ("out", "dgate_up"), kernel, run(plain_swiglu, gate_up, dout), reference, strict=True
        ):
            assert_low_precision_close(name, k, p, r)
