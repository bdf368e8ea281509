"""The evaluation harness: answers (generated here, or read from a file), per-item results cached, scores
with their provenance, paired comparisons, a side-by-side table and plots.

    Generator(folder)                     any transformers causal-LM folder; its own chat template; batched
                                          greedy generation (left padding); stops at its eos ids
    evaluate_model(name, folder, tasks, out)        -> run record (per task: scores, items, provenance)
    evaluate_predictions(name, file, tasks, out)    -> the same for answers made elsewhere
    compare_items(a, b)                   paired differences, McNemar, paired bootstrap (and RM win rate)
    run_bench(recipe) / `glmwb eval`      several checkpoints side by side: results.json, table.md, plots

Per-item cache: ``OUT/cache/NAME/TASK.jsonl`` holds one line per answer and one per result, each with the
key of what it depends on (the rendered prompt and generation settings; the answer). A run that is stopped
and started again reads them back and generates / scores only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from glmwb.align.evals.tasks import TASKS, Item, Needle, Task, make_task, read_jsonl
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import NonNegInt, PositiveInt
from glmwb.pretrain.settings import RunConfig, WorldConfig

# tokens that end an assistant turn in the common chat templates (GLM, ChatML, Llama 3, Phi)
TURN_ENDS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>")
PREDICTION_FIELDS = ("prediction", "response", "output", "completion", "answer")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("glm-workbench", "lm-eval", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Generator:
    """Greedy answers from a transformers causal-LM folder through its own chat template."""

    def __init__(self, folder: str | Path, batch_size: int = 8, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"no model folder at {folder} (no config.json)")
        self.tok = AutoTokenizer.from_pretrained(folder)
        if not self.tok.chat_template:
            raise ConfigError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json)")
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        # and the tokenizer's own end-of-turn tokens (GLM's turn ends where the next role token starts)
        vocab = self.tok.get_vocab()
        for token in [self.tok.eos_token, *TURN_ENDS]:
            if token in vocab and vocab[token] not in eos and token in self.tok.all_special_tokens:
                eos.append(vocab[token])
        self.eos, self.batch_size = eos, batch_size
        self.template_sha256 = hashlib.sha256(self.tok.chat_template.encode()).hexdigest()

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos,
                pad_token_id=self.tok.pad_token_id,
            )  # fmt: skip
        new = out[:, enc["input_ids"].shape[1] :]  # (B, N): the answer tokens
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in new]

    def describe(self, max_new_tokens: int) -> dict[str, Any]:
        return {"chat_template_sha256": self.template_sha256, "eos_token_ids": self.eos,
                "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                               "batch_size": self.batch_size, "dtype": "float32", "device": self.device,
                               "engine": "transformers generate"}}  # fmt: skip


class ItemCache:
    """Append-only JSONL of answers and results per item, each under the key of its inputs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[str, tuple[str, str]] = {}  # id -> (key, answer)
        self.results: dict[str, tuple[str, dict]] = {}  # id -> (key, result)
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption: recomputed
                target = self.answers if "answer" in rec else self.results
                target[rec["id"]] = (rec["key"], rec.get("answer", rec.get("result")))

    def answer(self, item_id: str, key: str) -> str | None:
        got = self.answers.get(item_id)
        return got[1] if got and got[0] == key else None

    def result(self, item_id: str, key: str) -> dict | None:
        got = self.results.get(item_id)
        return got[1] if got and got[0] == key else None

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for rec in records:
            target = self.answers if "answer" in rec else self.results
            target[rec["id"]] = (rec["key"], rec.get("answer", rec.get("result")))


def _answers_from_model(gen: Generator, task: Task, items: list[Item], cache: ItemCache,
                        max_new_tokens: int, progress: bool) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """{id: answer} for every item (cached ones read back, the rest generated in batches and cached after
    each batch), and {id: answer key}."""
    prompts = {it.id: gen.render(it.messages) for it in items}
    keys = {i: _sha(f"{p}\n{max_new_tokens}\n{gen.template_sha256}") for i, p in prompts.items()}
    answers = {it.id: a for it in items if (a := cache.answer(it.id, keys[it.id])) is not None}
    todo = sorted((it.id for it in items if it.id not in answers), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(items), initial=len(answers), desc=f"{task.name}", disable=not progress)
    for start in range(0, len(todo), gen.batch_size):
        ids = todo[start : start + gen.batch_size]
        got = gen.generate([prompts[i] for i in ids], max_new_tokens)
        cache.add([{"id": i, "key": keys[i], "answer": a} for i, a in zip(ids, got, strict=True)])
        answers.update(zip(ids, got, strict=True))
        bar.update(len(ids))
    bar.close()
    return answers, keys


