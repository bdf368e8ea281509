"""`glmwb compare-methods` (stage ``compare_methods``): alignment methods from one SFT policy, equal budgets.

Every method is a stage recipe (``dpo.yaml``, ``online_dpo.yaml``, ``ppo.yaml``, ``grpo.yaml``) with its
own overrides; the comparison gives each the same budget of training steps
(``align.compare.budget_overrides``), the same start policy (``sft``) and, per seed, the same ``run.seed``.

Per seed, for every method: train (the method's chosen variant; with a ``sweep``, on the first seed every
variant trains and the one with the best greedy accuracy on ``dev`` prompts is kept for all seeds), then
evaluate on the same held-out ``test`` prompts (greedy and ``eval.samples`` temperature-1 answers per
prompt, graded by the world's checker, scored by the reward model), compare with the SFT policy (paired
Wilcoxon tests over question instances, ``align.evaluate.compare``), and estimate KL to SFT on the
policy's own samples. Results are written after every run (``results.jsonl``), so a run cut short still
leaves a table; at the end ``table.md``, ``comparison.png`` and ``summary.json``. A run whose training
did not do exactly the budget's steps is reported (``check_same_budget``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import NonNegInt, PositiveInt
from glmwb.pretrain.settings import RunConfig, WorldConfig


@dataclass(frozen=True)
class MethodRef:
    """One method: a stage recipe file (relative to ``recipes_dir``), its overrides (``${sft}`` and
    ``${reward_model}`` are substituted), iterative DPO's rounds, and variants to sweep (override sets)."""

    name: str
    recipe: str
    overrides: dict = field(default_factory=dict)
    rounds: PositiveInt = 1  # online_dpo: the budget's steps in this many equal rounds
    steps_per_round: PositiveInt | None = None  # online_dpo, instead of rounds: fresh samples every N steps
    sweep: tuple[dict, ...] = ()  # each a set of overrides; chosen on dev (first seed), reported on test
    grid: dict = field(default_factory=dict)  # key -> values: every combination is a variant (x sweep)

    def __post_init__(self) -> None:
        for k, vs in self.grid.items():
            if not isinstance(vs, list | tuple) or not vs:
                raise ValueError(
                    f"methods[{self.name}].grid.{k}: give a non-empty list of values, got {vs!r}"
                )

    def rounds_for(self, steps: int) -> int:
        """Iterative DPO's rounds under a budget of ``steps`` (``steps_per_round`` wins over ``rounds``)."""
        if self.steps_per_round is None:
            return self.rounds
        if steps % self.steps_per_round:
            raise ValueError(
                f"methods[{self.name}].steps_per_round={self.steps_per_round} does not divide budget.steps={steps}"
            )
        return steps // self.steps_per_round

    def variants(self) -> tuple[dict, ...]:
        """The variants to sweep: each ``sweep`` entry (or none) combined with every point of ``grid``."""
        import itertools

        points = [dict(zip(self.grid, vs, strict=True)) for vs in itertools.product(*self.grid.values())]
        if not self.grid:
            return tuple(self.sweep)
        return tuple({**s, **g} for s in (self.sweep or ({},)) for g in points)


@dataclass(frozen=True)
class CompareBudget:
    steps: PositiveInt = 24  # training steps, the same for every method (see align.compare)


@dataclass(frozen=True)
class CompareEval:
    world: WorldConfig = field(default_factory=WorldConfig)
    test_prompts: PositiveInt = 400  # held-out `test` prompts: the table
    dev_prompts: PositiveInt = 150  # `dev` prompts: choosing a swept variant
    samples: NonNegInt = 4  # temperature-1 answers per test prompt (sampled accuracy)
    max_new_tokens: PositiveInt = 48
    kl_prompts: NonNegInt = 64  # test prompts for KL to SFT (0: no KL)
    kl_samples: PositiveInt = 2  # answers per KL prompt


