"""Curves of a PPO run (metrics.jsonl -> training.png): reward, held-out accuracy, KL, entropy, clipping,
value fit, response length, and where the time goes."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward (raw score)", ["reward/score_mean"], "reward/score_std"),
    ("held-out accuracy", ["eval/accuracy"], None),
    ("KL to reference (nats / response)", ["kl/seq_k1", "kl/seq_k3"], None),
    ("KL coefficient", ["kl/coef"], None),
    ("entropy (nats / token)", ["policy/entropy"], None),
    ("clipping and approx KL", ["policy/clipfrac", "policy/approx_kl", "value/vf_clipfrac"], None),
    ("value fit", ["value/loss", "value/explained_variance"], None),
    ("response", ["response/length_mean", "response/terminated"], None),
    ("reward-length correlation", ["reward/length_corr"], None),
)
TIMES = ("time/generation", "time/scoring", "time/inference", "time/training")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """A grid of the main curves; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(18, 11))
    axes = axes.flatten()
    for ax, (title, keys, band) in zip(axes, PANELS, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key.split("/")[-1])
                if band and key == keys[0]:
                    sd = [r.get(band) or 0.0 for r in rows if r.get(key) is not None and "step" in r]
                    ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)],
                                    [y + s for y, s in zip(ys, sd, strict=True)], alpha=0.2)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    ax = axes[len(PANELS)]
    steps = [r["step"] for r in rows if "time/training" in r]
    bottom = [0.0] * len(steps)
    for key in TIMES:
        ys = [r.get(key) or 0.0 for r in rows if "time/training" in r]
        ax.bar(steps, ys, bottom=bottom, label=key.split("/")[-1], width=1.0)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_title("time per step (s)")
    ax.set_xlabel("PPO step")
    ax.legend(fontsize=8)
    for ax in axes[len(PANELS) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
