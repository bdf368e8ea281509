"""Selective log-probs (from logits, and chunked from hidden states) against full fp32 log_softmax."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from glmwb.kernels.logprobs import (  # noqa: E402
    SelectiveLogprobs,
    linear_selective_logprobs,
    linear_selective_logprobs_ref,
    selective_logprobs,
    selective_logprobs_ref,
)
from tests.kernels.checks import (  # noqa: E402
    DEVICE,
    assert_fp32_close,
    assert_low_precision_close,
    gpu,
)

N, V, D = 37, 1031, 48
LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_labels(shape, v=V, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, v, shape, generator=gen)
    labels.view(-1)[::4] = -100  # prompt / padding positions
    return labels.to(DEVICE)


def make_upstream(shape, seed=0):
    gen = torch.Generator().manual_seed(seed + 200)
    return torch.randn(shape, generator=gen).to(DEVICE), torch.randn(shape, generator=gen).to(DEVICE)


def plain_logprobs(logits, labels, temperature=1.0, return_entropy=False, ignore_index=-100):
    """TRL-style selective log-softmax, every op in the logits' dtype."""
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    logp = logprobs.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return (logp, entropy) if return_entropy else logp


def run_logits(fn, logits, labels, temperature, dtype=None, use_entropy=True, seed=0):
    """(logp, entropy, d logits) under random upstream gradients for both outputs."""
    logits = logits.detach().clone().to(dtype or logits.dtype).requires_grad_()
    logp, entropy = fn(logits, labels, temperature, True)
    a, c = make_upstream(logp.shape, seed)
    loss = (logp.float() * a).sum() + ((entropy.float() * c).sum() if use_entropy else 0)
    loss.backward()
    return logp.detach().float(), entropy.detach().float(), logits.grad


def run_linear(fn, hidden, weight, bias, labels, temperature, dtype=None, seed=0, **kwargs):
    """(logp, entropy, d hidden, d weight, d bias)."""
    hidden, weight, bias = (
        t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in (hidden, weight, bias)
    )
    logp, entropy = fn(hidden, weight, labels, temperature, True, bias=bias, **kwargs)
    a, c = make_upstream(logp.shape, seed)
    ((logp.float() * a).sum() + (entropy.float() * c).sum()).backward()
    return logp.detach().float(), entropy.detach().float(), hidden.grad, weight.grad, bias.grad


def linear_inputs(dtype=torch.float32, seed=0, shape=(N,)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=gen) / D**0.5 * 2).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(V, generator=gen)).to(DEVICE, dtype)
    return hidden, weight, bias, make_labels(shape, seed=seed)


def logits_inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, V, generator=gen)).to(DEVICE, dtype), make_labels(shape, seed=seed)


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T=1", "T=0.7"])
@pytest.mark.parametrize("shape", [(N,), (3, 11)], ids=str)
def test_logits_fp32_matches_reference(shape, temperature):
    logits, labels = logits_inputs(shape, seed=1)
    got = run_logits(selective_logprobs, logits, labels, temperature)
    want = run_logits(selective_logprobs_ref, logits, labels, temperature)
    for name, g, w in zip(("logp", "entropy", "d_logits"), got, want, strict=True):
        assert_fp32_close(name, g, w)
    assert got[0].shape == shape and not got[0][labels == -100].any() and not got[2][labels == -100].any()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_logits_low_precision_within_twice_plain_pytorch_error(dtype):
    logits, labels = logits_inputs((N,), dtype, seed=2)
    kernel = run_logits(selective_logprobs, logits, labels, 0.8)
    plain = run_logits(plain_logprobs, logits, labels, 0.8)
    reference = run_logits(selective_logprobs_ref, logits, labels, 0.8, torch.float32)
    for name, k, p, r in zip(("logp", "entropy", "d_logits"), kernel, plain, reference, strict=True):
        assert_low_precision_close(name, k, p, r)


