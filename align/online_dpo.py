"""`glmwb run recipes/online_dpo.yaml`: iterative (online) DPO — sample, label, retrain, repeat.

Each round r = 1..R:

1. sample ``k`` answers per prompt from the current policy (``annotation.tasks.sample_responses``: our GLM,
   KV-cached generation, stops at GLM's turn terminators) on fresh training prompts of the embedded world;
2. label them:
   - ``rm``: the reward model scores every answer (``rewards.scoring.RewardScorer``); the pair is the
     best- against the worst-scored answer of a prompt, kept when their gap exceeds ``label.min_gap``;
   - ``world``: the world's noise-free preference rule (its utility of correctness, language and concision,
     the rule the simulated annotators follow) picks best and worst the same way;
   - ``store``: the answers become comparison items in the annotation store (``label.store`` database);
     with ``label.simulate`` the world's simulated annotators vote through the store and the votes are
     exported as pairs (``annotation.export``), otherwise the round stops there, waiting for people
     (``glmwb annotate --db ...``), and the recipe reports what to run next;
   and, with ``label.export``, the round's pairs are written to ``round_r/pairs.jsonl`` (the store's export
   format) for annotators or for other trainers;
3. retrain with DPO (``align.dpo.train_policy``, either engine) starting from the current policy, which is
   also the round's reference (the usual iterative-DPO choice);
4. evaluate on held-out world prompts (``align.evaluate.evaluate_policy``) and summarise the round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from glmwb.align.dpo import (
    DPODataConfig,
    DPOEvalConfig,
    DPOLossConfig,
    DPOModelConfig,
    DPORecipe,
    DPOTrainConfig,
    check_combination,
)
from glmwb.annotation.preference_data import WorldPairsConfig
from glmwb.kernels.config import KernelConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.optim import OptimConfig
from glmwb.pretrain.ranges import Fraction, NonNegFloat, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.run_folder import Budget, write_summary
from glmwb.pretrain.settings import RunConfig, WorldConfig


@dataclass(frozen=True)
class RoundsConfig:
    rounds: PositiveInt = 2
    prompts_per_round: PositiveInt = 64  # fresh world training prompts each round
    k: Annotated[int, Range(2)] = 4  # answers sampled per prompt
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    max_new_tokens: PositiveInt = 48
    batch_size: PositiveInt = 64  # sequences per generate() call
    world: WorldConfig = field(default_factory=WorldConfig)
    # the prompt pool: `train` (instances the SFT chats ask) or `dev` (held-out instances the policy read only
    # as prose; PPO's rollout split), kept to `families` (() = all), asked in `phrasings` ways (null: the split's)
    split: Literal["train", "dev"] = "train"
    families: tuple[str, ...] = ()
    phrasings: Annotated[int, Range(1, 4)] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.prompts_per_round < 1:
            raise ValueError("rounds.rounds and rounds.prompts_per_round must be >= 1")
        if self.k < 2:
            raise ValueError(f"rounds.k must be >= 2 (a pair needs two answers), got {self.k}")
        if self.temperature <= 0:
            raise ValueError("rounds.temperature must be > 0: greedy sampling gives k copies of one answer")


@dataclass(frozen=True)
class LabelConfig:
    # rm | checker (the world's checker: right 1, wrong 0) | world (the noise-free preference rule) |
    # annotators (a simulated panel judges every pair of the k answers) | store
    source: Literal["rm", "checker", "world", "annotators", "store"] = "rm"
    reward_model: str | None = None  # rm: a reward folder
    length_penalty: NonNegFloat = 0.0  # rm: score - length_penalty x characters (a length control)
    min_gap: NonNegFloat = 0.0  # rm / world: keep a pair only when best - worst > min_gap
    store: str | None = None  # store: a database URL or SQLite file path; default run.dir/annotation.db
    simulate: bool = True  # store: simulated annotators vote (else the run waits for people)
    annotators: PositiveInt = 3  # store + simulate: simulated annotator accounts
    overlap: PositiveInt = 1  # store: votes wanted per item
    noise: Fraction = 0.1  # store + simulate: each simulated annotator's noise
    export: bool = True  # write each round's pairs to round_r/pairs.jsonl

    def __post_init__(self) -> None:
        if self.source == "rm" and not self.reward_model:
            raise ValueError("label.source 'rm' needs label.reward_model (a reward folder)")


@dataclass(frozen=True)
class OnlineDPORecipe:
    """`stage: online_dpo` — R rounds of: sample k answers per prompt, label, DPO, evaluate."""

    stage: Literal["online_dpo"] = "online_dpo"
    run: RunConfig = field(default_factory=RunConfig)
    engine: Literal["trl", "packed"] = "trl"
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=2, weight_decay=0.0, min_lr_ratio=0.1)
    )
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    kernels: KernelConfig | None = None

    def __post_init__(self) -> None:
        check_combination("dpo", self.engine, self.loss, self.model.lora.enabled, self.train)

    def dpo_recipe(self, run_dir: Path) -> DPORecipe:
        """The per-round DPO recipe (same sections; data is built by the round)."""
        return DPORecipe(
            run=replace(self.run, dir=str(run_dir)), trainer="dpo", engine=self.engine,
            data=DPODataConfig(world=WorldPairsConfig(seed=self.rounds.world.seed, num_entities=self.rounds.world.num_entities), max_length=256), model=self.model, loss=self.loss,
            optim=self.optim, train=self.train, eval=self.eval, kernels=self.kernels,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Sampling and labelling


def world_prompt_specs(world, n: int, seed: int, split: str = "train", families=(), phrasings=None):
    from glmwb.align.onpolicy import world_specs

    return world_specs(world, split, n, seed, families, phrasings)


def label_scores(cfg: LabelConfig, specs, answers, scorer, seed: int = 0) -> dict[str, list[float]]:
    """A score per answer text ({uid: [text]}): the reward model's (length-controlled), the world checker's,
    the world rule's utility, or a simulated panel's share of wins (``align.onpolicy.label_answers``)."""
    from glmwb.align.onpolicy import label_answers

    source = "rule" if cfg.source == "world" else cfg.source
    return label_answers(source, specs, answers, scorer, cfg.length_penalty, cfg.annotators, cfg.noise, seed)


def store_round(cfg: LabelConfig, specs, answers, db: str, round_no: int, seed: int):
    """Write comparison items into the store; with simulated annotators, vote and export the pairs.

    Returns (records or None when waiting for people, facts)."""
    from glmwb.annotation.export import export_records
    from glmwb.annotation.records import records_from_dicts
    from glmwb.annotation.store import Store
    from glmwb.annotation.tasks import make_items, simulate_votes

    items = make_items(specs, answers, per_item=2, items_per_prompt=1, overlap=cfg.overlap,
                       batch=f"online-dpo-round-{round_no}", seed=seed)  # fmt: skip
    with Store(db) as store:
        ids = store.add_items(items, seed=seed)
        facts = {"store": db, "items_added": len(ids), "batch": f"online-dpo-round-{round_no}"}
        if not cfg.simulate:
            return None, facts
        names = [f"sim-online-{i}" for i in range(cfg.annotators)]
        for name in names:
            if store.annotator(name) is None:
                store.create_annotator(name, None)
        facts["votes"] = simulate_votes(store, names, noise=cfg.noise, seed=seed)
        exported = export_records(store, mode="majority", ties="drop")
    batch = f"online-dpo-round-{round_no}"
    rows = [r for r in exported.rows if (r.get("provenance") or {}).get("batch") == batch]
    return records_from_dicts(rows, f"store export, round {round_no}"), facts


# ----------------------------------------------------------------------------------------------------------
# Entry point


def run_online_dpo(recipe: OnlineDPORecipe) -> dict[str, Any]:
    from glmwb.align.dpo import evaluate_folder, train_policy
    from glmwb.annotation.tasks import SamplingConfig, sample_responses
    from glmwb.pretrain.run import load_tokenizer
    from glmwb.pretrain.world import make_world

    run_dir = Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    policy = recipe.model.init_from
    if not policy or not (Path(policy) / "config.json").is_file():
        raise ConfigError(f"model.init_from: no model folder at {policy!r} (expected config.json there)")
    for name, folder in (
        ("label.reward_model", recipe.label.reward_model),
        ("eval.reward_model", recipe.eval.reward_model),
    ):
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"{name}: no reward folder at {folder!r}")
    tok = load_tokenizer(policy)
    r = recipe.rounds
    world = make_world(seed=r.world.seed, num_entities=r.world.num_entities)
    eval_prompts = world.prompts("heldout", recipe.eval.world_prompts, seed=recipe.run.seed)
    scorer = eval_scorer = None
    if recipe.label.source == "rm":
        from glmwb.rewards.scoring import RewardScorer

        scorer = RewardScorer.from_pretrained(recipe.label.reward_model)
    if recipe.eval.reward_model:
        from glmwb.rewards.scoring import RewardScorer

        same = recipe.eval.reward_model == recipe.label.reward_model and scorer is not None
        eval_scorer = scorer if same else RewardScorer.from_pretrained(recipe.eval.reward_model)
    db = recipe.label.store or str(run_dir / "annotation.db")

    base = recipe.dpo_recipe(run_dir)
    start = evaluate_folder(policy, tok, [], None, world, eval_prompts, eval_scorer, base).get("world")
    rounds: list[dict[str, Any]] = [{"round": 0, "policy": policy, "eval": _brief(start)}]
    print(f"round 0 (start): {_line(start)}")
    for i in range(1, r.rounds + 1):
        t0 = time.time()
        round_dir = run_dir / f"round_{i}"
        round_dir.mkdir(parents=True, exist_ok=True)
        specs = world_prompt_specs(world, r.prompts_per_round, recipe.run.seed * 1000 + i, r.split, r.families,
                                   r.phrasings)  # fmt: skip
        sampling = SamplingConfig(k=r.k, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                  top_p=r.top_p, batch_size=r.batch_size, seed=recipe.run.seed * 1000 + i)  # fmt: skip
        answers = sample_responses(specs, policy, sampling, model_name=f"round-{i - 1}", progress=True)
        facts: dict[str, Any] = {"prompts": len(specs), "answers": sum(len(v) for v in answers.values())}
        if recipe.label.source == "store":
            records, store_facts = store_round(recipe.label, specs, answers, db, i, recipe.run.seed + i)
            facts.update(store_facts)
            if records is None:
                msg = (f"round {i}: {store_facts['items_added']} comparison items written to {db}; label them "
                       f"(glmwb annotate --db {db}), then export the pairs and run recipes/dpo.yaml on them")  # fmt: skip
                print(msg)
                rounds.append({"round": i, "status": "waiting_for_annotators", "facts": facts, "note": msg})
                break
        else:
            from glmwb.align.onpolicy import build_onpolicy_pairs

            texts = {uid: [a.text for a in rows] for uid, rows in answers.items()}
            records, got = build_onpolicy_pairs(
                specs, lambda _specs, _k, t=texts: t, r.k,
                lambda sp, ans, s=recipe.run.seed + i: label_scores(recipe.label, sp, ans, scorer, s),
                recipe.label.min_gap, recipe.label.source,
            )  # fmt: skip
            facts["prompts_without_pair"] = got["prompts_without_pair"]
            facts["mean_label_score"] = got["mean_score"]
        facts["pairs"] = len(records)
        if recipe.label.export:
            from glmwb.annotation.export import write_records

            if records:
                write_records([rec.to_dict() for rec in records], round_dir / "pairs.jsonl")
        if not records:
            print(f"round {i}: no pairs (every prompt's answers were alike); stopping")
            rounds.append({"round": i, "status": "no_pairs", "facts": facts})
            break
        print(f"round {i}: {facts['answers']} answers to {facts['prompts']} prompts → {len(records)} pairs")
        round_recipe = recipe.dpo_recipe(round_dir)
        train = train_policy(round_recipe, policy, records, tok, round_dir, print)
        policy = train["final"]
        report = evaluate_folder(policy, tok, [], None, world, eval_prompts, eval_scorer, round_recipe).get(
            "world"
        )
        print(f"round {i}: {_line(report)} ({time.time() - t0:.0f} s)")
        rounds.append({"round": i, "policy": policy, "facts": facts, "train": train, "eval": _brief(report),
                       "seconds": time.time() - t0})  # fmt: skip
    policy, budget = _final_policy(recipe, run_dir, rounds, policy)
    table = _rounds_table(rounds)
    print(f"\nonline DPO ({recipe.label.source} labels, {recipe.engine}), held-out world prompts:\n{table}")
    (run_dir / "rounds.md").write_text(table + "\n")
    summary = {"stage": "online_dpo", "label": recipe.label.source, "rounds": rounds, "table": table,
               "final": policy}  # fmt: skip
    write_summary(run_dir, summary, budget)
    return summary


def _final_policy(recipe: OnlineDPORecipe, run_dir: Path, rounds: list[dict[str, Any]], policy: str):
    """All rounds' budget record, and the last round's policy copied to run.dir/final (where the DPO stage
    leaves its policy) with that record. Returns (final policy folder, budget or None when nothing trained)."""
    trained = [Budget.from_dict(r["train"]["budget"]) for r in rounds if "train" in r]
    if not trained:
        return policy, None
    import shutil

    from glmwb.pretrain.run_folder import write_model_record

    budget = Budget.combine("online_dpo", trained, "round")
    final = str(shutil.copytree(policy, run_dir / "final", dirs_exist_ok=True))
    write_model_record(final, budget, run_dir, recipe.model.init_from)
    print(f"online DPO: {len(trained)} rounds, {budget.line()} in all")
    return final, budget


def _brief(report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {}
    keys = ("n", "accuracy", "right_language", "concision", "score", "mean_chars", "reward_mean")
    return {k: report[k] for k in keys if k in report}


def _line(report: dict[str, Any] | None) -> str:
    if report is None:
        return "not evaluated (eval.world_prompts is 0)"
    rm = f", RM {report['reward_mean']:.3f}" if "reward_mean" in report else ""
    return (f"accuracy {report['accuracy']:.3f}, score {report['score']:.3f}, "
            f"{report['mean_chars']:.1f} chars{rm}")  # fmt: skip


def _rounds_table(rounds: list[dict[str, Any]]) -> str:
    lines = ["| round | pairs | accuracy | right_language | concision | score | mean_chars | RM reward |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rounds:
        e = row.get("eval")
        if not e or "accuracy" not in e:
            lines.append(
                f"| {row['round']} | {row.get('facts', {}).get('pairs', '—')} | "
                f"{row.get('status') or 'not evaluated (eval.world_prompts: 0)'} |"
            )
            continue
        rm = f"{e['reward_mean']:.3f}" if "reward_mean" in e else "—"
        lines.append(
            f"| {row['round']} | {row.get('facts', {}).get('pairs', '—')} | {e['accuracy']:.3f} | "
            f"{e['right_language']:.3f} | {e['concision']:.3f} | {e['score']:.3f} | {e['mean_chars']:.1f} | {rm} |"
        )
    return "\n".join(lines)