@dataclass(frozen=True)
class CompareRecipe:
    """`stage: compare_methods` — methods side by side from one SFT policy under one step budget."""

    stage: Literal["compare_methods"] = "compare_methods"
    run: RunConfig = field(default_factory=RunConfig)
    sft: str = "runs/quickstart/sft/final"
    reward_model: str | None = "runs/quickstart/reward/final"
    recipes_dir: str = "recipes"
    seeds: tuple[NonNegInt, ...] = (0, 1, 2)
    budget: CompareBudget = field(default_factory=CompareBudget)
    methods: tuple[MethodRef, ...] = ()
    only: tuple[str, ...] = ()  # run only these methods (default: all)
    variants_from: str | None = None  # an earlier comparison's summary.json: its chosen variants, no sweeps
    eval: CompareEval = field(default_factory=CompareEval)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: list at least one {name, recipe} (the SFT policy is the baseline)")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names) or "sft" in names:
            raise ValueError(f"methods: names must be unique and not 'sft', got {names}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        unknown = sorted(set(self.only) - set(names))
        if unknown:
            raise ValueError(
                f"only: no method named {', '.join(unknown)}; the recipe's methods: {', '.join(names)}"
            )
        for m in self.methods:
            if self.budget.steps % m.rounds_for(self.budget.steps):
                raise ValueError(
                    f"methods[{m.name}].rounds={m.rounds} does not divide budget.steps={self.budget.steps}"
                )


def _override_text(key: str, value: Any, subs: dict[str, str]) -> str:
    if isinstance(value, str):
        for name, v in subs.items():
            value = value.replace("${" + name + "}", v)
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def method_recipe(recipe: CompareRecipe, method: MethodRef, seed: int, run_dir: Path, variant: dict | None):
    """The method's stage recipe for ``seed`` in ``run_dir``: its file, its overrides, the variant's, the
    start policy, the seed, and the equal budget (applied last: nothing overrides it)."""
    from glmwb.align.compare import budget_overrides
    from glmwb.recipes.cli import load_recipe
    from glmwb.recipes.loader import read_yaml

    path = Path(recipe.recipes_dir) / method.recipe
    if not path.is_file():
        raise ConfigError(f"methods[{method.name}].recipe: no recipe file at {path}")
    stage = read_yaml(path).get("stage")
    start_key = {"ppo": "policy.init_from"}.get(stage, "model.init_from")
    subs = {"sft": recipe.sft, "reward_model": recipe.reward_model or "", "run.dir": str(run_dir)}
    items = {**method.overrides, **(variant or {}), start_key: recipe.sft, "run.dir": str(run_dir),
             "run.seed": seed}  # fmt: skip
    try:
        items.update(budget_overrides(stage, recipe.budget.steps, method.rounds_for(recipe.budget.steps)))
    except ValueError as e:
        raise ConfigError(f"methods[{method.name}]: {e}") from None
    return load_recipe(path, [_override_text(k, v, subs) for k, v in items.items()])


def train_method(stage_recipe) -> dict[str, Any]:
    """Run one stage recipe; its final policy folder, budget record and training seconds."""
    from glmwb.align.compare import budget_record
    from glmwb.recipes.loader import dump_yaml
    from glmwb.recipes.schema import stage_runner

    run_dir = Path(stage_recipe.run.dir)
    dump_yaml(stage_recipe, run_dir / "config.yaml")
    t0 = time.time()
    summary = stage_runner(stage_recipe.stage)(stage_recipe)
    final = summary.get("final") or str(run_dir / "final")
    return {"final": str(final), "budget": budget_record(summary), "seconds": round(time.time() - t0, 1)}


class _Evaluator:
    """The shared evaluation: one world, the test / dev prompts, the reward model, SFT's reports per seed."""

    def __init__(self, recipe: CompareRecipe) -> None:
        from glmwb.pretrain.generate import load_policy
        from glmwb.pretrain.world import make_world

        e = recipe.eval
        self.recipe = recipe
        self.world = make_world(seed=e.world.seed, num_entities=e.world.num_entities)
        self.test = self.world.prompts("test", e.test_prompts, seed=0)
        self.dev = self.world.prompts("dev", e.dev_prompts, seed=0)
        self.scorer = None
        if recipe.reward_model:
            from glmwb.rewards.scoring import RewardScorer

            self.scorer = RewardScorer.from_pretrained(recipe.reward_model)
        self.sft_model, self.tok = load_policy(recipe.sft)
        self.sft_reports: dict[int, dict[str, Any]] = {}

    def dev_accuracy(self, folder: str) -> float:
        from glmwb.align.evaluate import evaluate_policy
        from glmwb.pretrain.generate import load_policy

        model, tok = load_policy(folder)
        return evaluate_policy(model, tok, self.world, self.dev, None, self.recipe.eval.max_new_tokens)[
            "accuracy"
        ]

    def test_report(self, folder: str | None, seed: int) -> dict[str, Any]:
        """The test report of ``folder`` (None: SFT) with its comparison against SFT and its KL to SFT."""
        from glmwb.align.compare import kl_to_reference
        from glmwb.align.evaluate import compare, evaluate_policy
        from glmwb.pretrain.generate import load_policy

        e = self.recipe.eval
        model, tok = (self.sft_model, self.tok) if folder is None else load_policy(folder)
        report = evaluate_policy(model, tok, self.world, self.test, self.scorer, e.max_new_tokens,
                                 samples=e.samples, seed=seed)  # fmt: skip
        out: dict[str, Any] = {"report": report, "comparison": None, "kl": 0.0 if folder is None else None}
        if folder is None:
            self.sft_reports[seed] = report
            return out
        out["comparison"] = compare(self.sft_reports[seed], report)
        if e.kl_prompts:
            msgs = [p.messages for p in self.test[: e.kl_prompts]]
            kl = kl_to_reference(model, self.sft_model, tok, msgs, e.kl_samples, e.max_new_tokens, seed)
            out["kl"], out["kl_se"] = kl["kl"], kl["kl_se"]
        return out


def _choose_variant(recipe, method, seed, out, ev, log) -> tuple[dict | None, dict[str, Any] | None]:
    """Train every swept variant of ``method`` on ``seed``, keep the best greedy accuracy on dev."""
    if not method.variants():
        return None, None
    tried = []
    for i, variant in enumerate(method.variants()):
        run_dir = out / f"seed_{seed}" / f"{method.name}_sweep{i}"
        got = train_method(method_recipe(recipe, method, seed, run_dir, variant))
        acc = ev.dev_accuracy(got["final"])
        log(f"  sweep {method.name} {variant}: dev greedy accuracy {acc:.3f}")
        tried.append((acc, i, variant, got))
    best = max(tried, key=lambda t: (t[0], -t[1]))
    sweep = [{"variant": v, "dev_accuracy": a} for a, _, v, _ in tried]
    return best[2], {**best[3], "sweep": sweep}


def _variant_name(variant: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items()) if variant else "defaults"


def runnable_methods(recipe: CompareRecipe) -> tuple[list[MethodRef], list[str]]:
    """The methods that can run, and a note for each left out: with ``reward_model: null`` a method whose
    overrides name ``${reward_model}`` (PPO against the RM) is left out, not run against nothing."""
    keep, left_out = [], []
    for m in recipe.methods:
        if recipe.only and m.name not in recipe.only:
            continue
        texts = [str(v) for v in m.overrides.values()] + [
            str(v) for var in m.variants() for v in var.values()
        ]
        if not recipe.reward_model and any("${reward_model}" in t for t in texts):
            left_out.append(
                f"{m.name}: needs reward_model (its overrides name ${{reward_model}}), which is null"
            )
        else:
            keep.append(m)
    return keep, left_out


def earlier_choices(path: str | None, names: list[str]) -> dict[str, dict | None]:
    """The variants an earlier comparison chose on dev (its summary.json's ``chosen``) for ``names``."""
    if not path:
        return {}
    p = Path(path)
    try:
        chosen = json.loads(p.read_text(encoding="utf-8"))["chosen"]
    except FileNotFoundError:
        raise ConfigError(f"variants_from: no file at {path} (a compare-methods summary.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(
            f"variants_from: {path} is not a compare-methods summary.json (no 'chosen')"
        ) from None
    out = {n: chosen[n] for n in names if n in chosen}
    for n, v in out.items():
        print(f"{n}: the variant chosen in {path}: {_variant_name(v)}")
    return out


def run_compare(recipe: CompareRecipe) -> dict[str, Any]:
    from glmwb.align.compare import check_same_budget

    methods, left_out = runnable_methods(recipe)
    for note in left_out:
        print(f"left out: {note}")
    out = Path(recipe.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, folder in (("sft", recipe.sft), ("reward_model", recipe.reward_model)):
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"{name}: no model folder at {folder!r} (expected config.json there)")
    for m in methods:  # every recipe builds before anything trains
        for v in (None, *m.variants()):
            method_recipe(recipe, m, recipe.seeds[0], out / "check", v)
    chosen = earlier_choices(recipe.variants_from, [m.name for m in methods])
    ev = _Evaluator(recipe)
    results: dict[str, list[dict[str, Any]]] = {"sft": []}
    (out / "results.jsonl").write_text("")
    for seed in recipe.seeds:
        _record(out, "sft", seed, {**ev.test_report(None, seed), "variant": "—", "seconds": 0.0}, results)
        for m in methods:
            t0 = time.time()
            got = None
            if m.name not in chosen:
                chosen[m.name], got = _choose_variant(recipe, m, seed, out, ev, print)
            if got is None:
                run_dir = out / f"seed_{seed}" / m.name
                got = train_method(method_recipe(recipe, m, seed, run_dir, chosen[m.name]))
            res = {**ev.test_report(got["final"], seed), **got, "variant": _variant_name(chosen[m.name])}
            _record(out, m.name, seed, res, results)
            print(f"seed {seed} {m.name}: greedy {res['report']['accuracy']:.3f}, sampled "
                  f"{res['report'].get('sample_accuracy', float('nan')):.3f} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
            _write_table(recipe, out, results)
    budgets = {
        f"{n} seed {i}": r["budget"] for n, rs in results.items() for i, r in enumerate(rs) if "budget" in r
    }
    unequal = check_same_budget(budgets, recipe.budget.steps)
    summary = _write_table(recipe, out, results)
    summary.update({"budget_steps": recipe.budget.steps, "unequal_budgets": unequal, "chosen": chosen,
                    "left_out": left_out})  # fmt: skip
    from glmwb.pretrain.run_folder import write_json

    write_json(out / "summary.json", summary, default=str)
    print(("every method trained " if not unequal else "NOT the same budget: " + "; ".join(unequal) + " — ")
          + f"{recipe.budget.steps} steps")  # fmt: skip
    return summary


def _record(out: Path, name: str, seed: int, res: dict[str, Any], results: dict[str, list]) -> None:
    results.setdefault(name, []).append(res)
    brief = {k: v for k, v in res.items() if k not in ("report", "comparison")}
    brief["report"] = {k: v for k, v in res["report"].items() if not k.startswith(("answers", "by_"))}
    if res.get("comparison"):
        c = res["comparison"]
        brief["comparison"] = {
            k: c[k] for k in ("accuracy_delta", "sample_accuracy_delta", "by_instance") if k in c
        }
    with (out / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"method": name, "seed": seed, **brief}, default=str) + "\n")


def _write_table(recipe: CompareRecipe, out: Path, results: dict[str, list]) -> dict[str, Any]:
    from glmwb.align.compare import comparison_rows, format_comparison, format_sweeps, plot_comparison_bars

    rows = comparison_rows({n: rs for n, rs in results.items() if rs})
    table = format_comparison(rows)
    n_test = len(results["sft"][0]["report"]["answers"]) if results["sft"] else 0
    head = (f"{len(recipe.seeds)} seeds planned, budget {recipe.budget.steps} training steps per method, "
            f"from {recipe.sft}; held-out `test` prompts n={n_test}")  # fmt: skip
    sweeps = format_sweeps({n: rs[0]["sweep"] for n, rs in results.items() if rs and rs[0].get("sweep")})
    (out / "table.md").write_text(f"{head}\n\n{table}\n{sweeps}")
    print(f"\n{head}\n{table}\n{sweeps}", flush=True)
    plot_comparison_bars(rows, out / "comparison.png", f"{head} — {out}")
    return {"table": table, "rows": rows}
