"""Alignment evaluation: how good are a policy's answers, and is the aligned policy better than its start?

Every policy answers the same held-out world prompts greedily (pretrain.generate, KV cache, stop at GLM's
turn terminators). The world's checker grades each answer (correct value, right language, concision and
their weighted ``score``, docs/world.md); a reward model, when given, scores it too.

    load_policy(folder) -> (GLM, tokenizer)
    generate_answers(model, tok, prompts_as_messages) -> [str]
    evaluate_policy(model, tok, world, prompts, scorer=None, samples=0) -> report dict (accuracy, ..., answers;
        with samples=k also sample_accuracy: the share right of k temperature-1 answers per prompt)
    compare(before, after) -> win / tie / loss of ``after`` over ``before``, by the checker and by the RM, with
        paired tests (McNemar on greedy correctness, Wilcoxon on per-prompt sample accuracy)
    `glmwb run recipes/align_eval.yaml` (stage ``align_eval``): several policy folders side by side, a table
    printed and saved (summary.json, table.md, comparison.png).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.generate import generate_answers, load_policy
from glmwb.pretrain.ranges import NonNegInt, PositiveFloat, PositiveInt
from glmwb.pretrain.run_folder import cut_short, describe_model, read_model_record, training_line, write_json
from glmwb.pretrain.settings import RunConfig, WorldConfig


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def evaluate_policy(
    model,
    tok,
    world,
    prompts: Sequence[Any],
    scorer=None,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    progress: bool = False,
    samples: int = 0,
    sample_temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy answers to world ``prompts`` graded by the world's checker (and ``scorer``, a RewardScorer or
    RewardClient, when given). Returns the report: accuracy, right_language, concision, score, mean_chars,
    empty (answers with no text), reward_mean, by_lang / by_family breakdowns, n, and ``answers``.

    ``samples`` = k > 0 also draws k answers per prompt at ``sample_temperature`` (the distribution an RL
    policy is trained and used with; greedy decoding hides how much of it is right) and adds
    ``sample_accuracy`` (the share right of all k x n answers; per prompt in each answer's record).
    Seeded by ``seed``: two policies evaluated with the same seed draw with the same random stream."""
    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    if samples < 0:
        raise ValueError(f"evaluate_policy: samples must be >= 0, got {samples}")
    messages = [p.messages for p in prompts]
    texts = generate_answers(model, tok, messages, max_new_tokens, batch_size=batch_size, progress=progress)
    sampled: list[list[str]] = [[] for _ in prompts]
    for k in range(samples):
        seed_k = seed + 7919 * (k + 1)
        got = generate_answers(
            model, tok, messages, max_new_tokens, sample_temperature, batch_size, seed_k, progress
        )
        for row, text in zip(sampled, got, strict=True):
            row.append(text)
    rewards: list[float | None] = [None] * len(texts)
    if scorer is not None:
        scorable = [i for i, t in enumerate(texts) if t.strip()]
        if scorable:
            got = scorer.score([prompts[i].messages for i in scorable], [texts[i] for i in scorable])
            for i, r in zip(scorable, got, strict=True):
                rewards[i] = float(r)
        # an empty answer cannot be scored by the RM: it gets the lowest reward seen (a floor, not a guess)
        floor = min((r for r in rewards if r is not None), default=0.0)
        rewards = [floor if r is None else r for r in rewards]
    answers = []
    for p, text, reward, drawn in zip(prompts, texts, rewards, sampled, strict=True):
        c = world.check(p, text)
        answers.append(
            {
                "id": p.id,
                # the question instance, whatever the language and phrasing: the unit the paired tests cluster on
                "instance": f"{p.family}/{p.key}" if p.key else p.id,
                "phrasing": p.id.rsplit("/", 1)[-1],  # t0-t3: which of the world's four ways of asking
                "lang": p.lang,
                "family": p.family,
                "question": p.messages[-1]["content"],
                "gold": p.gold,
                "answer": text,
                "correct": bool(c.correct),
                "right_language": bool(c.right_language),
                "concision": float(c.concision),
                "score": float(c.score),
                "chars": len(text),
                **({"reward": reward} if reward is not None else {}),
                **({"sample_accuracy": _mean([world.check(p, t).correct for t in drawn])} if drawn else {}),
            }
        )
    report = _summarise(answers)
    for key in ("lang", "family", "phrasing"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for a in answers:
            groups[a[key]].append(a)
        report[f"by_{key}"] = {g: _summarise(rows) for g, rows in sorted(groups.items())}
    report["answers"] = answers
    return report


def _summarise(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "n": len(answers),
        "accuracy": _mean([a["correct"] for a in answers]),
        "right_language": _mean([a["right_language"] for a in answers]),
        "concision": _mean([a["concision"] for a in answers]),
        "score": _mean([a["score"] for a in answers]),
        "mean_chars": _mean([a["chars"] for a in answers]),
        "empty": _mean([a["chars"] == 0 for a in answers]),
    }
    if answers and "reward" in answers[0]:
        out["reward_mean"] = _mean([a["reward"] for a in answers])
    if answers and "sample_accuracy" in answers[0]:
        out["sample_accuracy"] = _mean([a["sample_accuracy"] for a in answers])
    return out


def _wins(a: Sequence[float], b: Sequence[float], tol: float = 1e-9) -> dict[str, float]:
    """Win / tie / loss rates of ``b`` over ``a`` item by item; win_rate counts a tie as half a win."""
    n = len(a)
    win = sum(y > x + tol for x, y in zip(a, b, strict=True))
    loss = sum(y < x - tol for x, y in zip(a, b, strict=True))
    tie = n - win - loss
    return {"win": win / n, "tie": tie / n, "loss": loss / n, "win_rate": (win + 0.5 * tie) / n, "n": n}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """How ``after`` fares against ``before`` on the same prompts: win rates by the world's score, by
    correctness, and by the reward model when both reports carry rewards."""
    a, b = before["answers"], after["answers"]
    if [x["id"] for x in a] != [x["id"] for x in b]:
        raise ValueError("compare: the two reports answer different prompts (evaluate both on the same list)")
    out = {
        "by_world_score": _wins([x["score"] for x in a], [x["score"] for x in b]),
        "by_correctness": _wins([float(x["correct"]) for x in a], [float(x["correct"]) for x in b]),
        "accuracy_delta": after["accuracy"] - before["accuracy"],
        "score_delta": after["score"] - before["score"],
    }
    fixed = sum(not x["correct"] and y["correct"] for x, y in zip(a, b, strict=True))
    broken = sum(x["correct"] and not y["correct"] for x, y in zip(a, b, strict=True))
    out["mcnemar"] = {"fixed": fixed, "broken": broken, "p": mcnemar_p(fixed, broken)}
    if "reward" in a[0] and "reward" in b[0]:
        out["by_reward_model"] = _wins([x["reward"] for x in a], [x["reward"] for x in b])
    if "sample_accuracy" in a[0] and "sample_accuracy" in b[0]:
        xs, ys = [x["sample_accuracy"] for x in a], [y["sample_accuracy"] for y in b]
        out["sample_accuracy_delta"] = after["sample_accuracy"] - before["sample_accuracy"]
        out["sample_accuracy_test"] = paired_test(xs, ys)
    if all("instance" in x for x in a):
        out["by_instance"] = instance_tests(a, b)
    return out


def instance_tests(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paired tests again with the question *instance* as the unit instead of the prompt.

    A world instance is asked in two languages and three or four phrasings, and a policy tends to get all of
    them right or all wrong together (one learnt value, "120 min = 12 h", breaks eight prompts at once), so
    prompts are not independent and per-prompt p-values overstate the evidence. Here each instance's mean
    greedy correctness (and mean sampled accuracy) before and after is one pair; Wilcoxon's signed-rank test
    runs over the instances. Returns n (instances), up / down (instances whose greedy mean rose / fell),
    greedy_p, and sampled_p when the answers carry sample_accuracy."""
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for x, y in zip(before, after, strict=True):
        groups[x["instance"]].append((x, y))

    def means(field: str) -> tuple[list[float], list[float]]:
        xs = [_mean([float(x[field]) for x, _ in rows]) for rows in groups.values()]
        ys = [_mean([float(y[field]) for _, y in rows]) for rows in groups.values()]
        return xs, ys

    xs, ys = means("correct")
    greedy = paired_test(xs, ys)
    out: dict[str, Any] = {
        "n": len(groups),
        "up": sum(y > x + 1e-12 for x, y in zip(xs, ys, strict=True)),
        "down": sum(y < x - 1e-12 for x, y in zip(xs, ys, strict=True)),
        "greedy_p": greedy["p"],
    }
    if "sample_accuracy" in before[0] and "sample_accuracy" in after[0]:
        out["sampled_p"] = paired_test(*means("sample_accuracy"))["p"]
    return out


def significance_line(comparison: dict[str, Any]) -> str:
    """One line for a before / after ``compare``: accuracy change with McNemar's counts and p-value, and the
    sampled-accuracy change with its standard error and Wilcoxon p-value when both reports have samples."""
    m = comparison["mcnemar"]
    line = (
        f"greedy accuracy {comparison['accuracy_delta']:+.3f} (fixed {m['fixed']}, broken {m['broken']}, "
        f"McNemar p {m['p']:.3g})"
    )
    if "sample_accuracy_test" in comparison:
        t = comparison["sample_accuracy_test"]
        line += (
            f"; sampled accuracy {comparison['sample_accuracy_delta']:+.3f} ± {t['se']:.3f} "
            f"(Wilcoxon p {t['p']:.3g}, {t['changed']} of {t['n']} prompts changed)"
        )
    if "by_instance" in comparison:
        c = comparison["by_instance"]
        line += (
            f"; over the {c['n']} question instances (each asked in several phrasings): greedy {c['up']} up / "
            f"{c['down']} down, Wilcoxon p {c['greedy_p']:.3g}"
            + (f", sampled p {c['sampled_p']:.3g}" if "sampled_p" in c else "")
        )
    return line


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: under "no change" each discordant prompt is fixed or broken with
    probability 1/2 (scipy's binomial test on the discordant pairs). 1.0 when nothing changed."""
    from scipy.stats import binomtest

    n = fixed + broken
    return float(binomtest(fixed, n, 0.5).pvalue) if n else 1.0


def paired_test(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Wilcoxon signed-rank test (two-sided, scipy; zero differences dropped) of per-prompt scores after vs
    before, with the mean difference and its standard error."""
    from scipy.stats import wilcoxon

    d = [y - x for x, y in zip(before, after, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    nonzero = sum(abs(x) > 1e-12 for x in d)
    p = float(wilcoxon(d, zero_method="wilcox").pvalue) if nonzero else 1.0
    return {"mean_delta": mean, "se": se, "p": p, "n": n, "changed": nonzero}


# -- the `align_eval` stage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRef:
    name: str  # a column of the table: "base", "sft", "dpo", ...
    path: str  # a Hugging Face policy folder


@dataclass(frozen=True)
class EvalDataConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    # test: the half of heldout that PPO (rollouts on dev) never samples
    split: Literal["heldout", "test", "dev", "train"] = "heldout"
    n_prompts: PositiveInt = 200
    max_new_tokens: PositiveInt = 48
    # also k temperature-1 answers per prompt: sample_accuracy, and a Wilcoxon test against the baseline
    samples: NonNegInt = 0
    sample_temperature: PositiveFloat = 1.0

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError(f"data.n_prompts must be >= 1, got {self.n_prompts}")
        if self.samples < 0:
            raise ValueError(f"data.samples must be >= 0, got {self.samples}")
        if self.samples and self.sample_temperature <= 0:
            raise ValueError(f"data.sample_temperature must be > 0 to sample, got {self.sample_temperature}")


@dataclass(frozen=True)
class EvalRecipe:
    """`stage: align_eval` — policies side by side on held-out world prompts, compared with ``baseline``."""

    stage: Literal["align_eval"] = "align_eval"
    run: RunConfig = field(default_factory=RunConfig)
    policies: tuple[PolicyRef, ...] = ()
    reward_model: str | None = None  # a reward folder: adds RM rewards and RM win rates
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    skip_missing: bool = False  # leave out (and report) policy folders that do not exist
    # the policy the others are compared with (win rates, McNemar, Wilcoxon); null: the first listed.
    # Aligned policies start from SFT, so `baseline: sft` measures what alignment added.
    baseline: str | None = None

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError(
                "policies: list at least one {name, path} (the first is the baseline unless `baseline` names one)"
            )
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError(f"policies: names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the policies' names {names}")


METRICS = ("accuracy", "right_language", "concision", "score", "mean_chars", "reward_mean")


def format_table(
    reports: dict[str, dict[str, Any]], comparisons: dict[str, dict[str, Any]], baseline: str | None = None
) -> str:
    """A Markdown table: one row per policy, the metrics and win rates against ``baseline`` (the policy the
    comparisons were made with; named in the header, the first report when None)."""
    base = baseline if baseline is not None else next(iter(reports))
    has_rm = all("reward_mean" in r for r in reports.values())
    cols = [m for m in METRICS if m != "reward_mean" or has_rm]
    if all("sample_accuracy" in r for r in reports.values()):
        cols.insert(1, "sample_accuracy")
    head = ["policy", *cols, f"win vs {base} (world)", *([f"win vs {base} (RM)"] if has_rm else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        cells = [name] + [f"{r[m]:.3f}" if m != "mean_chars" else f"{r[m]:.1f}" for m in cols]
        c = comparisons.get(name)
        cells.append(f"{c['by_world_score']['win_rate']:.3f}" if c else "—")
        if has_rm:
            cells.append(f"{c['by_reward_model']['win_rate']:.3f}" if c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_models(folders: dict[str, str | Path]) -> str:
    """A Markdown table saying which model each policy is: its folder and how it was trained (its
    glmwb_run.json: stage, steps done of planned), a policy whose training stopped early flagged."""
    lines = ["| policy | folder | training |", "|---|---|---|"]
    for name, folder in folders.items():
        text = describe_model(folder)
        if cut_short(folder):
            text = f"**{text}** (not the recipe's model)"
        lines.append(f"| {name} | {folder} | {text} |")
    return "\n".join(lines)


def model_records(folders: dict[str, str | Path]) -> dict[str, dict[str, Any]]:
    """{policy: {path, training (its glmwb_run.json or None)}} for summary.json."""
    return {n: {"path": str(f), "training": read_model_record(f)} for n, f in folders.items()}


def format_breakdown_table(reports: dict[str, dict[str, Any]], by: str) -> str:
    """A Markdown table of accuracy per group of the reports' ``by_<by>`` breakdown (family, lang, phrasing;
    columns, with the counts) for each policy (rows)."""
    key = f"by_{by}"
    groups = sorted({f for r in reports.values() for f in r.get(key, {})})
    first = next(iter(reports.values()))
    head = ["policy", *(f"{f} (n={first[key][f]['n']})" for f in groups)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        lines.append("| " + " | ".join([name, *(f"{r[key][f]['accuracy']:.3f}" for f in groups)]) + " |")
    return "\n".join(lines)


COMPARED = (
    ("accuracy", "accuracy\n(share right)"),
    ("right_language", "right language\n(share)"),
    ("concision", "concision\n(0-1)"),
    ("score", "world score\n(0-1)"),
)


def plot_comparison(
    reports: dict[str, dict[str, Any]], path: Path, title: str, labels: dict[str, str] | None = None
) -> Path:
    """Grouped bars, one group per metric (all on a 0-1 scale), one bar per policy with its value on it;
    ``labels``: the legend's text per policy (e.g. with its training state)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(11, 5.2))
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(COMPARED))]
        bars = ax.bar(
            xs, [reports[name][m] for m, _ in COMPARED], width, label=(labels or {}).get(name, name)
        )
        ax.bar_label(bars, fmt="%.3f", padding=1, fontsize=7, rotation=90 if len(names) > 3 else 0)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(COMPARED))], [label for _, label in COMPARED])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("value on the held-out prompts (0-1)")
    ax.set_xlabel("metric (greedy answers graded by the world's checker)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes stays in the picture
    plt.close(fig)
    return path


def run_eval(recipe: EvalRecipe) -> dict[str, Any]:
    from glmwb.pretrain.world import make_world

    out = Path(recipe.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    policies, missing = [], []
    for p in recipe.policies:
        if (Path(p.path) / "config.json").is_file():
            policies.append(p)
        elif recipe.skip_missing:
            missing.append(p.name)
        else:
            raise ConfigError(f"policies[{p.name}].path: no model folder at {p.path} (no config.json)")
    if not policies:
        raise ConfigError(f"policies: none of the folders exist ({', '.join(missing)})")
    base = recipe.baseline or recipe.policies[0].name
    if base in missing:
        raise ConfigError(
            f"baseline: the policy {base!r} has no model folder at "
            f"{next(p.path for p in recipe.policies if p.name == base)} (the others are compared with it)"
        )
    scorer = None
    if recipe.reward_model:
        if not (Path(recipe.reward_model) / "config.json").is_file():
            raise ConfigError(f"reward_model: no reward folder at {recipe.reward_model}")
        from glmwb.rewards.scoring import RewardScorer

        scorer = RewardScorer.from_pretrained(recipe.reward_model)
    cfg = recipe.data
    world = make_world(seed=cfg.world.seed, num_entities=cfg.world.num_entities)
    prompts = world.prompts(cfg.split, cfg.n_prompts, seed=recipe.run.seed)
    reports: dict[str, dict[str, Any]] = {}
    for p in tqdm(policies, desc="policies"):
        model, tok = load_policy(p.path)
        reports[p.name] = evaluate_policy(
            model, tok, world, prompts, scorer, cfg.max_new_tokens, samples=cfg.samples,
            sample_temperature=cfg.sample_temperature, seed=recipe.run.seed,
        )  # fmt: skip
        del model
    comparisons = {n: compare(reports[base], r) for n, r in reports.items() if n != base}
    table = format_table(reports, comparisons, base)
    folders = {p.name: p.path for p in policies}
    models = format_models(folders)
    families = format_breakdown_table(reports, by="family")
    phrasings = format_breakdown_table(reports, by="phrasing")
    phrasing_title = (
        "accuracy by phrasing (the world asks each question four ways; the training chats use t0-t2)"
    )
    print(f"\nthe policies (folder, and how each was trained):\n{models}")
    print(f"\nheld-out world prompts ({cfg.split}, n={len(prompts)}); win rates against {base!r}:\n{table}")
    print(f"\naccuracy by task family:\n{families}")
    print(f"\n{phrasing_title}:\n{phrasings}")
    tests = "\n".join(f"- {n} vs {base}: {significance_line(c)}" for n, c in comparisons.items())
    if tests:
        print(f"\npaired tests against {base!r}:\n{tests}")
    (out / "table.md").write_text(
        f"the policies:\n\n{models}\n\n{table}\n\naccuracy by task family:\n\n{families}\n\n"
        f"{phrasing_title}:\n\n{phrasings}\n\npaired tests against {base!r}:\n\n{tests}\n"
    )
    labels = {n: f"{n}: {training_line(f, short=True) or 'no training record'}" for n, f in folders.items()}
    title = f"held-out world prompts ({cfg.split} split, n={len(prompts)}), greedy answers — {out}"
    plot_comparison(reports, out / "comparison.png", title, labels)
    summary = {"baseline": base, "policies": model_records(folders), "missing": missing,
               "comparisons": comparisons, "table": table, "family_table": families,
               "phrasing_table": phrasings}  # fmt: skip
    return _save_eval(out, reports, folders, summary)


def _save_eval(
    out: Path, reports: dict[str, dict[str, Any]], folders: dict[str, str], summary: dict[str, Any]
) -> dict[str, Any]:
    """answers.jsonl and summary.json (the reports without their answers, the policies cut short named)."""
    with (out / "answers.jsonl").open("w", encoding="utf-8") as f:
        for name, r in reports.items():
            for a in r["answers"]:
                f.write(json.dumps({"policy": name, **a}, ensure_ascii=False) + "\n")
    summary["reports"] = {n: {k: v for k, v in r.items() if k != "answers"} for n, r in reports.items()}
    summary["stopped_early"] = early = [n for n, f in folders.items() if cut_short(f)]
    if early:
        print(f"note: {', '.join(early)}: training (or an earlier stage's) stopped early, see the policies "
              "above: not the models the recipes describe")  # fmt: skip
    write_json(out / "summary.json", summary, default=_json_num)
    return summary


def _json_num(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
