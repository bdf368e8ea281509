"""Alignment methods side by side at equal compute: the budget scheduler, KL to the start policy, the table.

``glmwb compare-methods`` (``recipes/compare_methods.py``) trains every method from one SFT policy; this
module holds the pieces that do not need the recipe layer:

- **the equal-budget scheduler**: ``budget_overrides(stage, steps, rounds)`` sets one stage's training budget
  to ``steps`` training steps (DPO / KTO: optimizer steps; iterative DPO: ``rounds`` rounds of
  ``steps / rounds``; PPO: rollout-and-update steps; GRPO: optimizer steps), with no wall-clock cap, and
  turns the stage's own evaluation off (the comparison evaluates every policy once, on the same prompts);
  ``planned_steps(recipe)`` reads a built stage recipe's budget back, and ``budget_record(summary)`` what
  a finished run trained (``pretrain.run_folder.Budget``); ``check_same_budget`` says which did not train
  the same number of steps;
- **KL to the start policy**: ``kl_to_reference`` — answers sampled from the policy (temperature 1), the
  mean of log π(y|x) − log π_ref(y|x) over them (the k1 estimator of KL(π ‖ π_ref), nats per answer);
- **the table**: ``comparison_rows`` / ``format_comparison`` / ``plot_comparison_bars``: greedy and sampled
  accuracy with the paired tests over question instances against SFT (``align.evaluate.compare``), KL,
  answer length, RM reward, training time — a mean over seeds, and its spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# a stage's budget keys: (steps key, wall-clock key), and the overrides that turn its own evaluation off
_STEPS = {
    "dpo": ("train.max_steps", "train.max_minutes"),
    "online_dpo": ("train.max_steps", "train.max_minutes"),
    "ppo": ("train.steps", "train.max_minutes"),
    "grpo": ("train.max_steps", "train.max_minutes"),
}
_NO_EVAL = {
    "dpo": {"eval.world_prompts": 0},
    "online_dpo": {"eval.world_prompts": 0},
    "ppo": {"eval.before": False, "eval.after": False, "train.eval_every": 0, "train.save_every": 0,
            "train.sample_every": 0, "eval.samples": 0},
    "grpo": {"eval.heldout_prompts": 0, "eval.before": False},
}  # fmt: skip
BUDGETED_STAGES = tuple(_STEPS)


def budget_overrides(stage: str, steps: int, rounds: int = 1) -> dict[str, Any]:
    """Overrides that give a ``stage`` recipe a budget of ``steps`` training steps (in ``rounds`` equal
    rounds for iterative DPO) and no wall-clock cap, its own evaluation off."""
    if stage not in _STEPS:
        raise ValueError(f"no step budget for stage {stage!r}; budgeted stages: {', '.join(BUDGETED_STAGES)}")
    if steps < 1:
        raise ValueError(f"budget.steps must be >= 1, got {steps}")
    steps_key, minutes_key = _STEPS[stage]
    out: dict[str, Any] = {minutes_key: None, **_NO_EVAL[stage]}
    if stage == "online_dpo":
        if rounds < 1 or steps % rounds:
            raise ValueError(f"iterative DPO: {rounds} rounds do not divide the budget of {steps} steps")
        out.update({"rounds.rounds": rounds, steps_key: steps // rounds})
    else:
        out[steps_key] = steps
    return out


def planned_steps(recipe) -> int:
    """The training steps a built stage recipe plans (iterative DPO: all rounds together)."""
    if recipe.stage == "online_dpo":
        return recipe.rounds.rounds * recipe.train.max_steps
    if recipe.stage == "ppo":
        return recipe.train.steps
    if recipe.stage in ("dpo", "grpo"):
        return recipe.train.max_steps
    raise ValueError(f"no step budget for stage {recipe.stage!r}")


def budget_record(summary: dict[str, Any]) -> dict[str, Any]:
    """A finished stage's budget record (planned_steps, steps_done, stopped_early) from its summary."""
    b = summary.get("budget")
    if not b:
        raise ValueError("the stage's summary has no budget record")
    return b


