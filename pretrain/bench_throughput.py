"""Training-step throughput: our GLM vs ``transformers.GlmForCausalLM``, same config, batch and weights.

One step = forward + loss + backward + AdamW step. Both models use SDPA attention; their initial weights are
identical (copied through the adapter). Measurements are interleaved (ours, HF, HF, ours, ...) so drift in
the machine's speed hits both alike; the median of ``--steps`` timed steps after ``--warmup`` is reported.

    python -m glmwb.pretrain.bench_throughput                    # default GLMConfig(), batch 8 x 256
    python -m glmwb.pretrain.bench_throughput --dtype bf16 --device cuda --hidden-size 1024 --num-layers 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from glmwb.pretrain.config import GLMConfig
from glmwb.pretrain.hf import to_hf_config, to_hf_state_dict
from glmwb.pretrain.model import GLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = GLMConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--post-norms", action="store_true", help="glm4 sandwich norms (compares Glm4ForCausalLM)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype of both models")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also time our GLM built with every kernel (Triton RMSNorm, SwiGLU, rotary, fused CE) and HF's "
        "with kernels.apply_kernels",
    )
    return p.parse_args(argv)


def build_models(cfg: GLMConfig, device: torch.device, dtype: torch.dtype) -> tuple[GLM, torch.nn.Module]:
    ours = GLM(cfg)
    hf_cfg = to_hf_config(cfg)
    hf_cls = transformers.Glm4ForCausalLM if cfg.post_norms else transformers.GlmForCausalLM
    hf = hf_cls._from_config(hf_cfg, attn_implementation="sdpa")
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    return ours.to(device=device, dtype=dtype).train(), hf.to(device=device, dtype=dtype).train()


def make_step(model: torch.nn.Module, is_hf: bool, input_ids: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if is_hf:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        else:
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def timed(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step()  # float() of the loss synchronises the device
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, loss


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    cfg = GLMConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        post_norms=args.post_norms,
        max_position_embeddings=max(GLMConfig().max_position_embeddings, args.seq_len),
    )
    ours, hf = build_models(cfg, device, dtype)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
    steps = {"ours": make_step(ours, False, input_ids), "hf": make_step(hf, True, input_ids)}
    if args.kernels:
        import copy

        from glmwb.kernels.apply import apply_kernels
        from glmwb.kernels.config import KernelConfig

        ours_kernels = GLM(cfg, kernels=KernelConfig()).to(device=device, dtype=dtype).train()
        ours_kernels.load_state_dict(ours.state_dict())
        hf_kernels = copy.deepcopy(hf)
        apply_kernels(hf_kernels)
        steps["ours+kernels"] = make_step(ours_kernels, False, input_ids)
        steps["hf+kernels"] = make_step(hf_kernels, True, input_ids)

    first_loss = {name: step() for name, step in steps.items()}  # same weights, same batch: same loss
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(timed(steps[name], device)[0])

    tokens = args.batch_size * args.seq_len
    results = {
        "config": cfg.to_dict(),
        "num_params": ours.num_params(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "first_loss": first_loss,
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {
            "ms_per_step": 1e3 * med,
            "min_ms_per_step": 1e3 * min(ts),
            "tokens_per_s": tokens / med,
            "ms_all": [1e3 * t for t in ts],
        }
    # speed ratio ours / HF: > 1 means ours is faster. Also the median of the ratios of adjacent (paired)
    # steps, which is robust to a machine whose speed drifts (other jobs on a shared CPU).
    results["speedup_ours_over_hf"] = results["hf"]["ms_per_step"] / results["ours"]["ms_per_step"]
    results["paired_speedup_ours_over_hf"] = statistics.median(
        h / o for h, o in zip(times["hf"], times["ours"], strict=True)
    )

    print(
        f"{ours.num_params() / 1e6:.2f}M params | batch {args.batch_size} x {args.seq_len} | {args.dtype} | "
        f"{device} ({torch.get_num_threads()} threads) | median of {args.steps} after {args.warmup} warm-up"
    )
    print("first-step loss: " + "  ".join(f"{name} {loss:.6f}" for name, loss in first_loss.items()))
    labels = {"ours": "ours (pretrain.model)", "hf": "transformers Glm"}
    print(f"{'model':<24}{'ms/step':>10}{'min ms':>10}{'tokens/s':>12}{'vs HF':>8}")
    for name in times:
        r = results[name]
        print(
            f"{labels.get(name, name):<24}{r['ms_per_step']:>10.1f}{r['min_ms_per_step']:>10.1f}"
            f"{r['tokens_per_s']:>12,.0f}{results['hf']['ms_per_step'] / r['ms_per_step']:>7.2f}x"
        )
    print(
        f"speed ours/HF: {results['speedup_ours_over_hf']:.3f}x (medians), "
        f"{results['paired_speedup_ours_over_hf']:.3f}x (median of paired steps)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
