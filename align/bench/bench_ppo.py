"""PPO step time split into generation / scoring / inference (old, reference log-probs and values) / training,
for a few memory layouts (separate critic, shared backbone, LoRA actor with the adapter-off reference).

    python -m glmwb.align.bench.bench_ppo --policy runs/quickstart/pretrain/final [--rm runs/quickstart/reward/final]
    python -m glmwb.align.bench.bench_ppo --device cuda --batch-size 256 --max-new-tokens 128
    python -m glmwb.align.bench.bench_ppo --config small   # a random GLM of a named size instead of a folder

Prints a table and writes a CSV (--out). Each layout runs --warmup steps (not timed) then --steps timed steps;
the figures are medians over the timed steps, in seconds, plus the resident / trainable parameters and (CUDA)
the peak memory. The world's train prompts are the rollout prompts, the rule reward world_correct (or the RM).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

SIZES = {  # random GLMs for when no folder is given (vocabulary of the given tokenizer, rounded up)
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    ),
    "small": dict(
        hidden_size=256, intermediate_size=688, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=32
    ),
    "base": dict(
        hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64
    ),
}
LAYOUTS = {
    "separate": dict(backbone="separate", lora=False),
    "shared": dict(backbone="shared", lora=False),
    "lora+shared": dict(backbone="shared", lora=True),
}
PHASES = ("generation", "scoring", "inference", "training", "step")


def build(args: argparse.Namespace, layout: str, device: torch.device):
    from glmwb.align.ppo.config import GenerationConfig, KLConfig, PPOConfig, PPOTrainConfig, RewardSection
    from glmwb.align.ppo.models import Actor, Critic, Reference, ValueHead, apply_lora, parameter_count
    from glmwb.align.ppo.rollout import PromptCycle, build_reward, world_items
    from glmwb.align.ppo.trainer import PPOTrainer
    from glmwb.pretrain.config import GLMConfig
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.optim import OptimConfig
    from glmwb.pretrain.settings import LoRAConfig
    from glmwb.pretrain.tokenizer import load_glm_tokenizer, turn_terminator_ids
    from glmwb.pretrain.world import make_world

    tok = load_glm_tokenizer(args.policy)
    if args.config:
        vocab = -(-len(tok) // 64) * 64
        glm = GLM(GLMConfig(vocab_size=vocab, pad_token_id=tok.pad_token_id, **SIZES[args.config]))
    else:
        glm = load_pretrained(args.policy)
    spec = LAYOUTS[layout]
    if spec["lora"]:
        apply_lora(glm, LoRAConfig(enabled=True, r=16, alpha=32))
    shared = spec["backbone"] == "shared"
    actor = Actor(glm, ValueHead(glm.config.hidden_size) if shared else None)
    reference = Reference(actor, "adapter_off" if spec["lora"] else "copy")
    critic = None
    if not shared:
        import copy

        backbone = copy.deepcopy(glm)
        critic = Critic(backbone, ValueHead(glm.config.hidden_size)).to(device)
    actor.to(device)
    reference.to(device)
    section = RewardSection(kind="rm", rm=args.rm) if args.rm else RewardSection()
    reward_fn, _ = build_reward(section, device=str(device))
    world = make_world(0, 96)
    items, _ = world_items(tok, world.prompts("train", 1000, seed=0), 256)
    train = PPOTrainConfig(
        steps=args.steps + args.warmup, batch_size=args.batch_size, minibatch_size=args.minibatch_size,
        microbatch_size=args.microbatch_size, epochs=args.epochs,
    )  # fmt: skip
    amp = torch.bfloat16 if device.type == "cuda" else None
    kernel = "triton" if device.type == "cuda" else "torch"
    trainer = PPOTrainer(
        actor, critic, reference, tok, reward_fn, PPOConfig(), KLConfig(),
        GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size),
        train, OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0), stop_ids=turn_terminator_ids(tok),
        device=device, amp_dtype=amp, logprob_kernel=kernel,
    )  # fmt: skip
    counts = parameter_count(actor, critic, reference.glm)
    return trainer, PromptCycle(items, 0), counts


def bench_layout(args: argparse.Namespace, layout: str, device: torch.device) -> dict:
    trainer, cycle, counts = build(args, layout, device)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    lengths = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _, m = trainer.step(cycle.next(args.batch_size))
        if i < args.warmup:
            continue
        for p in PHASES:
            times[p].append(m[f"time/{p}"])
        lengths.append(m["response/length_mean"])
    row = {"layout": layout, "device": device.type, "batch": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "response_tokens": round(statistics.mean(lengths), 1),
           "resident_M": round(counts["resident_M"], 2), "trainable_M": round(counts["trainable_M"], 2)}  # fmt: skip
    for p in PHASES:
        row[f"{p}_s"] = round(statistics.median(times[p]), 3)
    row["generation_share"] = round(row["generation_s"] / row["step_s"], 3)
    if device.type == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--policy", default="runs/quickstart/pretrain/final", help="policy folder (and tokenizer)"
    )
    parser.add_argument(
        "--config", choices=sorted(SIZES), help="a random GLM of this size instead of the folder's"
    )
    parser.add_argument("--rm", default=None, help="score with this reward folder instead of the rule")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layouts", default="separate,shared,lora+shared")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--minibatch-size", type=int, default=32)
    parser.add_argument("--microbatch-size", type=int, default=32)
    parser.add_argument("--generation-batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench/ppo_step.csv")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    rows = []
    for layout in args.layouts.split(","):
        if layout not in LAYOUTS:
            parser.error(f"--layouts: unknown {layout!r}; known: {', '.join(LAYOUTS)}")
        started = time.perf_counter()
        rows.append(bench_layout(args, layout, device))
        print(f"{layout}: done in {time.perf_counter() - started:.0f} s", flush=True)
    cols = list(rows[0])
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        fields = cols + [k for r in rows for k in r if k not in cols]
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(fields)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
