"""Held-out loss by position: how a model does past the sequence length it was trained at, before and after
a long-context stage (recipes/pretrain_long.yaml). Rows of a packed held-out set are read as one stream
each (no document mask: positions run 0 .. seq_len - 1), the next-token loss is averaged per position over
the rows and reported per bucket of positions, printed, written as JSON and plotted.

    python -m glmwb.pretrain.long_context --model base=runs/lc/base/final --model long=runs/lc/long/final \\
        --model base_theta1e5=runs/lc/base/final,rope_theta=100000 \\
        --data runs/lc/long/data/heldout --train-len 128 --out docs/results/data/long-context
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def loss_by_position(model, dataset, rows: int, batch_size: int = 4) -> np.ndarray:
    """Mean next-token loss (nats) at each position 1 .. seq_len - 1 over the first ``rows`` rows, each one
    stream; (seq_len - 1,), NaN where no target was counted."""
    model.eval()
    n = min(rows, len(dataset))
    total = torch.zeros(dataset.seq_len - 1, dtype=torch.float64)
    count = torch.zeros_like(total)
    for start in range(0, n, batch_size):
        batch = dataset.batch(np.arange(start, min(start + batch_size, n)))
        logits = model(batch["input_ids"]).logits.float()  # (B, T, V), positions 0..T-1
        targets = batch["input_ids"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (B, T - 1)
        total += loss.sum(0).double()
        count += loss.shape[0]
    return (total / count.clamp(min=1)).numpy()


def buckets(curve: np.ndarray, width: int) -> list[tuple[int, int, float]]:
    """(first position, last position, mean loss) per ``width`` positions; the curve's index i is the
    prediction made at position i (of token i + 1)."""
    return [(s, min(s + width, len(curve)) - 1, float(np.mean(curve[s : s + width])))
            for s in range(0, len(curve), width)]  # fmt: skip


def plot(curves: dict[str, np.ndarray], train_len: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        smooth = np.convolve(curve, np.ones(8) / 8, mode="valid")  # 8-position moving mean
        ax.plot(np.arange(len(smooth)) + 4, smooth, label=name)
    ax.axvline(train_len, color="grey", linestyle="--", label=f"base training length ({train_len})")
    ax.set_xlabel("position in the row")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from glmwb.pretrain.data import load_packed
    from glmwb.pretrain.hf import load_pretrained

    p = argparse.ArgumentParser(description="Held-out loss by position, before and after context extension.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR[,rope_theta=X]")
    p.add_argument("--data", required=True, help="a packed held-out folder (meta.json, tokens.npy)")
    p.add_argument("--train-len", type=int, required=True, help="the base model's training length")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data, out = load_packed(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, table = {}, {}
    for spec in args.model:
        name, _, rest = spec.partition("=")
        folder, *changes = rest.split(",")  # DIR,rope_theta=100000: that model with other rotary settings
        model = load_pretrained(folder)
        if changes:
            model.config = model.config.with_(**{k: float(v) for k, v in (c.split("=") for c in changes)})
        curves[name] = loss_by_position(model, data, args.rows)
        table[name] = {
            "rope_theta": model.config.rope_theta,
            "rope_scaling_factor": model.config.rope_scaling_factor,
            "within_train_len": float(np.mean(curves[name][: args.train_len - 1])),
            "beyond_train_len": float(np.mean(curves[name][args.train_len - 1 :])),
            "buckets": buckets(curves[name], args.train_len // 2),
        }
    print(f"held-out loss (nats/token), {min(args.rows, len(data))} rows of {data.seq_len} tokens; "
          f"base trained at {args.train_len}")  # fmt: skip
    print(
        f"{'model':<16}{'pos < ' + str(args.train_len):>12}{'pos >= ' + str(args.train_len):>12}  by bucket"
    )
    for name, t in table.items():
        by = " ".join(f"{b[2]:.2f}" for b in t["buckets"])
        print(f"{name:<16}{t['within_train_len']:>12.3f}{t['beyond_train_len']:>12.3f}  {by}")
    (out / "loss_by_position.json").write_text(json.dumps(table, indent=1))
    plot(curves, args.train_len, out / "loss_by_position.png",
         f"held-out loss by position at {data.seq_len} tokens ({args.train_len} trained)")  # fmt: skip
    print(f"→ {out / 'loss_by_position.json'}, {out / 'loss_by_position.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
