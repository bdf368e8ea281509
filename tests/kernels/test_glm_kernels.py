"""Our GLM built with kernels = built without (logits, loss, gradients, packing, padding, KV cache, gradient
checkpointing, 20 training steps, generation), each choice swapping only its own op. Tiny and odd-sized."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

import glmwb.kernels._common  # noqa: E402
import glmwb.kernels.attention  # noqa: E402
from glmwb.kernels.config import KernelConfig  # noqa: E402
from glmwb.pretrain.generate import generate  # noqa: E402
from glmwb.pretrain.hf import load_pretrained, save_pretrained  # noqa: E402
from glmwb.pretrain.model import GLM, KVCache, sdpa_attention, swiglu  # noqa: E402
from tests.kernels.checks import DEVICE  # noqa: E402
from tests.kernels.glms import KERNELS, TOL, batch, max_diff, tiny_config, tiny_glm  # noqa: E402

ALL_KERNELS = KernelConfig()  # every kernel on, attention auto


def logits_loss_and_grads(model: GLM, input_ids, labels, **inputs):
    """Logits and loss of one forward, then the loss without logits (fused with fused_ce) and its gradients."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=labels, **inputs)
    fused = model(input_ids, labels=labels, return_logits=False, **inputs)
    fused.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), fused, grads


def assert_same_run(got, expected) -> None:
    (logits, loss, fused, grads), (e_logits, e_loss, e_fused, e_grads) = got, expected
    assert max_diff(logits, e_logits) <= TOL and e_logits.abs().max() > 1
    assert max_diff(loss, e_loss) <= TOL and max_diff(fused.loss, e_fused.loss) <= TOL
    assert grads.keys() == e_grads.keys()
    for name, g in e_grads.items():
        assert max_diff(grads[name], g) <= TOL, name


def test_glm_with_kernels_same_logits_loss_and_gradients(launches):
    plain, kernels = tiny_glm(), tiny_glm(kernels=ALL_KERNELS)
    assert plain.kernels == KernelConfig.all_torch() and kernels.kernels == ALL_KERNELS
    sd, k_sd = plain.state_dict(), kernels.state_dict()
    assert sd.keys() == k_sd.keys() and all(torch.equal(sd[n], k_sd[n]) for n in sd)  # no parameter changes
    input_ids, labels = batch()
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=DEVICE)

    expected = logits_loss_and_grads(plain, input_ids, labels, doc_ids=doc_ids)
    assert not any(launches.values()), launches  # the default model runs no kernel
    got = logits_loss_and_grads(kernels, input_ids, labels, doc_ids=doc_ids)
    assert all(launches[k] > 0 for k in KERNELS), launches
    assert launches["rmsnorm_add"] == 4, launches  # 2 blocks x (forward for logits + forward for the loss)
    assert got[2].logits is None and expected[2].logits is None  # logits not requested
    assert_same_run(got, expected)


