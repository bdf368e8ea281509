"""What a run at scale needs, checked small on the CPU: position interpolation equals transformers' "linear"
rope, the FLOP count and the ZeRO memory model against published numbers, torch.compile and activation
checkpointing in the loop, MFU in the metrics when a peak is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.flops import (
    estimate_memory,
    flops_per_token,
    matmul_params,
    mfu,
    model_state_bytes,
    peak_tflops,
    step_seconds,
)
from glmwb.pretrain.hf import from_hf_config, to_hf_config
from tests.test_model import hf_twin, random_glm, small_config
from tests.test_train import _max_diff, _run, packed  # noqa: F401 (the packed fixture)


def test_position_interpolation_matches_transformers_linear_rope():
    cfg = small_config(rope_scaling_factor=4.0, rope_theta=50_000.0)
    assert to_hf_config(cfg).rope_parameters["rope_type"] == "linear"
    assert from_hf_config(to_hf_config(cfg)) == cfg
    model = random_glm(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_twin(model)(ids).logits
        plain = random_glm(small_config(rope_theta=50_000.0)).eval()(ids).logits
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((ours - plain).abs().max()) > 1e-2  # the factor changes the model


def test_flops_per_token_is_6n_plus_the_attention_term():
    cfg = GLMConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)  # fmt: skip
    # by hand: per layer q 64x64 (+64 bias), kv 64x32 x2 (+64 bias), o 64x64, mlp 64x256 + 128x64, 2 norms 128
    per_layer = 64 * 64 + 64 + 2 * (64 * 32) + 64 + 64 * 64 + 64 * 256 + 128 * 64 + 128
    n = 2 * per_layer + 64 + 1000 * 64  # + final norm + lm_head (the input embedding is a lookup)
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, 255) == 6 * n + 12 * 2 * 4 * 16 * 128  # mean causal context (255 + 1) / 2
    # MFU: 1e6 tokens/s at 6e8 FLOPs/token on a 989-TFLOP/s H100
    assert mfu(6e8, 1e6, peak_tflops("NVIDIA H100 80GB HBM3")) == pytest.approx(6e14 / 989e12)
    assert peak_tflops("cpu") is None and mfu(6e8, 1e6, None) is None
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("anything", 100.0) == 100.0


@pytest.mark.parametrize(
    ("stage", "published_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)]
)  # fmt: skip
def test_zero_model_states_match_the_zero_paper(stage, published_gb):
    """Rajbhandari et al. 2020, figure 1: a 7.5B-parameter model with Adam (K = 12) on 64 GPUs."""
    params, grads, optim, cpu = model_state_bytes(7.5e9, stage, 64)
    assert (params + grads + optim) / 1e9 == pytest.approx(published_gb, abs=0.06)
    assert cpu == 0


def test_offload_moves_optimizer_states_and_zero3_params_to_the_cpu():
    p2, g2, o2, cpu2 = model_state_bytes(1e9, 2, 8, offload=True)
    assert (p2, g2, o2, cpu2) == (2e9, 2e9 / 8, 0.0, 12e9 / 8)
    p3, g3, o3, cpu3 = model_state_bytes(1e9, 3, 8, offload=True)
    assert (p3, o3, cpu3) == (0.0, 0.0, 12e9 / 8 + 2e9 / 8)


def test_activation_memory_and_step_time_known_numbers():
    cfg = GLMConfig(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_layers=32,
                    num_heads=32, num_kv_heads=32, head_dim=128)  # fmt: skip
    est = estimate_memory(cfg, 2048, 1, zero_stage=3, ranks=8, checkpointing=False, fused_ce=True)
    assert est.activations == 34 * 2048 * 4096 * 32 and est.logits == 0  # Korthikanti, flash attention
    ckpt = estimate_memory(cfg, 2048, 1, zero_stage=3, ranks=8, checkpointing=True, fused_ce=False)
    assert ckpt.activations == 2 * 2048 * 4096 * 32 + 34 * 2048 * 4096
    assert ckpt.logits == 6 * 2048 * 32_000
    # one step of 4M tokens on 8 GPUs at 40% of 989 TFLOP/s
    t = step_seconds(cfg, 2048, 4 * 2**20, 8, 989.0, 0.4)
    assert t == pytest.approx(4 * 2**20 * flops_per_token(cfg, 2048) / (8 * 989e12 * 0.4))


def test_activation_checkpointing_trains_like_plain(packed, tiny_tokenizer, tmp_path):  # noqa: F811
    plain, _ = _run(packed, tiny_tokenizer, tmp_path / "plain", max_steps=3)
    ckpt, _ = _run(packed, tiny_tokenizer, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True)
    assert _max_diff(plain, ckpt) < 1e-5  # recomputing the forward changes nothing
    assert _max_diff(plain, random_glm(plain.config)) > 1e-2


@pytest.mark.slow  # torch.compile's first compilation: about 3 minutes on 2 busy cores
def test_compile_trains_like_plain(packed, tiny_tokenizer, tmp_path):  # noqa: F811
    plain, s0 = _run(packed, tiny_tokenizer, tmp_path / "plain", max_steps=3)
    compiled, s2 = _run(packed, tiny_tokenizer, tmp_path / "compiled", max_steps=3, compile=True)
    assert _max_diff(plain, compiled) < 1e-4  # fused kernels: rounding only
    assert s0["heldout_loss_after"] == pytest.approx(s2["heldout_loss_after"], abs=1e-3)


def test_mfu_and_tokens_per_second_in_the_metrics(packed, tiny_tokenizer, tmp_path):  # noqa: F811
    model, summary = _run(packed, tiny_tokenizer, tmp_path, max_steps=2, peak_tflops=0.001)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    flops = flops_per_token(model.config, packed[0].seq_len)
    for r in train:
        assert r["tokens_per_s"] > 0 and r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e9)
    _run(packed, tiny_tokenizer, tmp_path / "cpu", max_steps=1)  # a CPU has no peak in the table: no MFU
    rows = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [("mfu" in r, "tokens_per_s" in r) for r in rows if r["kind"] == "train"] == [(False, True)]


def test_dry_run_estimates_the_1b_recipe_without_building_anything(monkeypatch, capsys):
    from glmwb.pretrain import model as model_module
    from glmwb.recipes.cli import main

    def refuse(*a, **k):
        raise AssertionError("the dry run built a model")

    monkeypatch.setattr(model_module.GLM, "__init__", refuse)
    assert main(["run", "recipes/pretrain_1b.yaml", "--dry-run", "--gpus", "8", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    p = GLMConfig(vocab_size=65536, hidden_size=2048, intermediate_size=5632, num_layers=20, num_heads=16,
                  num_kv_heads=2, head_dim=128).num_params()  # fmt: skip
    assert f"{p / 1e9:.3f}B parameters" in out and p == pytest.approx(1.149e9, rel=1e-3)
    # ZeRO-2 over 8 GPUs: bf16 weights 2P, gradients 2P / 8, Adam states 12P / 8; checkpointed activations
    # 20 layers x 2 s b h + one layer's 34 s b h (s 2048, b 16, h 2048); no logits (fused cross-entropy)
    acts = (20 * 2 + 34) * 2048 * 16 * 2048
    zero2 = next(line for line in out.splitlines() if line.endswith("<- the recipe"))
    assert zero2.split()[:2] == ["2", "-"]
    want = [
        2 * p / 1e9,
        2 * p / 8 / 1e9,
        12 * p / 8 / 1e9,
        acts / 1e9,
        0.0,
        (2 * p + 14 * p / 8 + acts) / 1e9,
    ]
    assert [float(x) for x in zero2.split()[2:8]] == pytest.approx(want, abs=0.006)
    seconds = 262_144 * flops_per_token(GLMConfig(vocab_size=65536, hidden_size=2048, intermediate_size=5632,
        num_layers=20, num_heads=16, num_kv_heads=2, head_dim=128), 2048) * 4 / 3 / (8 * 989e12 * 0.4)  # fmt: skip
    assert f"(H100): {seconds:.2f} s" in out


def test_dry_run_of_another_stage_is_a_user_error(capsys):
    from glmwb.recipes.cli import main

    assert main(["run", "recipes/sft.yaml", "--dry-run"]) == 2
    assert "--dry-run estimates pretrain recipes" in capsys.readouterr().err


def test_loss_by_position_averages_to_the_one_stream_loss(packed, tiny_tokenizer):  # noqa: F811
    from glmwb.pretrain.data import PackedDataset
    from glmwb.pretrain.long_context import buckets, loss_by_position
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.train import evaluate
    from tests.tiny import TINY

    torch.manual_seed(0)
    model = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tiny_tokenizer)))).eval()
    tokens = np.asarray(packed[1].tokens[:6])
    rows = PackedDataset(tokens, np.zeros_like(tokens))  # one document per row: every target counts
    curve = loss_by_position(model, rows, rows=6, batch_size=4)
    assert curve.shape == (rows.seq_len - 1,) and np.isfinite(curve).all()
    # the mean over positions is evaluate()'s token mean over the same rows; batching changes nothing
    whole = evaluate(model, rows, 2, 3, torch.device("cpu"), None, one_stream=True)
    assert float(curve.mean()) == pytest.approx(whole, rel=1e-5)
    np.testing.assert_allclose(loss_by_position(model, rows, rows=6, batch_size=1), curve, rtol=1e-5)
    assert [b[:2] for b in buckets(curve, 16)] == [(0, 15), (16, 31), (32, 47), (48, 62)]


def test_extend_context_changes_the_rotary_settings_and_keeps_the_weights():
    from glmwb.pretrain.run import ContextExtension, extend_context

    model = random_glm(small_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extend_context(
        model, ContextExtension(rope_theta=1e5, rope_scaling_factor=2.0, max_position_embeddings=1024)
    )
    assert (model.config.rope_theta, model.config.rope_scaling_factor) == (1e5, 2.0)
    assert model.config.max_position_embeddings == 1024
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, random_glm(small_config())(ids).logits)
