"""Our GLM against ``transformers``' GLM, and its invariants (packing, padding, KV cache, loss, rotary)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.hf import to_hf_config, to_hf_state_dict
from glmwb.pretrain.model import (
    GLM,
    KVCache,
    RMSNorm,
    apply_rotary,
    causal_lm_loss,
    doc_position_ids,
    rotary_cos_sin,
)


def small_config(**changes) -> GLMConfig:
    base = dict(
        vocab_size=1031,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return GLMConfig(**{**base, **changes})


def random_glm(cfg: GLMConfig, seed: int = 0) -> GLM:
    """A GLM whose every weight is random and O(1)-ish (nonzero biases, norm weights off 1), so that a wrong
    layout, a missing bias or a swapped norm shows up in the logits."""
    torch.manual_seed(seed)
    model = GLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


def hf_twin(model: GLM, attn_implementation: str = "sdpa") -> transformers.PreTrainedModel:
    """``GlmForCausalLM`` (``Glm4ForCausalLM`` with post_norms) holding the same weights."""
    hf_cfg = to_hf_config(model.config)
    cls = transformers.Glm4ForCausalLM if model.config.post_norms else transformers.GlmForCausalLM
    hf = cls._from_config(hf_cfg, attn_implementation=attn_implementation)
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf.eval()


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers

PARITY_CASES = [
    # (num_heads, num_kv_heads, head_dim, seq_len, post_norms): GQA ratios 1, 2, 4; head_dim 16 and 64
    (4, 4, 16, 37, False),
    (4, 2, 64, 23, False),
    (8, 2, 16, 37, False),
    (4, 1, 64, 23, True),
    (4, 4, 16, 37, True),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,seq_len,post_norms", PARITY_CASES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_match_transformers(
    num_heads, num_kv_heads, head_dim, seq_len, post_norms, attn_implementation
):
    cfg = small_config(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, post_norms=post_norms
    )
    model = random_glm(cfg)
    hf = hf_twin(model, attn_implementation)
    input_ids = torch.randint(0, cfg.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids).logits
        theirs = hf(input_ids).logits
    assert ours.shape == theirs.shape == (3, seq_len, cfg.vocab_size)
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_matches_transformers():
    model = random_glm(small_config())
    hf = hf_twin(model)
    input_ids = torch.randint(0, 1031, (2, 29), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        ours = model(input_ids, labels=labels).loss
        theirs = hf(input_ids=input_ids, labels=labels).loss
    assert ours.dtype == torch.float32
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_rmsnorm_bf16_matches_transformers_bitwise():
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 3
    ours, theirs = RMSNorm(64, 1e-6).to(torch.bfloat16), GlmRMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        theirs.weight.copy_(ours.weight)
    assert torch.equal(ours(x), theirs(x))


# ----------------------------------------------------------------------------------------------------------
# Rotary: partial and interleaved


def test_rotary_is_interleaved_and_partial_on_a_known_vector():
    # head_dim 8, rotary_dim 4: frequencies theta^(-0/4) = 1 and theta^(-2/4) = 0.01 (theta = 10,000)
    pos = 3.0
    cos, sin = rotary_cos_sin(torch.tensor([[3]]), rotary_dim=4, theta=10_000.0, dtype=torch.float32)
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)  # (B, T, N, hd) = [1, 2, ..., 8]
    out = apply_rotary(x, cos, sin).flatten()
    a, b = pos * 1.0, pos * 0.01
    # GPT-J pairs (x0, x1), (x2, x3) rotate; x4..x7 pass through
    expected = torch.tensor(
        [
            1 * math.cos(a) - 2 * math.sin(a),
            2 * math.cos(a) + 1 * math.sin(a),
            3 * math.cos(b) - 4 * math.sin(b),
            4 * math.cos(b) + 3 * math.sin(b),
            5.0,
            6.0,
            7.0,
            8.0,
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # the NeoX layout (pairs (x0, x2), (x1, x3)) gives a different answer, so this test would catch it
    neox = torch.tensor(
        [
            1 * math.cos(a) - 3 * math.sin(a),
            2 * math.cos(b) - 4 * math.sin(b),
            3 * math.cos(a) + 1 * math.sin(a),
            4 * math.cos(b) + 2 * math.sin(b),
        ]
    )
    assert (out[:4] - neox).abs().max() > 0.1


def test_rotary_preserves_norm_of_each_pair_and_is_identity_at_position_zero():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16)  # (B, T, N, hd)
    cos, sin = rotary_cos_sin(torch.arange(5)[None].expand(2, 5), rotary_dim=8, theta=10_000.0, dtype=x.dtype)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    pairs_in, pairs_out = x[..., :8].unflatten(-1, (4, 2)), out[..., :8].unflatten(-1, (4, 2))
    torch.testing.assert_close(pairs_out.norm(dim=-1), pairs_in.norm(dim=-1))
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert (out[:, 1:, :, :8] - x[:, 1:, :, :8]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------------------
# Packing, padding, KV cache


def test_doc_position_ids_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert doc_position_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_documents_equal_each_document_alone():
    model = random_glm(small_config())
    gen = torch.Generator().manual_seed(3)
    doc_a, doc_b = (
        torch.randint(0, 1031, (1, 13), generator=gen),
        torch.randint(0, 1031, (1, 22), generator=gen),
    )
    packed = torch.cat([doc_a, doc_b], dim=1)  # (1, 35)
    doc_ids = torch.tensor([[0] * 13 + [1] * 22])
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids).logits
        alone_a, alone_b = model(doc_a).logits, model(doc_b).logits
    assert (together[:, :13] - alone_a).abs().max() <= 1e-5
    assert (together[:, 13:] - alone_b).abs().max() <= 1e-5
    # without doc_ids the second document would see the first one
    with torch.no_grad():
        leaky = model(packed).logits
    assert (leaky[:, 13:] - alone_b).abs().max() > 1e-3


def test_left_padded_batch_equals_unpadded_rows():
    model = random_glm(small_config(num_kv_heads=1, pad_token_id=0))
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 1031, (n,), generator=gen) for n in (11, 4, 7)]
    T = 11
    input_ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    with torch.no_grad():
        batched = model(input_ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert (batched[i, T - len(r) :] - alone).abs().max() <= 1e-5
    assert torch.isfinite(batched).all()  # padding queries do not produce NaN


@pytest.mark.parametrize("post_norms", [False, True])
def test_kv_cache_incremental_decoding_equals_full_forward(post_norms):
    cfg = small_config(num_heads=8, num_kv_heads=2, post_norms=post_norms)
    model = random_glm(cfg)
    input_ids = torch.randint(0, 1031, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = KVCache(cfg, batch_size=2, max_len=32)
        steps = [model(input_ids[:, :9], kv_cache=cache).logits]  # prefill
        steps.append(model(input_ids[:, 9:12], kv_cache=cache).logits)  # a chunk after a prefix
        steps += [model(input_ids[:, t : t + 1], kv_cache=cache).logits for t in range(12, 19)]  # one by one
    assert cache.length == 19
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_kv_cache_with_left_padding_equals_full_forward():
    cfg = small_config(pad_token_id=0)
    model = random_glm(cfg)
    input_ids = torch.randint(1, 1031, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    input_ids[1, :5] = 0
    with torch.no_grad():
        full = model(input_ids, attention_mask=mask).logits
        cache = KVCache(cfg, batch_size=2, max_len=12)
        steps = [model(input_ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache).logits]
        steps += [
            model(input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache).logits
            for t in range(6, 12)
        ]
    assert (torch.cat(steps, dim=1)[:, 5:] - full[:, 5:]).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1)[0] - full[0]).abs().max() <= 1e-5


def test_kv_cache_overflow_is_an_error():
    cfg = small_config()
    with pytest.raises(ValueError, match="max_len"):
        random_glm(cfg)(torch.zeros(1, 5, dtype=torch.long), kv_cache=KVCache(cfg, 1, max_len=4))


def test_kv_cache_on_another_device_than_the_model_is_an_error():
    cfg = small_config()
    cache = KVCache(cfg, 1, max_len=8, device="meta")  # the model runs on the CPU
    with pytest.raises(ValueError, match=r"cache is on meta.*device='cpu'"):
        random_glm(cfg)(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# ----------------------------------------------------------------------------------------------------------
# Loss, init, training features


def test_loss_equals_cross_entropy_by_hand_and_its_gradient():
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 17, 101)).requires_grad_()
    labels = torch.randint(0, 101, (3, 17))
    labels[0, 3:9] = -100
    labels[2, -1] = -100
    loss = causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-7)
    # every label ignored: zero loss (not NaN), zero gradient
    empty = causal_lm_loss(logits, torch.full_like(labels, -100))
    (empty_grad,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and empty_grad.abs().max().item() == 0.0


def test_model_loss_uses_the_next_token_shift():
    model = random_glm(small_config())
    input_ids = torch.randint(0, 1031, (2, 9), generator=torch.Generator().manual_seed(7))
    out = model(input_ids, labels=input_ids)
    by_hand = F.cross_entropy(out.logits[:, :-1].reshape(-1, 1031), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, by_hand, rtol=0, atol=1e-5)
    assert model(input_ids, labels=input_ids, return_logits=False).logits is None


def test_bf16_loss_is_fp32_and_close_to_fp32_model():
    model = random_glm(small_config())
    input_ids = torch.randint(0, 1031, (2, 9), generator=torch.Generator().manual_seed(8))
    loss32 = model(input_ids, labels=input_ids).loss
    out16 = model.to(torch.bfloat16)(input_ids, labels=input_ids)
    assert out16.logits.dtype == torch.bfloat16 and out16.loss.dtype == torch.float32
    assert abs(out16.loss.item() - loss32.item()) < 0.1


def test_init_and_num_params():
    cfg = small_config(num_layers=4, hidden_size=128, intermediate_size=256, post_norms=True)
    torch.manual_seed(0)
    model = GLM(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(non_embedding=True) == cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    block = model.blocks[0]
    assert torch.equal(block.attn.qkv_proj.bias, torch.zeros_like(block.attn.qkv_proj.bias))
    assert torch.equal(block.post_mlp_norm.weight, torch.ones(128))
    assert block.attn.o_proj.bias is None and block.mlp.gate_up_proj.bias is None
    std = cfg.initializer_range
    assert abs(block.mlp.gate_up_proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.embed_tokens.weight.std().item() - std) < 0.1 * std
    scaled = std / math.sqrt(2 * cfg.num_layers)
    assert abs(block.mlp.down_proj.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(block.attn.o_proj.weight.std().item() - scaled) < 0.1 * scaled


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = random_glm(small_config()).train()
    input_ids = torch.randint(0, 1031, (2, 16), generator=torch.Generator().manual_seed(9))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, doc_ids=doc_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads()
    model.gradient_checkpointing = True
    loss_b, grads_b = loss_and_grads()
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_a)  # every parameter is trained


def test_autocast_bf16_forward_backward():
    model = random_glm(small_config()).train()
    input_ids = torch.randint(0, 1031, (2, 16), generator=torch.Generator().manual_seed(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_the_default_model_imports_no_kernel(tmp_path):
    """Built without a kernel config the model is the plain PyTorch code of pretrain/model.py: no Triton (it
    may not be installed) and no kernel module of ours beyond the config is imported, forward or backward."""
    code = (
        "import sys, torch\n"
        "from glmwb.pretrain.config import GLMConfig\n"
        "from glmwb.pretrain.model import GLM\n"
        "model = GLM(GLMConfig(vocab_size=64, num_layers=1))\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "model(ids, labels=ids, return_logits=False).loss.backward()\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'glmwb.kernels.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.strip() == "['glmwb.kernels.config']", out.stdout + out.stderr