@pytest.mark.parametrize(
    "choice, launched",
    [
        ({"rmsnorm": "triton"}, {"rmsnorm", "rmsnorm_add"}),
        ({"swiglu": "triton"}, {"swiglu"}),
        ({"rotary": "triton"}, {"rotary"}),
        ({"fused_ce": "triton"}, {"fused_ce"}),
        ({"attention": "sdpa"}, {"attention"}),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_each_choice_swaps_only_its_op(choice, launched, launches, monkeypatch):
    attention = glmwb.kernels.attention.attention

    def counted_attention(*args, **kwargs):
        launches["attention"] = launches.get("attention", 0) + 1
        return attention(*args, **kwargs)

    monkeypatch.setattr(glmwb.kernels.attention, "attention", counted_attention)
    cfg = dataclasses.replace(KernelConfig.all_torch(), **choice)
    input_ids, labels = batch(seed=11)
    expected = logits_loss_and_grads(tiny_glm(seed=12), input_ids, labels)
    got = logits_loss_and_grads(tiny_glm(seed=12, kernels=cfg), input_ids, labels)
    assert {k for k, n in launches.items() if n > 0} == launched, launches
    assert_same_run(got, expected)


def test_padding_kv_cache_and_checkpointing_with_kernels():
    plain = tiny_glm(seed=2, post_norms=True)
    model = tiny_glm(seed=2, post_norms=True, kernels=KernelConfig(fused_ce="torch"))
    input_ids, labels = batch(seed=3)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        padded = plain(input_ids, attention_mask=attention_mask).logits
        assert max_diff(model(input_ids, attention_mask=attention_mask).logits, padded) <= TOL
        full = plain(input_ids).logits
        cache = KVCache(model.config, batch_size=2, max_len=8, device=input_ids.device)
        steps = [model(input_ids[:, :5], kv_cache=cache).logits]
        steps += [model(input_ids[:, t : t + 1], kv_cache=cache).logits for t in (5, 6)]
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    # gradient checkpointing recomputes the blocks in backward, the in-place rotary included
    for m in (plain, model):
        m.train()
        m.gradient_checkpointing = True
        m(input_ids, labels=labels).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(grads[name].grad, p.grad) <= TOL, name


def test_missing_interpreter_is_a_clear_error_at_build(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels natively")
    monkeypatch.setattr(glmwb.kernels._common, "is_interpreted", lambda kernel: False)
    with pytest.raises(ValueError, match="GLM: the Triton kernels need a CUDA GPU.*TRITON_INTERPRET=1"):
        GLM(tiny_config(), kernels=KernelConfig(rmsnorm="triton"))
    GLM(tiny_config(), kernels=KernelConfig(**{k: "torch" for k in KERNELS}))  # attention auto: no Triton


def test_twenty_adamw_steps_with_kernels_match_without():
    input_ids, labels = batch(seed=4, shape=(1, 4))

    def train(kernels: KernelConfig | None):
        model = tiny_glm(seed=5, kernels=kernels).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses, first_grads = [], None
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids, labels=labels, return_logits=False).loss
            loss.backward()
            first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses), dict(model.named_parameters()), first_grads

    losses, params, grads = train(None)
    k_losses, k_params, _ = train(ALL_KERNELS)
    assert losses[-1] < losses[0] - 1.0  # it learned
    assert max_diff(k_losses, losses) <= 1e-4

    # The key bias outside the rotary dims adds q . b_k to every score of a query alike, which softmax
    # ignores: its gradient is exactly zero, so both runs only see fp32 rounding noise (~1e-8) there, which
    # Adam scales up to lr-sized steps. Those entries are checked to be zero-gradient, not compared.
    cfg = tiny_config()
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    null = torch.zeros(q_dim + 2 * kv_dim, dtype=torch.bool, device=DEVICE)
    null[q_dim : q_dim + kv_dim].view(cfg.num_kv_heads, cfg.head_dim)[:, cfg.rotary_dim :] = True
    for name, p in params.items():
        compared = ~null if name.endswith("qkv_proj.bias") else torch.ones_like(p, dtype=torch.bool)
        if name.endswith("qkv_proj.bias"):
            assert grads[name][null].abs().max() <= 1e-6, name
        assert max_diff(k_params[name].detach()[compared], p.detach()[compared]) <= 1e-4, name


def test_generation_with_kernels_equals_without():
    prompts = [[5, 17, 300, 2], [9, 1000, 41, 7, 7, 12], [3]]  # left-padded to 6 inside generate
    kwargs = dict(max_new_tokens=5, temperature=0.0, stop_token_ids=())
    plain = generate(tiny_glm(seed=8), prompts, **kwargs)
    with_kernels = generate(tiny_glm(seed=8, kernels=ALL_KERNELS), prompts, **kwargs)
    assert with_kernels == plain and len(set(map(tuple, plain))) > 1


def test_a_loaded_checkpoint_and_its_copy_keep_their_kernels(tmp_path):
    plain = tiny_glm(seed=13)
    save_pretrained(plain, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model", device=str(DEVICE), kernels=ALL_KERNELS)
    twin = copy.deepcopy(loaded)  # a PPO / DPO reference copy
    input_ids, labels = batch(seed=14)
    with torch.no_grad():
        expected = plain(input_ids).logits
        for model in (loaded, twin):
            assert model.kernels == ALL_KERNELS
            assert model.blocks[0].mlp.swiglu_fn is not swiglu
            assert model.blocks[1].attn.attention_fn is not sdpa_attention
            assert max_diff(model(input_ids).logits, expected) <= TOL