def _score(task: Task, items: list[Item], answers: dict[str, str], keys: dict[str, str], cache: ItemCache,
           scorer=None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per-item results, cached ones read back; the rest scored (and rewarded, with a reward model)."""
    # a result depends on the answer, the item's reference (gold, tests, kwargs), and the reward model
    reward_id = getattr(scorer, "glmwb_source", repr(scorer)) if scorer is not None else ""
    rkeys = {
        it.id: _sha(
            f"{keys[it.id]}\n{answers[it.id]}\n{json.dumps(it.ref, sort_keys=True, default=str)}\n{reward_id}"
        )
        for it in items
    }
    rows = {it.id: r for it in items if (r := cache.result(it.id, rkeys[it.id])) is not None}
    todo = [it for it in items if it.id not in rows]
    if todo:
        new = task.score(todo, {it.id: answers[it.id] for it in todo})
        if scorer is not None:
            rewards = scorer.score([list(it.messages) for it in todo], [answers[it.id] or " " for it in todo])
            for it, r in zip(todo, rewards, strict=True):
                new[it.id]["reward"] = float(r)
        cache.add([{"id": i, "key": rkeys[i], "result": r} for i, r in new.items()])
        rows.update(new)
    return {it.id: rows[it.id] for it in items}


def _record(task: Task, items: list[Item], answers: dict[str, str], rows: dict[str, dict[str, float]],
            provenance: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    scores = task.aggregate(list(rows.values()))
    if rows and all("reward" in r for r in rows.values()):
        scores["reward"] = sum(r["reward"] for r in rows.values()) / len(rows)
    out = {"n": len(items), "scores": scores, "provenance": {**task.describe(), **provenance},
           "items": {it.id: {**rows[it.id], "answer": answers[it.id]} for it in items}}  # fmt: skip
    if isinstance(task, Needle):
        out["grid"] = task.grid(rows)
    return out


def _reward_scorer(path: str | None):
    if not path:
        return None
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"reward model: no reward folder at {path}")
    from glmwb.rewards.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(path)
    scorer.glmwb_source = str(Path(path).resolve())  # the results cache's key names the reward model
    return scorer


def evaluate_model(name: str, folder: str | Path, tasks: Sequence[Task], out: Path, batch_size: int = 8,
                   max_new_tokens: int | None = None, reward_model: str | None = None,
                   progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Generate and score every task for one checkpoint; results cached under ``out/cache/name``."""
    gen = Generator(folder, batch_size)
    scorer = _reward_scorer(reward_model)
    record: dict[str, Any] = {"name": name, "model": str(folder), "tasks": {}}
    for task in tasks:
        _check_reward(task, scorer)
        items = task.load()
        cache = ItemCache(out / "cache" / name / f"{task.name}.jsonl")
        n_new = max_new_tokens or task.max_new_tokens
        answers, keys = _answers_from_model(gen, task, items, cache, n_new, progress)
        rows = _score(task, items, answers, keys, cache, scorer)
        prov = {**gen.describe(n_new), "versions": versions(), "reward_model": reward_model,
                "prompt_sha256": _sha("\n".join(gen.render(it.messages) for it in items))}  # fmt: skip
        record["tasks"][task.name] = _record(task, items, answers, rows, prov)
    return record


def _check_reward(task: Task, scorer) -> None:
    if task.needs_reward_model and scorer is None:
        raise ConfigError(f"task {task.name}: needs a reward model (--reward-model DIR / reward_model:)")


def read_predictions(path: str | Path) -> dict[str, dict[str, str]]:
    """{task or "": {id: answer}} from JSONL ``{id, prediction, task?}`` (``response``, ``output``,
    ``completion`` or ``answer`` accepted for ``prediction``)."""
    out: dict[str, dict[str, str]] = {}
    for n, row in enumerate(read_jsonl(path), 1):
        field_ = next((f for f in PREDICTION_FIELDS if f in row), None)
        if "id" not in row or field_ is None:
            raise ConfigError(
                f"{path}:{n}: expected fields 'id' and 'prediction'; got {', '.join(sorted(row))}"
            )
        out.setdefault(str(row.get("task", "")), {})[str(row["id"])] = str(row[field_] or "")
    return out


def evaluate_predictions(name: str, path: str | Path, tasks: Sequence[Task], out: Path,
                         reward_model: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Score answers made elsewhere: a JSONL file of ``{id, prediction}`` (with ``task`` when it answers
    several tasks). Items without an answer are left out and counted."""
    given = read_predictions(path)
    scorer = _reward_scorer(reward_model)
    record: dict[str, Any] = {"name": name, "predictions": str(path), "tasks": {}}
    for task in tasks:
        _check_reward(task, scorer)
        mine = {**given.get("", {}), **given.get(task.name, {})}
        all_items = task.load()
        items = [it for it in all_items if it.id in mine]
        if not items:
            raise ConfigError(
                f"{path}: no prediction has the id of a {task.name} item (e.g. {all_items[0].id!r})"
            )
        answers = {it.id: mine[it.id] for it in items}
        keys = {i: _sha(a) for i, a in answers.items()}
        cache = ItemCache(out / "cache" / name / f"{task.name}.jsonl")
        rows = _score(task, items, answers, keys, cache, scorer)
        prov = {"source": f"predictions file {path}", "versions": versions(), "reward_model": reward_model,
                "missing": len(all_items) - len(items)}  # fmt: skip
        record["tasks"][task.name] = _record(task, items, answers, rows, prov)
        if len(items) < len(all_items):
            print(
                f"note: {path}: {task.name}: {len(all_items) - len(items)} of {len(all_items)} items have no prediction (left out)"
            )
    return record


# -- paired comparison ----------------------------------------------------------------------------------------


def paired_bootstrap(diffs: Sequence[float], iters: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean per-item difference, its 95 % percentile interval over ``iters`` resamples of the items, and the
    two-sided p-value (twice the share of resampled means on the far side of zero, at most 1)."""
    n = len(diffs)
    mean = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    below = sum(m <= 0 for m in means) / iters
    above = sum(m >= 0 for m in means) / iters
    p = min(1.0, 2 * min(below, above)) if any(d != 0 for d in diffs) else 1.0
    return {"mean_delta": mean, "ci_low": means[int(0.025 * iters)], "ci_high": means[int(0.975 * iters) - 1],
            "p": p, "n": n}  # fmt: skip


def compare_items(a: dict[str, Any], b: dict[str, Any], metric: str | None = None) -> dict[str, Any]:
    """How run ``b`` fares against ``a`` on one task's common items: per-item differences of ``metric``
    (``correct``, or ``reward`` for a task that has none),
    McNemar's exact test when it is 0/1, the paired bootstrap, and the reward model's win rate of b over a
    (a tie counts half) when both carry rewards."""
    from glmwb.align.evaluate import mcnemar_p

    ids = [i for i in a["items"] if i in b["items"]]
    if not ids:
        raise ConfigError("compare: the two runs share no items")
    metric = metric or ("correct" if "correct" in a["items"][ids[0]] else "reward")
    xs = [a["items"][i][metric] for i in ids]
    ys = [b["items"][i][metric] for i in ids]
    diffs = [y - x for x, y in zip(xs, ys, strict=True)]
    out: dict[str, Any] = {"metric": metric, "n": len(ids), "bootstrap": paired_bootstrap(diffs),
                           "differences": {i: d for i, d in zip(ids, diffs, strict=True) if d}}  # fmt: skip
    if all(v in (0.0, 1.0) for v in xs + ys):
        fixed = sum(d > 0 for d in diffs)
        broken = sum(d < 0 for d in diffs)
        out["mcnemar"] = {"fixed": fixed, "broken": broken, "p": mcnemar_p(fixed, broken)}
    if all("reward" in a["items"][i] and "reward" in b["items"][i] for i in ids):
        ra = [a["items"][i]["reward"] for i in ids]
        rb = [b["items"][i]["reward"] for i in ids]
        win = sum(y > x for x, y in zip(ra, rb, strict=True))
        tie = sum(y == x for x, y in zip(ra, rb, strict=True))
        out["reward_win_rate"] = (win + 0.5 * tie) / len(ids)
    return out


# -- tables and plots -----------------------------------------------------------------------------------------


def _headline(task: str, scores: dict[str, float]) -> list[tuple[str, float]]:
    keys = [
        "correct",
        *(k for k in ("flexible", "loose", "instruction_strict", "score", "reward") if k in scores),
    ]
    label = {"correct": {"winrate": None}.get(task, "accuracy")}
    return [(label.get(k) or k, scores[k]) for k in keys if k in scores and not math.isnan(scores[k])]


def format_side_by_side(runs: Sequence[dict[str, Any]], comparisons: dict[str, dict[str, Any]],
                        baseline: str) -> str:  # fmt: skip
    """One row per checkpoint; per task its headline scores and, against ``baseline``, the accuracy change
    with the McNemar / bootstrap p-value (and the RM win rate)."""
    tasks = list(runs[0]["tasks"])
    head, cols = ["checkpoint"], []
    for t in tasks:
        for key, _ in _headline(t, runs[0]["tasks"][t]["scores"]):
            head.append(f"{t} {key}")
            cols.append((t, key))
        head.append(f"{t} vs {baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run["name"]]
        for t in tasks:
            vals = dict(_headline(t, run["tasks"][t]["scores"]))
            cells += [f"{vals[k]:.3f}" if k in vals else "—" for tt, k in cols if tt == t]
            c = comparisons.get(run["name"], {}).get(t)
            cells.append(_comparison_cell(c) if c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparison_cell(c: dict[str, Any]) -> str:
    b = c["bootstrap"]
    text = f"{b['mean_delta']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]"
    if "mcnemar" in c:
        m = c["mcnemar"]
        text += f" +{m['fixed']}/-{m['broken']} p={m['p']:.3g}"
    else:
        text += f" p={b['p']:.3g}"
    if "reward_win_rate" in c:
        text += f" RM win {c['reward_win_rate']:.2f}"
    return text


def plot_side_by_side(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per task (its accuracy), one bar per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in runs[0]["tasks"] if "correct" in runs[0]["tasks"][t]["scores"]]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4.5))
    for k, run in enumerate(runs):
        xs = [j + k * width for j in range(len(tasks))]
        bars = ax.bar(xs, [run["tasks"][t]["scores"]["correct"] for t in tasks], width, label=run["name"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (share of items right)")
    ax.set_title("checkpoints side by side", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_needle(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """One heat map per checkpoint: retrieval accuracy by context length (rows) and needle depth (cols)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [(r["name"], r["tasks"]["needle"]["grid"]) for r in runs if "needle" in r["tasks"]]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 0.6, 3.4), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids, strict=True):
        lengths = sorted(grid, key=float)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        values = [[grid[length].get(d, float("nan")) for d in depths] for length in lengths]
        im = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for y, row in enumerate(values):
            for x, v in enumerate(row):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth (0 = start, 1 = end)")
        ax.set_ylabel("context length (words)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="retrieval accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# -- the `eval` stage and `glmwb eval` ------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRef:
    name: str  # gsm8k, ifeval, mc, humaneval, world, needle, winrate, arithmetic
    data: str | None = None  # its data file (JSONL / JSONL.gz); the world, needle and arithmetic need none
    limit: NonNegInt = 0  # the first N items (0: all)
    shots: NonNegInt = 0  # solved examples as earlier turns (GSM8K)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"tasks: unknown task {self.name!r}; tasks: {', '.join(TASKS)}")


@dataclass(frozen=True)
class CheckpointRef:
    name: str
    path: str | None = None  # a causal-LM folder ...
    predictions: str | None = None  # ... or a JSONL file of answers made elsewhere

    def __post_init__(self) -> None:
        if (self.path is None) == (self.predictions is None):
            raise ValueError(
                f"checkpoints[{self.name}]: give exactly one of path (a model folder) or predictions"
            )


@dataclass(frozen=True)
class BenchRecipe:
    """`stage: eval` — checkpoints (or prediction files) scored on benchmark tasks, compared with ``baseline``."""

    stage: Literal["eval"] = "eval"
    run: RunConfig = field(default_factory=RunConfig)
    checkpoints: tuple[CheckpointRef, ...] = ()
    tasks: tuple[TaskRef, ...] = ()
    batch_size: PositiveInt = 8
    max_new_tokens: NonNegInt = 0  # 0: each task's own
    reward_model: str | None = None  # adds a reward per item (and RM win rates); the winrate task needs it
    world: WorldConfig = field(default_factory=WorldConfig)  # the world task's world (the training recipes')
    world_split: Literal["heldout", "test", "dev"] = "test"  # test: held-out instances PPO never samples
    baseline: str | None = None  # compared with the others; null: the first
    skip_missing: bool = False  # leave out checkpoints whose folder does not exist
    # torch CPU threads (null: torch's default). A small model on busy cores runs several times faster on
    # one thread than on two that wait on each other.
    num_threads: PositiveInt | None = None

    def __post_init__(self) -> None:
        if not self.checkpoints or not self.tasks:
            raise ValueError("checkpoints and tasks: list at least one of each")
        names = [c.name for c in self.checkpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints: names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not one of {names}")


def build_tasks(refs: Sequence[TaskRef], seed: int = 0, world: WorldConfig | None = None,
                world_split: str = "test") -> list[Task]:  # fmt: skip
    out = []
    for r in refs:
        kw: dict[str, Any] = {"seed": seed} if r.name in ("world", "needle", "arithmetic") else {}
        if r.name == "world":
            world = world or WorldConfig()
            kw |= {"split": world_split, "world_seed": world.seed, "num_entities": world.num_entities}
        out.append(make_task(r.name, r.data, r.limit or None, r.shots, **kw))
    return out


def run_bench(recipe: BenchRecipe, progress: bool = True) -> dict[str, Any]:
    out = Path(recipe.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.num_threads:
        import torch

        torch.set_num_threads(recipe.num_threads)
    tasks = build_tasks(recipe.tasks, recipe.run.seed, recipe.world, recipe.world_split)
    runs, missing = [], []
    for c in recipe.checkpoints:
        if c.path is not None and not (Path(c.path) / "config.json").is_file():
            if recipe.skip_missing:
                missing.append(c.name)
                continue
            raise ConfigError(f"checkpoints[{c.name}].path: no model folder at {c.path} (no config.json)")
        if c.path is not None:
            runs.append(evaluate_model(c.name, c.path, tasks, out, recipe.batch_size,
                                       recipe.max_new_tokens or None, recipe.reward_model, progress))  # fmt: skip
        else:
            runs.append(evaluate_predictions(c.name, c.predictions, tasks, out, recipe.reward_model))
    if not runs:
        raise ConfigError(f"checkpoints: none of the folders exist ({', '.join(missing)})")
    return save_bench(out, runs, recipe.baseline or runs[0]["name"], missing)


def save_bench(
    out: Path, runs: list[dict[str, Any]], baseline: str, missing: Sequence[str] = ()
) -> dict[str, Any]:
    """results.json (scores, provenance, comparisons), items.jsonl, table.md and the plots."""
    from glmwb.pretrain.run_folder import write_json

    by_name = {r["name"]: r for r in runs}
    if baseline not in by_name:
        baseline = runs[0]["name"]
    comparisons = {
        r["name"]: {t: compare_items(by_name[baseline]["tasks"][t], r["tasks"][t]) for t in r["tasks"]}
        for r in runs
        if r["name"] != baseline
    }
    table = format_side_by_side(runs, comparisons, baseline)
    print(f"\n{table}")
    (out / "table.md").write_text(f"{table}\n")
    plots = [str(plot_side_by_side(runs, out / "comparison.png"))]
    if any("needle" in r["tasks"] for r in runs):
        plots.append(str(plot_needle(runs, out / "needle.png")))
    with (out / "items.jsonl").open("w", encoding="utf-8") as f:
        for r in runs:
            for t, rec in r["tasks"].items():
                for i, row in rec["items"].items():
                    f.write(
                        json.dumps({"checkpoint": r["name"], "task": t, "id": i, **row}, ensure_ascii=False)
                        + "\n"
                    )
    summary = {
        "baseline": baseline, "missing": list(missing), "table": table, "plots": plots,
        "runs": [{**{k: v for k, v in r.items() if k != "tasks"},
                  "tasks": {t: {k: v for k, v in rec.items() if k != "items"} for t, rec in r["tasks"].items()}}
                 for r in runs],
        "comparisons": comparisons,
    }  # fmt: skip
    write_json(out / "results.json", summary)
    return summary
