"""Attention dispatch: the SDPA path against a naive softmax reference; packing, GQA, KV-cache alignment."""

from __future__ import annotations

import pytest
import torch

from glmwb.kernels.attention import (
    attention,
    attention_backend,
    attention_ref,
    cu_seqlens_from_doc_ids,
    flash_attn_available,
)
from tests.kernels.checks import DEVICE, ON_GPU, assert_fp32_close, assert_low_precision_close, gpu

B, T, D = 2, 13, 16  # odd sequence length


def make_qkv(n_q=6, n_kv=2, t=T, s=None, dtype=torch.float32, seed=0, batch=B, head_dim=D):
    gen = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    q = torch.randn(batch, t, n_q, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, s, n_kv, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, s, n_kv, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v


def run(fn, q, k, v, dtype=None, **kwargs):
    """(out, dq, dk, dv) under a fixed upstream gradient."""
    q, k, v = (t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device, out.dtype)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("n_q, n_kv", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa3", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sdpa_matches_naive_softmax(n_q, n_kv, causal):
    q, k, v = make_qkv(n_q, n_kv)
    got = run(attention, q, k, v, causal=causal, scale=0.3)
    want = run(attention_ref, q, k, v, causal=causal, scale=0.3)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert_fp32_close(name, g, w)
    assert got[0].shape == (B, T, n_q, D)


def test_packed_documents_equal_separate_documents():
    q, k, v = make_qkv(seed=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [3] * 2 + [4] * 7 + [5] * 4], device=DEVICE)
    packed = attention(q, k, v, doc_ids=doc_ids)
    for b in range(B):
        for doc in doc_ids[b].unique():
            cols = (doc_ids[b] == doc).nonzero().flatten()
            alone = attention(q[b : b + 1, cols], k[b : b + 1, cols], v[b : b + 1, cols])
            assert_fp32_close(f"row {b} doc {doc}", packed[b : b + 1, cols], alone)
    want = run(attention_ref, q, k, v, doc_ids=doc_ids)
    for name, g, w in zip(NAMES, run(attention, q, k, v, doc_ids=doc_ids), want, strict=True):
        assert_fp32_close(name, g, w)


def test_cu_seqlens_from_doc_ids_and_varlen_form():
    q, k, v = make_qkv(seed=2)
    doc_ids = torch.tensor([[0] * 4 + [1] * 9, [1] * 13], device=DEVICE)  # equal ids in two rows: two docs
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    assert cu_seqlens.tolist() == [0, 4, 13, 26] and cu_seqlens.dtype == torch.int32 and max_seqlen == 13
    by_cu = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    assert_fp32_close("out", by_cu, attention(q, k, v, doc_ids=doc_ids))
    # a document that crosses the row boundary of the flattened (B * T) tokens, as flash-attn's varlen allows
    crossing = torch.tensor([0, 20, 26], device=DEVICE, dtype=torch.int32)
    out = attention(q, k, v, cu_seqlens=crossing)
    flat = [t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v)]
    want = torch.cat([attention_ref(*(t[:, a:b] for t in flat)) for a, b in ((0, 20), (20, 26))], dim=1)
    assert_fp32_close("crossing", out, want.view(out.shape))


def test_kv_cache_queries_are_bottom_right_aligned():
    q, k, v = make_qkv(t=3, s=T, seed=3)
    full_q, _, _ = make_qkv(t=T, seed=3)
    full_q[:, -3:] = q
    last = attention(full_q, k, v)[:, -3:]
    assert_fp32_close("decode", attention(q, k, v), last)
    assert_fp32_close("decode-ref", attention(q, k, v), attention_ref(q, k, v))


def test_padding_mask_and_float_mask():
    q, k, v = make_qkv(seed=4)
    keep = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    keep[0, :3] = False  # left padding in row 0
    mask = keep[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=DEVICE)  # every query sees itself
    got = run(attention, q, k, v, attn_mask=mask)
    want = run(attention_ref, q, k, v, attn_mask=mask)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert_fp32_close(name, g, w)
    additive = torch.zeros(B, 1, T, T, device=DEVICE).masked_fill(~mask, float("-inf"))
    assert_fp32_close("additive", attention(q, k, v, attn_mask=additive), got[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_twice_plain_pytorch_error(dtype):
    q, k, v = make_qkv(dtype=dtype, seed=5)
    doc_ids = torch.tensor([[0] * 6 + [1] * 7] * B, device=DEVICE)
    kernel = run(attention, q, k, v, doc_ids=doc_ids)
    plain = run(_plain_attention, q, k, v, doc_ids=doc_ids)
    reference = run(attention_ref, q, k, v, torch.float32, doc_ids=doc_ids)
    for name, kk, p, r in zip(NAMES, kernel, plain, reference, strict=True):
        assert_low_precision_close(name, kk, p, r)


def _plain_attention(q, k, v, doc_ids):
    """Textbook attention, every op in the inputs' dtype (softmax included)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(groups, 1),
        v.transpose(1, 2).repeat_interleave(groups, 1),
    )
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def test_backend_on_this_machine():
    q, _, _ = make_qkv()
    assert attention_backend(q) == "sdpa"  # fp32 never goes to flash-attn
    assert attention_backend(q.to(torch.bfloat16), attn_mask=torch.ones(1, dtype=torch.bool)) == "sdpa"
    if not ON_GPU:
        assert attention_backend() == "sdpa"
        assert attention_backend(q.to(torch.bfloat16)) == "sdpa"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_heads=4), "multiple of key/value heads"),
        (dict(doc_ids=torch.zeros(B, T + 1, dtype=torch.long)), "doc_ids must be"),
        (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens must run from 0"),
        (dict(dropout_p=1.0), "dropout_p"),
    ],
    ids=["heads", "doc-ids", "cu-seqlens", "dropout"],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    q, k, v = make_qkv(6, kwargs.pop("k_heads", 2))
    kwargs = {key: (val.to(DEVICE) if torch.is_tensor(val) else val) for key, val in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **kwargs)


@gpu
@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed")
def test_flash_attn_path_matches_sdpa_on_gpu():
    q, k, v = make_qkv(32, 2, t=1024, dtype=torch.bfloat16, seed=6, head_dim=128)
    assert attention_backend(q) == "flash_attn"
    doc_ids = torch.zeros(B, 1024, dtype=torch.long, device=DEVICE)
    doc_ids[:, 300:] = 1
    doc_ids[1, 700:] = 2
    for kwargs in (dict(), dict(doc_ids=doc_ids)):
        flash = run(attention, q, k, v, **kwargs)
        plain = run(
            attention, q, k, v, attn_mask=torch.ones(1, 1, 1, 1024, dtype=torch.bool, device=DEVICE), **kwargs
        )
        reference = run(attention_ref, q, k, v, torch.float32, **kwargs)
        for name, f, p, r in zip(NAMES, flash, plain, reference, strict=True):
            assert_low_precision_close(name, f, p, r)
