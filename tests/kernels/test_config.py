"""KernelConfig: the strict ``kernels:`` section both our GLM and apply_kernels read."""

from __future__ import annotations

import pytest

from glmwb.kernels.config import KernelConfig


def test_kernel_config_from_dict_is_strict():
    cfg = KernelConfig.from_dict({"rmsnorm": "triton", "swiglu": "torch", "attention": False})
    assert (cfg.rmsnorm, cfg.swiglu, cfg.rotary, cfg.attention) == ("triton", "torch", "triton", "torch")
    assert KernelConfig.from_dict({"rmsnorm": True}).rmsnorm == "triton"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rms_norm'\]; allowed: \['attention'"):
        KernelConfig.from_dict({"rms_norm": "triton"})
    with pytest.raises(ValueError, match="swiglu must be one of \\('triton', 'torch'\\), got 'cuda'"):
        KernelConfig.from_dict({"swiglu": "cuda"})
    with pytest.raises(Exception, match="frozen|cannot assign"):
        cfg.rmsnorm = "torch"
    assert not KernelConfig.all_torch().uses_triton() and KernelConfig(attention="sdpa").uses_triton()
    assert not KernelConfig.from_dict(
        {k: False for k in ("rmsnorm", "swiglu", "rotary", "fused_ce")}
    ).uses_triton()
