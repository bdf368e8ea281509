"""`stage: arena` — an arena round: anonymous battles among policies, judged by simulated evaluators,
rated on the leaderboard, and exported as preference pairs.

    prompts (a world split) -> k answers per prompt from each policy (sampled once, named by the policy)
      -> battles in rounds: the pair drawn by ``ratings.next_pair`` (active selection on the current fit;
         the pair's probability and inverse-probability weight recorded), a prompt and one answer of each
         drawn at random, left / right drawn by the store -> a two-answer comparison item with arena
         bookkeeping (``item.meta["arena"]``) -> one simulated evaluator's vote (the world's annotator rule,
         ``annotators.SimulatedAnnotator``) through the store's assignment
      -> the leaderboard (``ratings.fit_bt``: Davidson ties, both bad apart, bootstrap intervals, fragility)
         printed and written to ``leaderboard.txt`` / ``leaderboard.json`` / ``leaderboard.png``
      -> the votes exported as preference pairs (``preferences.jsonl``, the same export as annotators').

The quickstart ends with it (base, SFT, DPO, PPO and PPO-RM policies). A rerun with the same run folder
goes on from the battles already in its store.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmwb.annotation.collect import CollectSamplingConfig
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveInt
from glmwb.pretrain.settings import RunConfig


@dataclass(frozen=True)
class ArenaPolicy:
    name: str
    path: str


@dataclass(frozen=True)
class ArenaPromptsConfig:
    source: str = "world:test"  # world[:split]: the simulated evaluators judge world prompts only
    n: PositiveInt = 150
    world_seed: NonNegInt = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"prompts.n must be >= 1, got {self.n}")
        if not (self.source == "world" or self.source.startswith("world:")):
            raise ValueError(f"prompts.source must be a world split (world:SPLIT), got {self.source!r}")


@dataclass(frozen=True)
class ArenaSamplingConfig(CollectSamplingConfig):
    """The preferences stage's sampling, except that one answer per prompt and policy is enough here."""

    k: PositiveInt = 2  # answers per prompt and policy


@dataclass(frozen=True)
class ArenaBattlesConfig:
    n: PositiveInt = 600  # battles in all (this round and earlier runs of it)
    selection: Literal["active", "uniform"] = "active"
    explore: Fraction = 0.2  # active selection: the uniform share of the pair distribution
    refit_every: PositiveInt = 100  # battles between refits of the leaderboard the selection uses
    evaluators: PositiveInt = 3  # simulated evaluators; each battle is judged by one
    noise: Fraction = 0.1

    def __post_init__(self) -> None:
        if self.n < 1 or self.refit_every < 1 or self.evaluators < 1:
            raise ValueError("battles: n, refit_every and evaluators must be >= 1")
        if not 0.0 <= self.explore <= 1.0 or not 0.0 <= self.noise <= 1.0:
            raise ValueError("battles: explore and noise must be in [0, 1]")


@dataclass(frozen=True)
class ArenaLeaderboardConfig:
    ties: Literal["davidson", "rao-kupper", "none"] = "davidson"
    bothbad: Literal["separate", "tie", "drop"] = "separate"
    bootstrap: NonNegInt = 1000
    style_control: bool = False
    fragility: bool = True

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"leaderboard.bootstrap must be >= 0, got {self.bootstrap}")


@dataclass(frozen=True)
class ArenaRecipe:
    """`stage: arena` — anonymous battles among policies, simulated evaluators, the leaderboard."""

    stage: Literal["arena"] = "arena"
    run: RunConfig = field(default_factory=RunConfig)
    store: str | None = None  # SQLAlchemy URL or SQLite path; default: {run.dir}/store.db
    batch: str = "arena-1"
    policies: tuple[ArenaPolicy, ...] = ()
    prompts: ArenaPromptsConfig = field(default_factory=ArenaPromptsConfig)
    sampling: ArenaSamplingConfig = field(default_factory=ArenaSamplingConfig)
    battles: ArenaBattlesConfig = field(default_factory=ArenaBattlesConfig)
    leaderboard: ArenaLeaderboardConfig = field(default_factory=ArenaLeaderboardConfig)
    skip_missing: bool = False  # leave out policies whose folder is missing (else: an error)

    def __post_init__(self) -> None:
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError(f"policies: names must be unique, got {names}")


