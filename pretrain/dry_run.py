"""``glmwb run <pretrain recipe> --dry-run``: the memory of one GPU and the time of one step, estimated from
the recipe before anything is allocated (no model, no data, no CUDA; pretrain/flops.py has the formulas).

Every ZeRO stage (0-3, with and without CPU offload) over ``gpus`` data-parallel ranks (stage 0: plain data
parallel, every rank holds everything) is shown for the recipe's micro-batch, sequence length,
activation checkpointing and fused cross-entropy, and the recipe's own choice is marked; the step time
assumes an MFU (default 40 %, what a tuned dense run of this size reaches on H100s) of the GPU's peak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.flops import (
    GB,
    PEAK_TFLOPS,
    estimate_memory,
    flops_per_token,
    matmul_params,
    step_seconds,
)


def recipe_model_config(recipe) -> GLMConfig:
    """The model a pretrain recipe trains: its ``model`` section, or train.init_from's config.json (read
    as text: no weights)."""
    if not recipe.train.init_from:
        return recipe.model
    from glmwb.pretrain.hf import from_hf_config

    path = Path(recipe.train.init_from) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--dry-run: train.init_from has no config.json at {path}")
    return from_hf_config(json.loads(path.read_text()))


def dry_run(
    recipe, gpus: int, gpu: str = "H100", gpu_memory_gb: float = 80.0, assumed_mfu: float = 0.4
) -> dict:
    """The estimate as a dict (and printed): per ZeRO stage and offload, GB per GPU; the step time."""
    if gpu not in PEAK_TFLOPS and recipe.train.peak_tflops is None:
        raise ConfigError(
            f"--gpu {gpu!r} is not in the table ({', '.join(PEAK_TFLOPS)}); set train.peak_tflops"
        )
    cfg = recipe_model_config(recipe)
    peak = recipe.train.peak_tflops or PEAK_TFLOPS[gpu]
    t, seq = recipe.train, recipe.data.seq_len
    fused_ce = recipe.kernels is not None and recipe.kernels.fused_ce == "triton"
    ranks = gpus if t.strategy == "deepspeed" else 1
    global_tokens = t.batch_size * t.grad_accum * ranks * seq
    rows = []
    for stage in (0, 1, 2, 3):
        for offload in (False, True) if stage else (False,):
            est = estimate_memory(
                cfg, seq, t.batch_size, stage, ranks, offload, t.gradient_checkpointing, fused_ce
            )
            ours = (stage == (t.zero_stage if t.strategy == "deepspeed" else 0)) and offload == (
                t.offload and t.strategy == "deepspeed"
            )
            rows.append({"zero_stage": stage, "offload": offload, **est.to_dict(),
                         "fits": est.total <= gpu_memory_gb * GB, "recipe": ours})  # fmt: skip
    seconds = step_seconds(cfg, seq, global_tokens, ranks, peak, assumed_mfu, t.gradient_checkpointing)
    out: dict[str, Any] = {
        "params": cfg.num_params(), "matmul_params": matmul_params(cfg), "flops_per_token": flops_per_token(cfg, seq),
        "ranks": ranks, "gpus": gpus, "global_tokens_per_step": global_tokens, "gpu": gpu, "peak_tflops": peak,
        "assumed_mfu": assumed_mfu, "step_seconds": seconds, "total_hours": seconds * t.max_steps / 3600,
        "memory": rows,
    }  # fmt: skip
    print_estimate(out, cfg, recipe, gpu_memory_gb)
    return out


def print_estimate(out: dict, cfg: GLMConfig, recipe, gpu_memory_gb: float) -> None:
    t = recipe.train
    print("dry run: nothing allocated; estimates from the recipe (pretrain/flops.py)")
    print(f"model: {out['params'] / 1e9:.3f}B parameters ({out['matmul_params'] / 1e9:.3f}B in matmuls), "
          f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")  # fmt: skip
    print(f"step: {t.batch_size} rows x {recipe.data.seq_len} tokens x {t.grad_accum} accumulation x "
          f"{out['ranks']} GPU(s) = {out['global_tokens_per_step']:,} tokens; "
          f"{out['flops_per_token'] / 1e9:.2f} GFLOP/token (6N + attention)")  # fmt: skip
    print(f"memory per GPU in GB over {out['gpus']} GPUs (micro-batch {t.batch_size} x {recipe.data.seq_len}, activation checkpointing "
          f"{'on' if t.gradient_checkpointing else 'off'}); fits: <= {gpu_memory_gb:g} GB")  # fmt: skip
    print(f"  {'ZeRO':<5}{'offload':<9}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'logits':>8}"
          f"{'total':>8}{'on CPU':>8}  fits")  # fmt: skip
    for r in out["memory"]:
        print(f"  {r['zero_stage']:<5}{'cpu' if r['offload'] else '-':<9}{r['params']:>8.2f}{r['grads']:>8.2f}"
              f"{r['optimizer']:>8.2f}{r['activations']:>8.2f}{r['logits']:>8.2f}{r['total']:>8.2f}"
              f"{r['cpu_offloaded']:>8.2f}  {'yes' if r['fits'] else 'NO'}{'   <- the recipe' if r['recipe'] else ''}")  # fmt: skip
    print(f"step time at {out['assumed_mfu']:.0%} MFU of {out['peak_tflops']:g} TFLOP/s ({out['gpu']}): "
          f"{out['step_seconds']:.2f} s; {t.max_steps:,} steps: {out['total_hours']:.1f} h "
          "(plus what the framework and DeepSpeed add; untested on GPU here)")  # fmt: skip
