"""apply_kernels on transformers' GlmForCausalLM / Glm4ForCausalLM: kernels on = kernels off (logits, loss,
gradients, generation), and remove() restores the model exactly. Tiny and odd-sized."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import glmwb.kernels._common  # noqa: E402
from glmwb.kernels.apply import apply_kernels, revert_kernels  # noqa: E402
from glmwb.kernels.config import KernelConfig  # noqa: E402
from tests.kernels.glms import (  # noqa: E402
    KERNELS,
    TOL,
    batch,
    hf_twin,
    max_diff,
    tiny_glm,
)

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


def test_apply_twice_remove_and_partial_configs():
    hf = hf_twin(tiny_glm(seed=10))
    handle = apply_kernels(
        hf, {"rmsnorm": "triton"}, swiglu=False, rotary=False, fused_ce=False, attention=False
    )
    assert handle.replaced == {"rmsnorm": 5}
    with pytest.raises(RuntimeError, match="already applied"):
        apply_kernels(hf)
    handle.remove()
    assert not any("forward" in m.__dict__ for m in hf.modules())
    handle.remove()  # idempotent
    with pytest.raises(RuntimeError, match="no kernels are applied"):
        revert_kernels(hf)
    handle = apply_kernels(hf, KernelConfig.all_torch(), attention="sdpa")
    assert handle.replaced == {"attention": 2}
    revert_kernels(hf)
    assert apply_kernels(hf, KernelConfig.all_torch()).replaced == {}


def test_unsupported_model_and_missing_interpreter_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unsupported model Linear"):
        apply_kernels(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"unsupported model GLM.*GLM\(config, kernels=KernelConfig"):
        apply_kernels(tiny_glm())  # ours picks its kernels when it is built
    if not torch.cuda.is_available():
        hf = hf_twin(tiny_glm())
        monkeypatch.setattr(glmwb.kernels._common, "is_interpreted", lambda kernel: False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            apply_kernels(hf)
        apply_kernels(hf, KernelConfig.all_torch())  # no Triton needed: fine
