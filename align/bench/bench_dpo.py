"""Packed (padding-free) vs padded DPO on length-varied pairs: tokens/s and peak memory, side by side.

    python -m glmwb.align.bench.bench_dpo                      # CPU, small shapes (about a minute on 2 cores)
    python -m glmwb.align.bench.bench_dpo --device cuda --hidden 1024 --layers 12 --pairs 32 --max-len 1024

One step = the policy's forward and backward on a batch of pairs (chosen and rejected sequences of each
pair) and the sigmoid DPO loss against fixed reference log-probs: the work that differs between the
layouts (reference log-probs are one no-grad pass in both, precomputed or not). The two layouts see the
same batches: ``padded`` is TRL's (one row per sequence, right padding to the longest), ``packed`` ours
(``align.packed_dpo.pack_batch``: sequences concatenated into rows of ``--row-tokens`` with doc ids).

tokens/s counts real (non-padding) tokens. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on a CPU each layout runs in its own fresh process and reports its peak RSS
(``ru_maxrss``) above its RSS once model and batches are built, so the two numbers do not share a peak.
Prints a table with the packed / padded ratios and writes a CSV (``--csv``).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch


def length_varied_pairs(n: int, min_len: int, max_len: int, vocab: int, seed: int):
    """Pairs with prompt and response lengths drawn log-uniformly (many short, a few long sequences)."""
    from glmwb.pretrain.packing import PairTokens

    rng = random.Random(seed)

    def draw(lo: int, hi: int) -> int:
        return int(round(lo * (hi / lo) ** rng.random()))

    def ids(k: int) -> tuple[int, ...]:
        return tuple(rng.randrange(10, vocab) for _ in range(k))

    out = []
    for _ in range(n):
        prompt = draw(max(2, min_len // 2), max(3, max_len // 4))
        out.append(
            PairTokens(
                ids(prompt), ids(draw(min_len, max_len - prompt)), ids(draw(min_len, max_len - prompt))
            )
        )
    return out


def _measure(mode: str, a: dict[str, Any]) -> dict[str, Any]:
    """Time ``a['steps']`` DPO steps of one layout; runs in a fresh process on a CPU."""
    import psutil

    from glmwb.align.packed_dpo import PairLogps, preference_loss
    from glmwb.pretrain.config import GLMConfig
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.packing import make_batch, pair_logps

    torch.set_num_threads(a["threads"])
    device = torch.device(a["device"])
    cfg = GLMConfig(
        vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["hidden"] * 8 // 3 // 8 * 8,
        num_layers=a["layers"], num_heads=a["hidden"] // 64, num_kv_heads=max(1, a["hidden"] // 256),
        head_dim=64, max_position_embeddings=max(2048, 2 * a["max_len"]),
    )  # fmt: skip
    torch.manual_seed(0)
    model = GLM(cfg).to(device)
    if a["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # stepping is the same for both layouts: keep it cheap
    batches = []
    for b in range(a["steps"] + 1):
        pairs = length_varied_pairs(a["pairs"], a["min_len"], a["max_len"], a["vocab"], seed=b)
        batches.append((make_batch(pairs, 0, mode == "packed", a["row_tokens"]).to(device), len(pairs)))
    ref = torch.zeros(a["pairs"], device=device)

    def step(batch, n) -> int:
        c, r = pair_logps(model, batch)
        lens = batch.lengths.to(device).float()
        loss = preference_loss("sigmoid", PairLogps(c, r, ref[:n], ref[:n], lens[0::2], lens[1::2]), 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch.real_tokens

    rss_before = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    step(*batches[0])  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens, slots, t0 = 0, 0, time.perf_counter()
    for batch, n in batches[1:]:
        tokens += step(batch, n)
        slots += batch.input_ids.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {
        "layout": mode,
        "device": a["device"],
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "pairs_per_step": a["pairs"],
        "steps": a["steps"],
        "real_tokens_per_step": tokens / a["steps"],
        "slots_per_step": slots / a["steps"],  # tokens including padding
        "padding_fraction": 1 - tokens / slots,
        "ms_per_step": 1000 * seconds / a["steps"],
        "tokens_per_s": tokens / seconds,
        "peak_mem_MiB": peak / 2**20,
    }


def run(a: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for mode in ("padded", "packed"):
        if a["device"] == "cuda":
            rows.append(_measure(mode, a))
        else:
            with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: its own peak RSS
                rows.append(pool.apply(_measure, (mode, a)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=16, help="pairs per step")
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-len", type=int, default=384, help="longest prompt + response")
    p.add_argument("--row-tokens", type=int, default=512, help="packed row length")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", default="runs/bench/dpo_packed_vs_padded.csv")
    a = vars(p.parse_args(argv))
    if a["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    rows = run(a)
    pad, pack = rows
    print(f"\nDPO step, {pad['params_M']}M-parameter GLM, {a['pairs']} pairs of {a['min_len']}..{a['max_len']} "
          f"tokens (log-uniform), {a['device']} {a['dtype']}, {a['threads']} threads:")  # fmt: skip
    print(
        f"{'layout':8} {'real tok/step':>13} {'padding':>8} {'ms/step':>9} {'tokens/s':>10} {'peak MiB':>9}"
    )
    for r in rows:
        print(f"{r['layout']:8} {r['real_tokens_per_step']:13.0f} {r['padding_fraction']:8.1%} "
              f"{r['ms_per_step']:9.1f} {r['tokens_per_s']:10.0f} {r['peak_mem_MiB']:9.1f}")  # fmt: skip
    speed = pack["tokens_per_s"] / pad["tokens_per_s"]
    mem = pack["peak_mem_MiB"] / max(pad["peak_mem_MiB"], 1e-9)
    print(f"packed / padded: tokens/s x{speed:.2f}, peak memory x{mem:.2f}")
    out = Path(a["csv"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "speedup_vs_padded", "memory_vs_padded"])
        w.writeheader()
        for r in rows:
            own = r["layout"] == "packed"
            w.writerow(
                {**r, "speedup_vs_padded": speed if own else 1.0, "memory_vs_padded": mem if own else 1.0}
            )
    print(f"CSV → {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
