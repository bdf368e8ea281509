"""apply_kernels: kernels on = kernels off (logits, loss, gradients, 20 training steps), and remove() restores
the model exactly. Our GLM and transformers' GlmForCausalLM / Glm4ForCausalLM, tiny and odd-sized."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import glmwb.kernels._common  # noqa: E402
import glmwb.kernels.fused_linear_ce  # noqa: E402
import glmwb.kernels.rmsnorm  # noqa: E402
import glmwb.kernels.rotary  # noqa: E402
import glmwb.kernels.swiglu  # noqa: E402
from glmwb.kernels.apply import KernelConfig, apply_kernels, revert_kernels  # noqa: E402
from glmwb.pretrain.config import GLMConfig  # noqa: E402
from glmwb.pretrain.model import GLM, KVCache  # noqa: E402
from tests.kernels.checks import DEVICE  # noqa: E402

TOL = 1e-5  # fp32


def tiny_config(**changes) -> GLMConfig:
    base = dict(
        vocab_size=1031, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=12, max_position_embeddings=64,
    )  # fmt: skip
    return GLMConfig(**{**base, **changes})


def tiny_glm(seed: int = 0, **changes) -> GLM:
    """Every weight random and O(1) (norm weights off 1, nonzero biases) so a wrong layout shows up."""
    torch.manual_seed(seed)
    model = GLM(tiny_config(**changes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.to(DEVICE).eval()


def hf_twin(model: GLM, attn_implementation: str = "sdpa"):
    import transformers

    from glmwb.pretrain.hf import to_hf_config, to_hf_state_dict

    cls = transformers.Glm4ForCausalLM if model.config.post_norms else transformers.GlmForCausalLM
    hf = cls._from_config(to_hf_config(model.config), attn_implementation=attn_implementation)
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf.to(DEVICE).eval()


def batch(seed: int = 1, shape=(2, 7)):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1031, shape, generator=gen).to(DEVICE)
    labels = input_ids.clone()
    labels[0, :2] = -100  # a prompt
    return input_ids, labels


@pytest.fixture
def launches(monkeypatch):
    """Counts of each Triton launcher called, to prove the kernels (not the torch code) ran."""
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


KERNELS = ("rmsnorm", "swiglu", "rotary", "fused_ce")


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Config


def test_kernel_config_from_dict_is_strict():
    cfg = KernelConfig.from_dict({"rmsnorm": "triton", "swiglu": "torch", "attention": False})
    assert (cfg.rmsnorm, cfg.swiglu, cfg.rotary, cfg.attention) == ("triton", "torch", "triton", "torch")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rms_norm'\]; allowed: \['attention'"):
        KernelConfig.from_dict({"rms_norm": "triton"})
    with pytest.raises(ValueError, match="swiglu must be one of \\('triton', 'torch'\\), got 'cuda'"):
        KernelConfig.from_dict({"swiglu": "cuda"})
    with pytest.raises(Exception, match="frozen|cannot assign"):
        cfg.rmsnorm = "torch"


# ----------------------------------------------------------------------------------------------------------
# Our GLM


def test_our_glm_same_logits_loss_and_gradients_then_remove_restores(launches):
    model = tiny_glm()
    input_ids, labels = batch()
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids, doc_ids=doc_ids, labels=labels)
        fused = model(input_ids, doc_ids=doc_ids, labels=labels, return_logits=False)
        fused.loss.backward()
        return (
            out.logits.detach(),
            out.loss.detach(),
            fused,
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )

    logits, loss, plain_fused, grads = run()
    handle = apply_kernels(model)
    assert handle.replaced == {
        "rmsnorm": 5,
        "add+rmsnorm": 2,
        "swiglu": 2,
        "rotary+attention": 2,
        "positions": 1,
        "fused_ce": 1,
    }
    k_logits, k_loss, k_fused, k_grads = run()
    assert all(launches[k] > 0 for k in KERNELS), launches
    assert launches["rmsnorm_add"] == 4, launches  # 2 blocks x (forward for logits + forward for the loss)
    assert k_fused.logits is None and plain_fused.logits is None  # logits not requested: fused linear + CE
    assert max_diff(k_logits, logits) <= TOL and logits.abs().max() > 1
    assert max_diff(k_loss, loss) <= TOL and max_diff(k_fused.loss, plain_fused.loss) <= TOL
    for name, g in grads.items():
        assert max_diff(k_grads[name], g) <= TOL, name

    with pytest.raises(RuntimeError, match="already applied"):
        apply_kernels(model)
    handle.remove()
    assert not any(name in m.__dict__ for m in model.modules() for name in ("forward", "hidden_states"))
    before = dict(launches)
    r_logits, r_loss, _, r_grads = run()
    assert launches == before  # no kernel ran after remove()
    assert torch.equal(r_logits, logits) and torch.equal(r_loss, loss)
    assert all(torch.equal(r_grads[n], g) for n, g in grads.items())
    handle.remove()  # idempotent
    with pytest.raises(RuntimeError, match="no kernels are applied"):
        revert_kernels(model)


def test_our_glm_padding_kv_cache_and_checkpointing_with_kernels():
    model = tiny_glm(seed=2, post_norms=True)
    input_ids, labels = batch(seed=3)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask).logits
    apply_kernels(model, {"fused_ce": "torch"})
    with torch.no_grad():
        assert max_diff(model(input_ids, attention_mask=attention_mask).logits, padded) <= TOL
        full = model(input_ids).logits
        cache = KVCache(model.config, batch_size=2, max_len=8, device=input_ids.device)
        steps = [model(input_ids[:, :5], kv_cache=cache).logits]
        steps += [model(input_ids[:, t : t + 1], kv_cache=cache).logits for t in (5, 6)]
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL
    # gradient checkpointing recomputes the blocks in backward: the rotary positions must survive it
    model.train()
    model.gradient_checkpointing = True
    model(input_ids, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    revert_kernels(model)
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert max_diff(grads[name], p.grad) <= TOL, name


def test_partial_configs_replace_only_what_they_name():
    model = tiny_glm()
    handle = apply_kernels(
        model, {"rmsnorm": "triton"}, swiglu=False, rotary=False, fused_ce=False, attention=False
    )
    assert handle.replaced == {"rmsnorm": 5, "add+rmsnorm": 2}
    handle.remove()
    handle = apply_kernels(model, KernelConfig.all_torch(), attention="sdpa")
    assert handle.replaced == {"attention": 2}
    handle.remove()
    assert apply_kernels(model, KernelConfig.all_torch()).replaced == {}


def test_unsupported_model_and_missing_interpreter_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unsupported model Linear"):
        apply_kernels(torch.nn.Linear(3, 3))
    if not torch.cuda.is_available():
        monkeypatch.setattr(glmwb.kernels._common, "is_interpreted", lambda kernel: False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            apply_kernels(tiny_glm())
        apply_kernels(tiny_glm(), KernelConfig.all_torch())  # no Triton needed: fine


def test_twenty_adamw_steps_with_kernels_match_without():
    input_ids, labels = batch(seed=4, shape=(1, 4))

    def train(with_kernels: bool):
        model = tiny_glm(seed=5).train()
        handle = apply_kernels(model) if with_kernels else None
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses, first_grads = [], None
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids, labels=labels, return_logits=False).loss
            loss.backward()
            first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            losses.append(loss.item())
        if handle is not None:
            handle.remove()
        return torch.tensor(losses), dict(model.named_parameters()), first_grads

    losses, params, grads = train(False)
    k_losses, k_params, _ = train(True)
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


# ----------------------------------------------------------------------------------------------------------
# transformers' GLM


@pytest.mark.parametrize(
    "post_norms, attn_implementation", [(False, "sdpa"), (True, "eager")], ids=["glm-sdpa", "glm4-eager"]
)
def test_hf_glm_same_outputs_with_kernels_and_remove_restores(post_norms, attn_implementation, launches):
    hf = hf_twin(tiny_glm(seed=6, post_norms=post_norms), attn_implementation)
    input_ids, labels = batch(seed=7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    labels[1, :3] = -100  # padding, and the padded position that would predict the first real token

    def run():
        hf.eval()
        with torch.no_grad():
            out = hf(input_ids, attention_mask=attention_mask, labels=labels)
        hf.train()
        hf.zero_grad(set_to_none=True)
        train_out = hf(
            input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(9)
        )
        train_out.loss.backward()
        grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
        return out.logits, out.loss, train_out, grads

    logits, loss, plain_train, grads = run()
    handle = apply_kernels(hf)
    n_norms = 9 if post_norms else 5
    assert handle.replaced == {"rmsnorm": n_norms, "swiglu": 2, "rotary+attention": 2, "fused_ce": 1}
    k_logits, k_loss, k_train, k_grads = run()
    assert all(launches[k] > 0 for k in KERNELS), launches
    assert k_train.logits is None and plain_train.logits is not None  # training with labels: fused, as Liger
    # Padded query positions attend to nothing real; what they output is undefined (HF's eager softmax over
    # its finfo.min mask and CUDA's SDPA kernels disagree there), so only real positions are compared.
    real = attention_mask.bool()
    assert torch.isfinite(k_logits).all()
    assert max_diff(k_logits[real], logits[real]) <= TOL and max_diff(k_loss, loss) <= TOL
    assert max_diff(k_train.loss, plain_train.loss) <= TOL
    assert grads.keys() == k_grads.keys()
    for name, g in grads.items():
        assert max_diff(k_grads[name], g) <= TOL, name
    handle.remove()
    r_logits, r_loss, r_train, _ = run()
    assert torch.equal(r_logits, logits) and torch.equal(r_loss, loss) and r_train.logits is not None


def test_hf_generation_with_kernels_equals_without():
    hf = hf_twin(tiny_glm(seed=8))
    input_ids, _ = batch(seed=9, shape=(1, 5))
    with torch.no_grad():
        plain = hf.generate(input_ids, max_new_tokens=3, do_sample=False)
        handle = apply_kernels(hf)
        with_kernels = hf.generate(input_ids, max_new_tokens=3, do_sample=False)
    handle.remove()
    assert torch.equal(plain, with_kernels)
