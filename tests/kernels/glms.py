"""What the model-level kernel tests share: a tiny, odd-sized GLM with random O(1) weights, its
``transformers`` twin and a batch (the ``launches`` fixture is in conftest.py)."""

from __future__ import annotations

import math

import torch

from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.model import GLM
from tests.kernels.checks import DEVICE

TOL = 1e-5  # fp32
KERNELS = ("rmsnorm", "swiglu", "rotary", "fused_ce")


def tiny_config(**changes) -> GLMConfig:
    base = dict(
        vocab_size=1031, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=12, max_position_embeddings=64,
    )  # fmt: skip
    return GLMConfig(**{**base, **changes})


def tiny_glm(seed: int = 0, kernels: KernelConfig | None = None, **changes) -> GLM:
    """Every weight random and O(1) (norm weights off 1, nonzero biases) so a wrong layout shows up; the same
    seed gives the same weights whatever ``kernels`` is."""
    torch.manual_seed(seed)
    model = GLM(tiny_config(**changes), kernels=kernels)
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


def batch(seed: int = 1, shape=(2, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1031, shape, generator=gen).to(DEVICE)
    labels = input_ids.clone()
    labels[0, :2] = -100  # a prompt
    return input_ids, labels


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