def test_entropy_only_or_logp_only_gradients():
    logits, labels = logits_inputs((N,), seed=3)
    for use in ("logp", "entropy"):
        x = logits.clone().requires_grad_()
        x_ref = logits.clone().requires_grad_()
        out, out_ref = (
            selective_logprobs(x, labels, 1.3, True),
            selective_logprobs_ref(x_ref, labels, 1.3, True),
        )
        index = 0 if use == "logp" else 1
        out[index].sum().backward()
        out_ref[index].sum().backward()
        assert_fp32_close(f"d_logits from {use}", x.grad, x_ref.grad)
    x = logits.clone().requires_grad_()
    logp = selective_logprobs(x, labels)  # no entropy asked for
    logp.sum().backward()
    x_ref = logits.clone().requires_grad_()
    selective_logprobs_ref(x_ref, labels).sum().backward()
    assert_fp32_close("d_logits", x.grad, x_ref.grad)


@pytest.mark.parametrize(
    "chunk_size, temperature, shape", [(8, 1.0, (N,)), (None, 0.6, (3, 11))], ids=["chunk8", "default-chunk"]
)
def test_linear_fp32_matches_reference(chunk_size, temperature, shape):
    hidden, weight, bias, labels = linear_inputs(seed=4, shape=shape)
    got = run_linear(
        linear_selective_logprobs, hidden, weight, bias, labels, temperature, chunk_size=chunk_size
    )
    want = run_linear(linear_selective_logprobs_ref, hidden, weight, bias, labels, temperature)
    for name, g, w in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        assert_fp32_close(name, g, w)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_linear_low_precision_within_twice_plain_pytorch_error(dtype):
    hidden, weight, bias, labels = linear_inputs(dtype, seed=5)

    def plain(hidden, weight, labels, temperature, return_entropy, bias):
        return plain_logprobs(
            torch.nn.functional.linear(hidden, weight, bias), labels, temperature, return_entropy
        )

    kernel = run_linear(linear_selective_logprobs, hidden, weight, bias, labels, 0.9, chunk_size=16)
    plain_out = run_linear(plain, hidden, weight, bias, labels, 0.9)
    reference = run_linear(linear_selective_logprobs_ref, hidden, weight, bias, labels, 0.9, torch.float32)
    names = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")
    for name, k, p, r in zip(names, kernel, plain_out, reference, strict=True):
        assert_low_precision_close(name, k, p, r)


def test_linear_no_grad_and_module_forms():
    hidden, weight, bias, labels = linear_inputs(seed=6)
    with torch.no_grad():
        logp = linear_selective_logprobs(hidden, weight, labels, 0.7, bias=bias, chunk_size=16)
    assert_fp32_close("logp", logp, linear_selective_logprobs_ref(hidden, weight, labels, 0.7, bias=bias))
    module = SelectiveLogprobs(temperature=0.7, return_entropy=True)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    from_logits = module(logits, labels)
    from_hidden = module(hidden, labels, weight=weight, bias=bias)
    for a, b in zip(from_logits, from_hidden, strict=True):
        assert_fp32_close("module", a, b)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _labels(*shape):
    return torch.randint(0, V, shape, device=DEVICE)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: selective_logprobs(_t(5, V), _labels(6)), "labels shape"),
        (lambda: selective_logprobs(_t(5, V), _labels(5) + V), "labels must be in"),
        (lambda: selective_logprobs(_t(5, V), _labels(5), temperature=0.0), "temperature must be > 0"),
        (lambda: selective_logprobs(_t(5, V).long(), _labels(5)), "logits must be float32"),
        (lambda: linear_selective_logprobs(_t(5, D), _t(V, D + 1), _labels(5)), "weight must be \\(V, D\\)"),
        (lambda: linear_selective_logprobs(_t(5, D), _t(V, D), _labels(4)), "labels shape"),
        (lambda: linear_selective_logprobs(_t(5, D), _t(V, D), _labels(5), bias=_t(3)), "bias must be"),
    ],
    ids=["labels-shape", "label-range", "temperature", "int-logits", "weight-shape", "linear-labels", "bias"],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@gpu
def test_glm4_9b_logprobs_on_gpu_without_full_logits():
    weight = (torch.randn(151552, 4096, device=DEVICE) / 64).to(torch.bfloat16)
    hidden = torch.randn(4, 1024, 4096, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 151552, (4, 1024), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        logp = linear_selective_logprobs(hidden, weight, labels, 0.9)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4096 * 151552 * 2 / 2, f"peak {peak / 2**30:.2f} GiB: no (N, V) logits"
    want = linear_selective_logprobs_ref(hidden[:1], weight, labels[:1], 0.9)
    torch.testing.assert_close(logp[:1], want, atol=2e-2, rtol=0)
