"""Curves of a PPO run (metrics.jsonl -> training.png), one quantity per panel: reward, held-out accuracy, KL,
its coefficient, entropy, clipping, approximate KL, value fit, response length, termination, reward-length
correlation, and where the time goes. Drawn by the run folder's one plotter (pretrain/run_folder.py)."""

from __future__ import annotations

from pathlib import Path

from glmwb.pretrain.run_folder import Curve, Panel, plot_curves, read_metrics

PANELS = (
    Panel("reward of the rollouts", "raw score (mean ± 1 std)",
          (Curve("reward/score_mean", "score", band="reward/score_std"),)),
    Panel("held-out accuracy", "share of greedy answers right",
          (Curve("eval/accuracy", "held-out prompts", markers=True),), share=True),
    Panel("KL to the reference", "KL (nats / response)",
          (Curve("kl/seq_k1", "k1"), Curve("kl/seq_k3", "k3"))),
    Panel("KL coefficient", "β", (Curve("kl/coef", "β (KL controller)"),)),
    Panel("policy entropy", "entropy (nats / token)", (Curve("policy/entropy", "rollout tokens"),)),
    Panel("clipping", "fraction of tokens clipped",
          (Curve("policy/clipfrac", "policy ratio"), Curve("value/vf_clipfrac", "value")), share=True),
    Panel("approximate KL of the update", "KL (nats / token)",
          (Curve("policy/approx_kl", "old vs new policy"),)),
    Panel("value loss", "squared error (normalised reward units²)", (Curve("value/loss", "value loss"),)),
    Panel("value fit", "explained variance of the returns",
          (Curve("value/explained_variance", "explained variance"),)),
    Panel("response length", "mean length (tokens)", (Curve("response/length_mean", "rollouts"),)),
    Panel("termination", "share of responses ending with a terminator",
          (Curve("response/terminated", "terminated"),), share=True),
    Panel("reward-length correlation", "Pearson r (score vs length)", (Curve("reward/length_corr", "r"),)),
    Panel("time per step by phase", "mean seconds per step",
          tuple(Curve(f"time/{k}", k) for k in ("generation", "scoring", "inference", "training")),
          bars=True),
)  # fmt: skip


def plot_training(metrics_path: str | Path, out_png: str | Path, title: str = "PPO") -> Path | None:
    """A grid of the curves in metrics.jsonl; None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    return plot_curves(rows, out_png, PANELS, title, xlabel="PPO step", ncols=4) if rows else None
