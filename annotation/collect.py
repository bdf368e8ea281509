"""`stage: preferences` — one round of preference collection through the store, as a recipe step.

    prompts (world split or a file) -> K answers per prompt sampled from each policy folder
      -> comparison items in the store (SQLite in the run folder, or any store URL)
      -> votes: the world's simulated annotators through the store's assignment (or people, on the
         annotator page, when ``annotators.simulated`` is 0)
      -> export (majority / all votes) to ``preferences.jsonl``, the file the reward and DPO stages read
         (``data.extra_paths``), plus ``agreement.md`` and ``summary.json``.

It is the quickstart's "preferences" step: the policy's own samples, labelled through the same store,
assignment and export code that people use (``glmwb annotate``). Running it again goes on where it stopped:
items of the run's batch are not added twice, and only unassigned work is voted on.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveFloat, PositiveInt, Range
from glmwb.pretrain.settings import RunConfig


@dataclass(frozen=True)
class CollectPromptsConfig:
    source: str = "world:train"  # world[:split] (train, dev, ...), a JSONL file or a datasets folder
    n: PositiveInt = 400
    world_seed: NonNegInt = 0  # world prompts: which world (the one the policies were trained on)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"prompts.n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class CollectSamplingConfig:
    k: Annotated[int, Range(2)] = 2  # answers per prompt and policy
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    max_new_tokens: PositiveInt = 48
    batch_size: PositiveInt = 64

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError("sampling.k must be >= 1 and sampling.temperature > 0")


@dataclass(frozen=True)
class CollectAnnotatorsConfig:
    # simulated annotators voting through the store; 0 = leave the items for people
    simulated: NonNegInt = 3
    noise: Fraction = 0.1  # each simulated annotator's chance of a random judgement
    overlap: PositiveInt = 3  # distinct annotators per item
    strength: bool = False  # a winner's vote also says how much better it is (the export's margin)

    def __post_init__(self) -> None:
        if self.simulated < 0 or not 0.0 <= self.noise <= 1.0 or self.overlap < 1:
            raise ValueError("annotators: simulated >= 0, noise in [0, 1], overlap >= 1")
        if self.simulated and self.overlap > self.simulated:
            raise ValueError(
                f"annotators.overlap ({self.overlap}) needs as many simulated annotators "
                f"(annotators.simulated = {self.simulated})"
            )


@dataclass(frozen=True)
class CollectExportConfig:
    mode: Literal["majority", "all"] = "majority"
    ties: Literal["keep", "drop"] = "keep"
    both_bad: Literal["tie", "drop"] = "tie"
    min_votes: PositiveInt = 1


@dataclass(frozen=True)
class PreferencesRecipe:
    """`stage: preferences` — sample from policies, label through the store, export preference pairs."""

    stage: Literal["preferences"] = "preferences"
    run: RunConfig = field(default_factory=RunConfig)
    store: str | None = None  # SQLAlchemy URL or SQLite path; default: {run.dir}/store.db
    batch: str = "round-1"  # the store's batch name for this round's items
    policies: tuple[str, ...] = ()  # HF policy folders to sample answers from
    prompts: CollectPromptsConfig = field(default_factory=CollectPromptsConfig)
    sampling: CollectSamplingConfig = field(default_factory=CollectSamplingConfig)
    items_per_prompt: PositiveInt = 1  # comparisons per prompt (distinct pairs of distinct answers)
    annotators: CollectAnnotatorsConfig = field(default_factory=CollectAnnotatorsConfig)
    export: CollectExportConfig = field(default_factory=CollectExportConfig)

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("policies: list at least one policy folder to sample answers from")
        if self.items_per_prompt < 1:
            raise ValueError(f"items_per_prompt must be >= 1, got {self.items_per_prompt}")


def run_preferences(recipe: PreferencesRecipe) -> dict[str, Any]:
    from glmwb.annotation.agreement import agreement_report
    from glmwb.annotation.export import export_records, write_records
    from glmwb.annotation.store import Store
    from glmwb.annotation.tasks import (
        SamplingConfig,
        load_prompts,
        make_items,
        sample_responses,
        simulate_votes,
    )

    out = Path(recipe.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder in recipe.policies:
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"policies: no model folder at {folder} (no config.json); run SFT first")
    p = recipe.prompts
    source = p.source
    if source == "world" or source.startswith("world:"):
        parts = source.split(":")
        source = f"world:{parts[1] if len(parts) > 1 and parts[1] else 'train'}:{p.n}"
    try:
        prompts = load_prompts(source, limit=p.n, seed=p.world_seed)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"prompts.source: {e}") from e
    store = Store(recipe.store or out / "store.db")
    try:
        in_batch = [i for i in store.items().values() if i.batch == recipe.batch]
        if in_batch:  # a second run of this round: its items are there, go on with the votes
            print(f"preferences: {len(in_batch)} items of batch {recipe.batch!r} already in the store")
            added = 0
        else:
            s = recipe.sampling
            config = SamplingConfig(
                k=s.k, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                batch_size=s.batch_size, seed=recipe.run.seed,
            )  # fmt: skip
            responses: dict[str, list] = {q.uid: [] for q in prompts}
            for folder in recipe.policies:
                for uid, answers in sample_responses(prompts, folder, config).items():
                    responses[uid].extend(answers)
            items = make_items(
                prompts, responses, per_item=2, items_per_prompt=recipe.items_per_prompt,
                overlap=recipe.annotators.overlap, batch=recipe.batch, seed=recipe.run.seed,
            )  # fmt: skip
            if not items:
                raise ConfigError(
                    "preferences: no prompt got two distinct non-empty answers; raise sampling.k or "
                    "sampling.temperature"
                )
            added = len(store.add_items(items, seed=recipe.run.seed))
            print(f"preferences: {added} items from {len(prompts)} prompts x {recipe.sampling.k} samples "
                  f"x {len(recipe.policies)} policies")  # fmt: skip
        a = recipe.annotators
        names = [f"sim-{i}" for i in range(a.simulated)]
        for name in names:
            if store.annotator(name) is None:  # a random password: nobody signs in as a simulation
                store.create_annotator(name, os.urandom(16).hex(), role="annotator")
        cast = (
            simulate_votes(store, names, noise=a.noise, seed=recipe.run.seed, strength=a.strength)
            if names
            else 0
        )
        e = recipe.export
        result = export_records(store, mode=e.mode, ties=e.ties, both_bad=e.both_bad, min_votes=e.min_votes)
        rows = [r for r in result.rows if r["provenance"]["batch"] == recipe.batch]
        path = write_records(rows, out / "preferences.jsonl")
        mine = {i.item_id for i in store.items().values() if i.batch == recipe.batch}
        votes = [v for v in store.votes() if v.item_id in mine]
        report = agreement_report(votes)
        (out / "agreement.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
        quality = _world_quality(rows, {q.uid: q.meta.get("world_prompt") for q in prompts})
    finally:
        store.close()
    summary = {
        "store": str(recipe.store or out / "store.db"),
        "batch": recipe.batch,
        "prompts": len(prompts),
        "items_added": added,
        "votes_cast": cast,
        "votes": len(votes),
        "rows": len(rows),
        "ties": sum(r["tie"] for r in rows),
        "skipped": dict(result.skipped),
        "agreement": report.to_dict(),
        "world": quality,
        "preferences": str(path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    line = f"preferences: {cast} votes cast, {len(rows)} pairs ({summary['ties']} ties) → {path}"
    if quality:
        line += (
            f"; chosen better by the world's checker in {quality['chosen_better']:.3f} of strict pairs, "
            f"worse in {quality['chosen_worse']:.3f}"
        )
    print(line)
    return summary


def _world_quality(rows: list[dict[str, Any]], world_prompts: dict[str, Any]) -> dict[str, float] | None:
    """On world prompts: how often the exported chosen answer is better / worse than the rejected one by the
    world's noise-free score (strict pairs), and the answers' accuracy — the labels' quality at a glance."""
    from glmwb.pretrain.world import Prompt, check

    checked: Counter[str] = Counter()
    for r in rows:
        wp = world_prompts.get(r["provenance"]["prompt_uid"])
        if wp is None or r["tie"]:
            continue
        prompt = Prompt.from_dict(wp)
        a = check(prompt, r["chosen"][0]["content"]).score
        b = check(prompt, r["rejected"][0]["content"]).score
        checked["strict"] += 1
        checked["better"] += a > b
        checked["worse"] += a < b
    if not checked["strict"]:
        return None
    n = checked["strict"]
    return {"strict_pairs": n, "chosen_better": checked["better"] / n, "chosen_worse": checked["worse"] / n}