def check_same_budget(done: dict[str, dict[str, Any]], steps: int) -> list[str]:
    """The runs (name -> budget record) that did not train exactly ``steps`` steps, each with a reason."""
    out = []
    for name, b in done.items():
        if b.get("planned_steps") != steps:
            out.append(f"{name}: planned {b.get('planned_steps')} steps, not {steps}")
        elif b.get("steps_done") != steps:
            out.append(f"{name}: {b.get('line') or b.get('steps_done')}")
    return out


# -- KL to the start policy ----------------------------------------------------------------------------------


def sequence_logps(
    model, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], pad: int = 0
):
    """log π(answer | prompt) per row, summed over the answer's tokens (a (N,) tensor)."""
    import torch

    from glmwb.pretrain.packing import PairTokens, pack_batch, pair_logps

    pairs = [PairTokens(tuple(p), tuple(a), tuple(a)) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            chunk = pairs[i : i + 16]
            longest = max(len(x.prompt_ids) + len(x.chosen_ids) for x in chunk)
            c, _ = pair_logps(model, pack_batch(chunk, pad, row_tokens=max(64, 2 * longest)))
            out.append(c.float())
    return torch.cat(out)


def kl_to_reference(
    model,
    ref,
    tok,
    prompts: Sequence[Sequence[dict]],
    samples: int = 2,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict[str, float]:
    """KL(π ‖ π_ref) on ``prompts``: ``samples`` temperature-1 answers per prompt drawn from ``model`` (the
    sampled tokens themselves, the stop token included when one was hit), the mean over them of
    log π(y|x) − log π_ref(y|x) (nats per answer), with its standard error."""
    from glmwb.pretrain.generate import generate
    from glmwb.pretrain.tokenizer import render_chat, turn_terminator_ids

    ids = [
        tok(render_chat(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    xs, ys = [], []
    for k in range(samples):
        got = generate(model, ids, max_new_tokens, temperature=1.0, stop_token_ids=turn_terminator_ids(tok),
                       pad_token_id=pad, seed=seed + 104729 * (k + 1))  # fmt: skip
        keep = [(x, y) for x, y in zip(ids, got, strict=True) if y]
        xs += [x for x, _ in keep]
        ys += [y for _, y in keep]
    d = (sequence_logps(model, xs, ys, pad) - sequence_logps(ref, xs, ys, pad)).tolist()
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"kl": mean, "kl_se": se, "n": n}


# -- the table -----------------------------------------------------------------------------------------------


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def comparison_rows(per_seed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per method from its per-seed results (each: report, comparison against SFT or None, kl,
    seconds, variant): means over seeds (and the spread of accuracy), the paired tests of every seed."""
    rows = []
    for name, runs in per_seed.items():
        rep = lambda k, rs=runs: [r["report"].get(k) for r in rs]  # noqa: E731
        row: dict[str, Any] = {"method": name, "seeds": len(runs), "variant": runs[0].get("variant") or "—"}
        row["accuracy"], row["accuracy_sd"] = _ms(rep("accuracy"))
        row["sample_accuracy"], row["sample_accuracy_sd"] = _ms(rep("sample_accuracy"))
        row["mean_chars"] = _ms(rep("mean_chars"))[0]
        row["reward_mean"] = _ms(rep("reward_mean"))[0]
        row["kl"] = _ms([r.get("kl") for r in runs])[0]
        row["seconds"] = _ms([r.get("seconds") for r in runs])[0]
        cmps = [r["comparison"] for r in runs if r.get("comparison")]
        row["greedy_delta"] = [c.get("accuracy_delta") for c in cmps]
        row["sampled_delta"] = [c.get("sample_accuracy_delta") for c in cmps]
        tests = [c["by_instance"] for c in cmps]
        row["greedy_p"] = [t["greedy_p"] for t in tests]
        row["sampled_p"] = [t.get("sampled_p") for t in tests]
        row["up_down"] = [(t["up"], t["down"]) for t in tests]
        rows.append(row)
    return rows


def _f(x: float, fmt: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ps(ps: Sequence[float | None]) -> str:
    ps = [p for p in ps if p is not None]
    return ", ".join(("**" + _f(p, ".2g") + "**") if p < 0.05 else _f(p, ".2g") for p in ps) or "—"


def format_comparison(rows: list[dict[str, Any]], baseline: str = "sft") -> str:
    """The Markdown table: per method the mean over seeds (± the seeds' standard deviation) and each seed's
    Wilcoxon p-value over question instances against ``baseline`` (bold below 0.05)."""
    head = ["method", "variant (chosen on dev)", "seeds", "greedy acc", "sampled acc",
            f"greedy p vs {baseline} (per seed)", f"sampled p vs {baseline} (per seed)", "KL to SFT (nats)",
            "answer chars", "RM reward", "train s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["method"], str(r["variant"]), str(r["seeds"]),
            f"{_f(r['accuracy'])} ± {_f(r['accuracy_sd'])}",
            f"{_f(r['sample_accuracy'])} ± {_f(r['sample_accuracy_sd'])}",
            _ps(r["greedy_p"]), _ps(r["sampled_p"]), _f(r["kl"], ".2f"), _f(r["mean_chars"], ".1f"),
            _f(r["reward_mean"]), _f(r["seconds"], ".0f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sweeps(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """Each swept method's variants with their greedy accuracy on ``dev`` (the one kept marked), as Markdown;
    a two-key grid as a matrix (first key down, second across)."""
    out = []
    for name, tried in sweeps.items():
        best = max(range(len(tried)), key=lambda i: (tried[i]["dev_accuracy"], -i))
        keys = list(dict.fromkeys(k for t in tried for k in t["variant"]))
        out.append(f"\n{name}: greedy accuracy on dev per variant (kept: **bold**)\n")
        marks = [f"{t['dev_accuracy']:.3f}" for t in tried]
        marks[best] = f"**{marks[best]}**"
        grid = {tuple(t["variant"].get(k) for k in keys): i for i, t in enumerate(tried)}
        if len(keys) == 2 and len(grid) == len(tried):
            rows_v = list(dict.fromkeys(v[0] for v in grid))
            cols_v = list(dict.fromkeys(v[1] for v in grid))
            out.append(f"| {keys[0]} \\ {keys[1]} | " + " | ".join(map(str, cols_v)) + " |")
            out.append("|" + "---|" * (len(cols_v) + 1))
            for r in rows_v:
                cells = [marks[grid[(r, c)]] if (r, c) in grid else "—" for c in cols_v]
                out.append(f"| {r} | " + " | ".join(cells) + " |")
        else:
            out.append("| variant | dev greedy acc |")
            out.append("|---|---|")
            for i, t in enumerate(tried):
                out.append(f"| {', '.join(f'{k}={v}' for k, v in t['variant'].items())} | {marks[i]} |")
    return "\n".join(out) + ("\n" if out else "")


def plot_comparison_bars(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Per method the change in greedy and sampled test accuracy against SFT in points (bars: the mean over
    seeds; dots: each seed), and KL to SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "sft"]
    names = [r["method"] for r in rows]
    xs = list(range(len(rows)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 1.5]})
    for off, key, label, color in ((-0.2, "greedy_delta", "greedy", "C0"),
                                   (0.2, "sampled_delta", "sampled (T=1)", "C1")):  # fmt: skip
        per = [[100 * d for d in r.get(key, []) if d is not None] for r in rows]
        means = [sum(d) / len(d) if d else 0.0 for d in per]
        ax.bar([x + off for x in xs], means, 0.4, color=color, alpha=0.75, label=f"{label}: mean over seeds")
        for x, d in zip(xs, per, strict=True):
            ax.plot([x + off] * len(d), d, "o", color="black", ms=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, names, rotation=20, ha="right")
    ax.set_ylabel("test accuracy minus SFT's (points)")
    ax.legend(fontsize=8, title="dots: one seed each", title_fontsize=8)
    ax2.bar(xs, [0.0 if math.isnan(r["kl"]) else r["kl"] for r in rows], color="C2")
    ax2.set_xticks(xs, names, rotation=20, ha="right")
    ax2.set_ylabel("KL to SFT (nats / answer)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
