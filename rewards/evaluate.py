"""Reward-model evaluation: pairwise accuracy (ties handled), calibration, reward distributions, reward-length
correlation (a reward-hacking signal), ensemble disagreement, and agreement with the embedded world's
annotators against their ceiling. Plain functions of reward tensors; plots are PNGs (matplotlib, Agg).

Conventions: ``chosen`` / ``rejected`` (N,) rewards of the two responses of N held-out pairs; ``tie`` (N,)
bool. "Strict" pairs are those not labelled a tie.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glmwb.rewards.losses import TIE_MODELS, outcome_probs


def _np(x: Tensor | Sequence[float] | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def pairwise_metrics(
    chosen: Tensor,
    rejected: Tensor,
    tie: Tensor,
    tie_model: str = "drop",
    tie_param: float | Tensor = 1.0,
) -> dict[str, float]:
    """Held-out pairwise metrics.

    - ``accuracy``: over strict pairs, P(r_c > r_r) (an exact score tie counts 1/2);
    - ``loss``: the mean negative log-likelihood of the labels under the tie model (ties included, except
      for "drop", which ignores them);
    - ``three_way_accuracy`` (tie models only): the label (win / tie / loss) is the most likely outcome;
    - ``tie_gap`` / ``strict_gap``: mean |r_c - r_r| on tie pairs / strict pairs (ties should be closer);
    - ``margin``: mean r_c - r_r over strict pairs.
    """
    tie = tie.bool()
    d = chosen.float() - rejected.float()
    strict = ~tie
    out: dict[str, float] = {
        "pairs": int(d.numel()),
        "strict_pairs": int(strict.sum()),
        "tie_pairs": int(tie.sum()),
    }
    if strict.any():
        ds = d[strict]
        out["accuracy"] = float(((ds > 0).float() + 0.5 * (ds == 0).float()).mean())
        out["margin"] = float(ds.mean())
        out["strict_gap"] = float(ds.abs().mean())
    if tie.any():
        out["tie_gap"] = float(d[tie].abs().mean())
    loss_fn = TIE_MODELS[tie_model]
    tp = torch.as_tensor(tie_param, dtype=torch.float32)
    out["loss"] = float(loss_fn(chosen.float(), rejected.float(), tie, tp))
    if tie_model != "drop":
        win, tied, lose = outcome_probs(d, tie_model, tp)
        predicted_tie = (tied > win) & (tied > lose)
        predicted_win = (win >= tied) & (win > lose)
        correct = torch.where(tie, predicted_tie, predicted_win)
        out["three_way_accuracy"] = float(correct.float().mean())
        out["mean_tie_prob_on_ties"] = float(tied[tie].mean()) if tie.any() else float("nan")
        out["mean_tie_prob_on_strict"] = float(tied[strict].mean()) if strict.any() else float("nan")
    return out


def calibration(chosen: Tensor, rejected: Tensor, tie: Tensor, n_bins: int = 10) -> dict[str, Any]:
    """Is sigma(r_a - r_b) the probability that a is preferred? Over strict pairs, each in both orientations
    (predicted p with outcome 1, and 1 - p with outcome 0), so the diagram is symmetric and no order bias
    creeps in. Returns bins (lower edge, mean predicted, observed frequency, count) and the expected
    calibration error ECE = sum_b (n_b / n) |observed_b - predicted_b|."""
    strict = ~tie.bool()
    p = torch.sigmoid(chosen.float()[strict] - rejected.float()[strict]).numpy()
    preds = np.concatenate([p, 1 - p])
    outcomes = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(preds, edges) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        pred, freq, n = float(preds[sel].mean()), float(outcomes[sel].mean()), int(sel.sum())
        bins.append({"lower": float(edges[b]), "predicted": pred, "observed": freq, "count": n})
        ece += n / len(preds) * abs(freq - pred)
    return {"bins": bins, "ece": ece, "n": int(len(p))}


def plot_reliability(
    cal: Mapping[str, Any], path: str | Path, title: str = "reward model calibration"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    xs = [b["predicted"] for b in cal["bins"]]
    ys = [b["observed"] for b in cal["bins"]]
    ax.plot(xs, ys, "o-", label=f"reward model (ECE {cal['ece']:.3f})")
    ax.set_ylabel("observed P(preferred)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    width = 1.0 / max(1, len(cal["bins"]) + 1)
    bars = axh.bar(
        [b["lower"] + width / 2 for b in cal["bins"]], [b["count"] for b in cal["bins"]], width=width * 0.9
    )
    axh.bar_label(bars, padding=1, fontsize=7)
    axh.margins(y=0.25)
    axh.set_xlabel("predicted P(preferred) = sigmoid(r_a - r_b)")
    axh.set_ylabel("pairs in the bin")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_distributions(
    chosen: Tensor,
    rejected: Tensor,
    path: str | Path,
    groups: Mapping[str, Tensor] | None = None,
    title: str = "reward distributions",
) -> Path:
    """Histograms of chosen vs rejected rewards; with ``groups`` (name -> rewards) a second panel per group
    (e.g. by response kind in the embedded world)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if groups else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    allr = np.concatenate([_np(chosen), _np(rejected)])
    bins = np.linspace(allr.min(), allr.max() + 1e-6, 40)
    ax.hist(_np(chosen), bins=bins, alpha=0.6, label="chosen")
    ax.hist(_np(rejected), bins=bins, alpha=0.6, label="rejected")
    ax.set_xlabel("reward (reward-model score)")
    ax.set_ylabel("responses")
    ax.set_title(title, fontsize=10)
    ax.legend()
    if groups:
        ax = axes[0, 1]
        for name, values in sorted(groups.items()):
            ax.hist(_np(values), bins=bins, alpha=0.5, label=f"{name} ({len(values)})", histtype="stepfilled")
        ax.set_xlabel("reward (reward-model score)")
        ax.set_ylabel("responses")
        ax.set_title("by kind of response (count in the legend)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def pearson(x, y) -> float:
    x, y = _np(x), _np(y)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    return pearson(_ranks(_np(x)), _ranks(_np(y)))


def length_correlation(
    chosen: Tensor, rejected: Tensor, chosen_len: Sequence[int], rejected_len: Sequence[int], tie: Tensor
) -> dict[str, float]:
    """Reward vs response length (tokens). High values mean the RM may be paying for length (a classic
    reward-hacking route for PPO). Reports Pearson / Spearman of reward and length over every response, of
    the reward gap and the length gap over pairs, and ``longer_wins``: how often the longer response is
    the chosen one among strict pairs (the accuracy of a length-only "reward model")."""
    rewards = np.concatenate([_np(chosen), _np(rejected)])
    lengths = np.concatenate([_np(chosen_len), _np(rejected_len)])
    d, dl = _np(chosen) - _np(rejected), _np(chosen_len) - _np(rejected_len)
    strict = ~_np(tie).astype(bool)
    differ = strict & (dl != 0)
    return {
        "pearson": pearson(rewards, lengths),
        "spearman": spearman(rewards, lengths),
        "gap_pearson": pearson(d, dl),
        "gap_spearman": spearman(d, dl),
        "longer_wins": float((dl[differ] > 0).mean()) if differ.any() else float("nan"),
    }


def length_baseline(
    chosen: Tensor,
    rejected: Tensor,
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    tie: Tensor,
    within: float = 0.1,
) -> dict[str, Any]:
    """What length alone gets on the same held-out pairs, and the RM's accuracy where length cannot help.

    Lengths are the two answers' lengths in characters (not tokens, so the figure does not depend on the
    tokenizer). Over strict pairs:

    - ``longer_wins``: the accuracy of the rule "the longer answer is the better one" (equal lengths 1/2), the
      baseline a reward model has to beat: on HH-RLHF helpful the chosen answer is the longer one in ~60 % of
      pairs, so an RM that only measures length scores that much;
    - ``balanced``: the pairs whose lengths differ by less than ``within`` (10 %) of the longer answer, where
      the rule is close to a coin: the RM's ``accuracy`` there (with its binomial standard error ``se``), and
      the rule's own ``longer_wins`` on them. An RM that learnt something besides length is above 0.5 here.
    """
    d = _np(chosen) - _np(rejected)
    lc, lr = _np(chosen_len), _np(rejected_len)
    strict = ~_np(tie).astype(bool)

    def acc(x: np.ndarray) -> float:
        return float(((x > 0) + 0.5 * (x == 0)).mean()) if x.size else float("nan")

    balanced = strict & (np.abs(lc - lr) < within * np.maximum(lc, lr))
    n = int(balanced.sum())
    rm = acc(d[balanced])
    return {
        "unit": "characters",
        "strict_pairs": int(strict.sum()),
        "longer_wins": acc((lc - lr)[strict]),
        "rm_accuracy": acc(d[strict]),
        "balanced": {
            "within": within,
            "pairs": n,
            "share": n / max(1, int(strict.sum())),
            "accuracy": rm,
            "se": math.sqrt(rm * (1 - rm) / n) if n else float("nan"),
            "longer_wins": acc((lc - lr)[balanced]),
        },
    }


def length_baseline_line(b: Mapping[str, Any]) -> str:
    """One line beside the RM's accuracy: the length-only baseline and the length-balanced accuracy."""
    bal = b["balanced"]
    line = f"longer answer wins {b['longer_wins']:.3f} (the RM {b['rm_accuracy'] - b['longer_wins']:+.3f} over it)"
    if bal["pairs"]:
        line += (
            f"; length-balanced (answers within {bal['within']:.0%} in length, {bal['pairs']} pairs): "
            f"RM {bal['accuracy']:.3f} ± {bal['se']:.3f}, longer wins {bal['longer_wins']:.3f}"
        )
    else:
        line += "; no length-balanced pairs"
    return line


def ensemble_disagreement(
    member_chosen: Tensor, member_rejected: Tensor, tie: Tensor | None = None
) -> dict[str, float]:
    """Disagreement among M reward models on N pairs; member_chosen / member_rejected (M, N).

    Rewards are standardised per member first (BT rewards have no shared offset or scale). Reports the
    mean per-response std across members, the fraction of (strict) pairs on which members disagree about
    the winner, the accuracy of the ensemble mean, and the Spearman correlation between a pair's
    disagreement (std of the members' gaps) and the ensemble being wrong on it: positive means
    disagreement flags the pairs where the ensemble errs (useful to route pairs to people, and to cap
    rewards PPO may exploit).
    """
    c, r = member_chosen.float(), member_rejected.float()
    both = torch.cat([c, r], dim=1)  # (M, 2N)
    mu, sd = both.mean(1, keepdim=True), both.std(1, keepdim=True).clamp(min=1e-6)
    c, r = (c - mu) / sd, (r - mu) / sd
    gaps = c - r  # (M, N)
    strict = torch.ones(c.shape[1], dtype=torch.bool) if tie is None else ~tie.bool()
    signs = gaps[:, strict] > 0
    split = ~(signs.all(0) | (~signs).all(0))
    mean_gap = gaps.mean(0)
    wrong = (mean_gap[strict] <= 0).float()
    return {
        "members": int(c.shape[0]),
        "response_std": float(torch.cat([c, r], 1).std(0).mean()),
        "pairs_split": float(split.float().mean()) if split.numel() else float("nan"),
        "ensemble_accuracy": float(1 - wrong.mean()) if wrong.numel() else float("nan"),
        "disagreement_error_spearman": spearman(gaps[:, strict].std(0), wrong),
    }


# ----------------------------------------------------------------------------------------------------------
# The embedded world: agreement with the simulated annotators and their ceiling


def world_agreement(records: Sequence[Any], chosen: Tensor, rejected: Tensor) -> dict[str, Any]:
    """Accuracy of the RM against held-out simulated-annotator labels, next to their agreement ceiling.

    ``records``: ``PreferenceRecord``s from ``annotation.annotators.preference_pairs`` (provenance has ``label``,
    ``rule_choice``, ``noise``, ``kinds``, ``family``). The ceiling (``agreement_ceiling(p, "pairwise")``)
    is defined over pairs where both the annotator's label and the noise-free rule are strict, so the
    accuracy compared with it is over exactly those pairs: ``accuracy_vs_annotators`` and
    ``ceiling`` (the mean ceiling of the labelling annotators), and ``fraction_of_ceiling``.
    ``accuracy_vs_rule`` scores the same pairs against the noise-free rule (its ceiling is 1).
    ``fraction_of_ceiling_ci95``: a 95 % Wilson interval of the accuracy (scipy's ``binomtest``; an exact
    reward tie counts half and is rounded into the count) divided by the ceiling — on ~640 pairs it spans
    about ±2.5 points, so a figure a point from a target says little on its own.
    ``by_kinds`` breaks the rule accuracy down by the kinds compared ("correct>wrong", ...).
    """
    from glmwb.annotation.annotators import agreement_ceiling

    d = _np(chosen) - _np(rejected)
    agree_ann, agree_rule, ceilings = [], [], []
    by_kinds: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    for r, gap in zip(records, d, strict=True):
        prov = r.provenance
        if r.tie or prov.get("rule_choice") not in ("chosen", "rejected"):
            continue
        correct_ann = 1.0 if gap > 0 else 0.5 if gap == 0 else 0.0
        rule_is_chosen = prov["rule_choice"] == "chosen"
        correct_rule = correct_ann if rule_is_chosen else 1.0 - correct_ann
        agree_ann.append(correct_ann)
        agree_rule.append(correct_rule)
        ceilings.append(agreement_ceiling(prov["noise"], "pairwise"))
        better, worse = prov["kinds"] if rule_is_chosen else prov["kinds"][::-1]
        by_kinds[f"{better}>{worse}"].append(correct_rule)
        by_family[prov.get("family", "?")].append(correct_rule)
    if not agree_ann:
        return {"pairs": 0}
    from scipy.stats import binomtest

    acc, ceiling = float(np.mean(agree_ann)), float(np.mean(ceilings))
    ci = binomtest(round(sum(agree_ann)), len(agree_ann)).proportion_ci(0.95, method="wilson")
    return {
        "pairs": len(agree_ann),
        "accuracy_vs_annotators": acc,
        "accuracy_vs_annotators_ci95": [float(ci.low), float(ci.high)],
        "ceiling": ceiling,
        "fraction_of_ceiling": acc / ceiling,
        "fraction_of_ceiling_ci95": [float(ci.low) / ceiling, float(ci.high) / ceiling],
        "accuracy_vs_rule": float(np.mean(agree_rule)),
        "by_kinds": {
            k: {"accuracy": float(np.mean(v)), "pairs": len(v)} for k, v in sorted(by_kinds.items())
        },
        "by_family": {
            k: {"accuracy": float(np.mean(v)), "pairs": len(v)} for k, v in sorted(by_family.items())
        },
    }


def response_logprobs(
    folder: str | Path, records: Sequence[Any], max_length: int = 1024, batch_tokens: int = 4096
) -> tuple[Tensor, Tensor]:
    """Σ log π(response | prompt) (terminator included) of each record's chosen and rejected response under
    the causal LM in ``folder``: (N,) each, fp32. Prompts longer than ``max_length`` minus the longer
    response lose tokens on the left; a response longer than ``max_length`` keeps its first tokens.
    Packed (padding-free) batches of about ``batch_tokens`` tokens, through align.packed_dpo."""
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.packing import PairTokens, encode_pair, pack_batch, pair_logps
    from glmwb.pretrain.run import load_tokenizer

    model = load_pretrained(folder).eval()
    if model.lm_head is None:
        raise ValueError(f"likelihood baseline: {folder} has no language-model head (a causal-LM GLM folder)")
    tok = load_tokenizer(str(folder))
    pairs = []
    for r in records:
        p = encode_pair(tok, r.prompt, r.chosen, r.rejected)
        chosen, rejected = p.chosen_ids[:max_length], p.rejected_ids[:max_length]
        keep = max(1, max_length - max(len(chosen), len(rejected)))
        pairs.append(PairTokens(p.prompt_ids[-keep:], chosen, rejected))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    chosen_lp, rejected_lp = [], []
    start = 0
    with torch.no_grad():
        while start < len(pairs):
            end, used = start, 0
            while end < len(pairs) and (end == start or used + pairs[end].num_tokens <= batch_tokens):
                used += pairs[end].num_tokens
                end += 1
            c, j = pair_logps(
                model, pack_batch(pairs[start:end], pad_id, row_tokens=max(256, batch_tokens // 4))
            )
            chosen_lp.append(c.float().cpu())
            rejected_lp.append(j.float().cpu())
            start = end
    return torch.cat(chosen_lp), torch.cat(rejected_lp)


def likelihood_baseline(folder: str | Path, records: Sequence[Any], max_length: int = 1024) -> dict[str, Any]:
    """A zero-training "reward model": the causal LM's own Σ log π(response | prompt). Reports its pairwise
    accuracy on ``records`` (and, for the embedded world, its agreement with the annotators against their
    ceiling), to set beside the trained RM's: an RM that does not beat it has learnt nothing the LM it
    started from did not already rank. (Summed, not length-normalised: it also prefers shorter answers.)"""
    chosen, rejected = response_logprobs(folder, records, max_length)
    tie = torch.tensor([bool(r.tie) for r in records], dtype=torch.bool)
    out: dict[str, Any] = {"model": str(folder), "pairwise": pairwise_metrics(chosen, rejected, tie)}
    if records and records[0].provenance.get("source") == "world":
        out["world"] = world_agreement(records, chosen, rejected)
    return out


def format_summary(metrics: Mapping[str, Any]) -> str:
    """One line for logs: accuracy, loss, ECE, length correlation."""
    parts = []
    for key, label in (("accuracy", "acc"), ("three_way_accuracy", "3-way"), ("loss", "loss")):
        if key in metrics and not math.isnan(metrics[key]):
            parts.append(f"{label} {metrics[key]:.3f}")
    if "calibration" in metrics:
        parts.append(f"ECE {metrics['calibration']['ece']:.3f}")
    if "length" in metrics:
        parts.append(f"reward-length spearman {metrics['length']['spearman']:.2f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Everything at once, for a saved reward folder


def evaluate_folder(
    folder: str | Path,
    records: Sequence[Any],
    pairs: Sequence[Any],
    out_dir: str | Path,
    members: Sequence[str | Path] = (),
    bins: int = 10,
) -> dict[str, Any]:
    """Score held-out ``pairs`` (``data.EncodedPair``, from ``records``) with the reward folder, and write
    ``metrics.json``, ``reliability.png`` and ``distributions.png`` into ``out_dir``. ``members``: more reward
    folders, for ensemble disagreement (the first member is ``folder`` itself)."""
    from glmwb.rewards.ensemble import RewardEnsemble, load_reward_model
    from glmwb.rewards.model import RewardModel, score_sequences

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_reward_model(folder)  # an ensemble folder is scored as its ensemble
    info = model.info
    pad_id = _pad_id(folder)

    def score(m: RewardModel) -> tuple[Tensor, Tensor]:
        r = score_sequences(m, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id)[:, 0]
        return r[: len(pairs)], r[len(pairs) :]

    chosen, rejected = score(model)
    tie = torch.tensor([p.tie for p in pairs], dtype=torch.bool)
    tie_param = info.tie_params[0] if info.tie_params else 1.0
    report: dict[str, Any] = {"pairwise": pairwise_metrics(chosen, rejected, tie, info.tie_model, tie_param)}
    report["calibration"] = calibration(chosen, rejected, tie, bins)
    model_line = f"{folder} on {len(pairs)} held-out pairs"
    plot_reliability(
        report["calibration"], out_dir / "reliability.png", f"reward model calibration\n{model_line}"
    )
    groups: dict[str, list[float]] = defaultdict(list)
    for r, c, j in zip(records, chosen.tolist(), rejected.tolist(), strict=True):
        kinds = r.provenance.get("kinds")
        if kinds:
            groups[kinds[0]].append(c)
            groups[kinds[1]].append(j)
    plot_distributions(
        chosen,
        rejected,
        out_dir / "distributions.png",
        {k: torch.tensor(v) for k, v in groups.items()} or None,
        title=f"held-out rewards: chosen vs rejected\n{model_line}",
    )
    report["reward_by_group"] = {
        k: {"mean": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())
    }
    report["length"] = length_correlation(
        chosen, rejected, [len(p.chosen_ids) for p in pairs], [len(p.rejected_ids) for p in pairs], tie
    )
    report["length_baseline"] = length_baseline(
        chosen, rejected, [len(r.chosen) for r in records], [len(r.rejected) for r in records], tie
    )
    if records and records[0].provenance.get("source") == "world":
        report["world"] = world_agreement(records, chosen, rejected)
    if (
        isinstance(model, RewardEnsemble) and not members
    ):  # its own members' disagreement, each one's accuracy
        scores = [score(m) for m in model.members]
        report["ensemble"] = ensemble_disagreement(
            torch.stack([c for c, _ in scores]), torch.stack([r for _, r in scores]), tie
        )
        report["ensemble"]["member_accuracy"] = [
            pairwise_metrics(c, r, tie, info.tie_model, tie_param)["accuracy"] for c, r in scores
        ]
        if "world" in report:
            report["ensemble"]["member_fraction_of_ceiling"] = [
                world_agreement(records, c, r).get("fraction_of_ceiling") for c, r in scores
            ]
    elif members:
        scores = [score(RewardModel.from_pretrained(m)) for m in members]
        report["ensemble"] = ensemble_disagreement(
            torch.stack([chosen, *[c for c, _ in scores]]),
            torch.stack([rejected, *[r for _, r in scores]]),
            tie,
        )
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _pad_id(folder: str | Path) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("pad_token_id") is None:
        raise ValueError(
            f"{folder}: config.json has no pad_token_id (save the reward model with its tokenizer)"
        )
    return int(config["pad_token_id"])