def _battle_item(prompt, a, b, arena: dict[str, Any], batch: str):
    from glmwb.annotation.store import NewItem

    return NewItem(
        prompt_uid=prompt.uid,
        prompt=prompt.messages,
        responses=[a, b],
        source=prompt.source,
        prompt_meta=prompt.meta,
        overlap=1,
        batch=batch,
        meta={"arena": arena},
    )


def _present_policies(recipe: ArenaRecipe) -> list[ArenaPolicy]:
    """The policies whose model folder exists (a missing one is an error unless ``skip_missing``)."""
    policies = []
    for p in recipe.policies:
        if (Path(p.path) / "config.json").is_file():
            policies.append(p)
        elif not recipe.skip_missing:
            raise ConfigError(f"policies: no model folder for {p.name!r} at {p.path} (no config.json)")
        else:
            print(f"arena: {p.name} left out (no model folder at {p.path})")
    if len(policies) < 2:
        raise ConfigError(f"arena: needs at least two policies, has {[p.name for p in policies]}")
    return policies


def _policy_answers(
    recipe: ArenaRecipe, policies: list[ArenaPolicy], prompts: list, answers_file: Path
) -> dict:
    """Each policy's sampled answers per prompt uid; a rerun reads the ones already in ``answers_file``."""
    from glmwb.annotation.store import NewResponse
    from glmwb.annotation.tasks import SamplingConfig, sample_responses

    answers: dict[str, dict[str, list[NewResponse]]] = {}
    if answers_file.is_file():  # a rerun: the same answers
        for line in answers_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            answers.setdefault(row["policy"], {}).setdefault(row["prompt_uid"], []).append(
                NewResponse(
                    row["text"],
                    row["policy"],
                    row.get("checkpoint"),
                    row.get("sampling", {}),
                    row.get("chat_template_sha256"),
                )  # fmt: skip
            )
    s = recipe.sampling
    config = SamplingConfig(k=s.k, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            batch_size=s.batch_size, seed=recipe.run.seed)  # fmt: skip
    for p in policies:
        if p.name in answers:
            continue
        got = sample_responses(prompts, p.path, config, model_name=p.name)
        answers[p.name] = got
        with answers_file.open("a", encoding="utf-8") as f:
            for uid, rs in got.items():
                for r in rs:
                    f.write(json.dumps({"policy": p.name, "prompt_uid": uid, "text": r.text, "checkpoint": r.checkpoint,
                                        "sampling": r.sampling, "chat_template_sha256": r.chat_template_sha256},
                                       ensure_ascii=False) + "\n")  # fmt: skip
    return answers


def _judge_battles(store, recipe: ArenaRecipe, names: list[str], prompts: list, answers: dict) -> None:
    """Battles up to ``battles.n`` in rounds of ``refit_every``: each round's pairs are drawn (actively, from a
    fit of the votes so far, or uniformly), stored as items and judged by the simulated evaluators."""
    import numpy as np

    from glmwb.annotation.ratings import battles_from_store, fit_bt, next_pair
    from glmwb.annotation.tasks import simulate_votes

    b = recipe.battles
    evaluators = [f"evaluator-{i}" for i in range(b.evaluators)]
    for name in evaluators:
        if store.annotator(name) is None:  # a random password: nobody signs in as a simulation
            store.create_annotator(name, os.urandom(16).hex(), role="annotator")
    rng = np.random.default_rng(recipe.run.seed)
    pick = random.Random(f"arena|{recipe.run.seed}")
    done = len([i for i in store.items().values() if i.batch == recipe.batch])
    if done:
        print(f"arena: {done} battles of batch {recipe.batch!r} already in the store")
        rng = np.random.default_rng([recipe.run.seed, done])
    while done < b.n:
        lb = None
        if b.selection == "active":
            battles = battles_from_store(store, arena_only=True)
            if len({x.model_a for x in battles} | {x.model_b for x in battles}) >= 2:
                try:
                    lb = fit_bt(
                        battles, bootstrap=0, ties=recipe.leaderboard.ties, bothbad=recipe.leaderboard.bothbad
                    )
                except ConfigError:
                    lb = None  # e.g. the models met in disconnected groups so far: uniform until they meet
        items = []
        for _ in range(min(b.refit_every, b.n - done)):
            choice = next_pair(lb, names, rng, explore=b.explore if b.selection == "active" else 1.0)
            prompt = prompts[pick.randrange(len(prompts))]
            a = pick.choice(answers[choice.model_a][prompt.uid])
            c = pick.choice(answers[choice.model_b][prompt.uid])
            arena = {"mode": "anonymous", "counted": True, "pair_prob": choice.prob, "weight": choice.weight,
                     "category": prompt.meta["world_prompt"].get("family"), "selection": b.selection,
                     "lang": prompt.meta["world_prompt"].get("lang")}  # fmt: skip
            items.append(_battle_item(prompt, a, c, arena, recipe.batch))
        store.add_items(items, seed=recipe.run.seed * 1_000_003 + done)
        cast, share = 0, -(-len(items) // len(evaluators))  # each evaluator judges its share in turn
        for i, name in enumerate(evaluators):
            cast += simulate_votes(store, [name], noise=b.noise, seed=recipe.run.seed * 100 + i, limit=share)
        done += len(items)
        print(f"arena: {done} of {b.n} battles, {cast} votes this round", flush=True)


def _final_leaderboard(store, recipe: ArenaRecipe, out: Path) -> tuple:
    """The leaderboard of every counted battle (printed, saved as text / JSON / plot) and the votes exported
    as preference pairs; returns (battles, leaderboard, plot, rows, preferences file)."""
    from glmwb.annotation.export import export_records, write_records
    from glmwb.annotation.ratings import (
        adjacent_separations,
        battles_from_store,
        fit_bt,
        plot_leaderboard,
        rank_fragility,
        ratings_json,
    )

    battles = battles_from_store(store, arena_only=True)
    lcfg = recipe.leaderboard
    lb = fit_bt(battles, bootstrap=lcfg.bootstrap, style_control=lcfg.style_control, seed=recipe.run.seed,
                ties=lcfg.ties, bothbad=lcfg.bothbad)  # fmt: skip
    if lcfg.fragility:
        rank_fragility(battles, lb)
    table = lb.table()
    seps = [x for x in adjacent_separations(lb) if x.votes]
    if seps:
        table += "\n\nbattles still needed to separate neighbours (at the estimated gap):\n" + "\n".join(
            f"  {x.model_a} vs {x.model_b}: gap {x.gap:+.0f}, about {x.votes} more" for x in seps
        )
    print("\n" + table + "\n")
    (out / "leaderboard.txt").write_text(table + "\n", encoding="utf-8")
    ratings_json(lb, out / "leaderboard.json")
    plot = plot_leaderboard(lb, battles, out / "leaderboard.png")
    result = export_records(store, mode="all", ties="keep", both_bad="tie")
    rows = [r for r in result.rows if r["provenance"]["batch"] == recipe.batch]
    prefs = write_records(rows, out / "preferences.jsonl")
    return battles, lb, plot, rows, prefs


def run_arena(recipe: ArenaRecipe) -> dict[str, Any]:
    from glmwb.annotation.ratings import online_elo
    from glmwb.annotation.store import Store
    from glmwb.annotation.tasks import load_prompts

    out = Path(recipe.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    policies = _present_policies(recipe)
    names = [p.name for p in policies]
    pr = recipe.prompts
    parts = pr.source.split(":")
    prompts = load_prompts(f"world:{parts[1] if len(parts) > 1 and parts[1] else 'test'}:{pr.n}", pr.n,
                           seed=pr.world_seed)  # fmt: skip
    answers = _policy_answers(recipe, policies, prompts, out / "answers.jsonl")
    store = Store(recipe.store or out / "store.db")
    try:
        _judge_battles(store, recipe, names, prompts, answers)
        battles, lb, plot, rows, prefs = _final_leaderboard(store, recipe, out)
    finally:
        store.close()
    summary = {
        "store": str(recipe.store or out / "store.db"),
        "batch": recipe.batch,
        "policies": names,
        "battles": len(battles),
        "leaderboard": lb.to_dict(),
        "online_elo": online_elo(battles),
        "plot": str(plot),
        "preferences": str(prefs),
        "pairs": len(rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    top = ", ".join(f"{r.rank}. {r.model} {r.rating:.0f}" for r in lb.rows)
    print(f"arena: {len(battles)} battles; {top}; {len(rows)} preference pairs → {prefs}; plot → {plot}")
    return summary
