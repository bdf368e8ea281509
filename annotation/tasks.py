"""Comparison tasks: prompts -> K sampled answers per prompt from one or more models -> items in the store.

Prompt sources (``load_prompts``):
- ``world``, ``world:train``, ``world:heldout:200``: the embedded world's prompts (``pretrain/world/``);
  each keeps its world prompt in ``meta["world_prompt"]``, so its answers can be checked and simulated
  annotators can judge them (``simulate_votes``);
- a JSONL file, or a saved ``datasets`` folder, with rows holding ``messages`` (chat messages) or ``prompt``
  (a string or chat messages), and optionally ``id`` / ``uid``; other fields go to the prompt's metadata.

Answers come from:
- ``sample_responses``: an HF model folder (ours or ``transformers``' ``GlmForCausalLM``) with its
  tokenizer; prompts rendered with the folder's chat template (generation prompt ``<|assistant|>``),
  ``k`` samples per prompt in batches (progress with tqdm), stopping at GLM's turn terminators. Every
  answer records model, checkpoint folder, sampling parameters (with the batch's seed) and the SHA-256 of
  the chat template;
- ``read_responses``: pre-generated answers, JSONL rows ``{"prompt" | "messages", "responses": [str |
  {"text", "model", "checkpoint", "sampling", ...}], "id"?}``;
- ``world_candidates``: the embedded world's candidate answers of known quality (no model needed).

``make_items`` turns each prompt's answers into comparison items (``per_item`` answers each, distinct texts
only), with a priority from ``priority_fn`` (e.g. reward-model disagreement, ``assign.priority_from_scores``).
``world_items`` makes ready items from the embedded world, with gold items whose answer is the world's
noise-free preference rule.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmwb.annotation.preference_data import iter_rows
from glmwb.annotation.records import PreferenceDataError, validate_prompt, validate_text
from glmwb.annotation.store import NewItem, NewResponse, Store

PriorityFn = Callable[["PromptSpec", Sequence[str]], float]


@dataclass(frozen=True)
class PromptSpec:
    uid: str
    messages: list[dict[str, Any]]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _uid(messages: Sequence[dict[str, Any]]) -> str:
    return (
        "p-"
        + hashlib.sha256(json.dumps(list(messages), ensure_ascii=False, sort_keys=True).encode()).hexdigest()[
            :20
        ]
    )


def _prompt_from_row(row: Any, where: str, source: str) -> PromptSpec:
    """A prompt row (``messages`` or ``prompt``: a string or chat messages), checked as a preference record's
    prompt is (roles, text content, ending with a user turn), so that a bad item is refused here, by row,
    and can never reach the store and block an export later."""
    if isinstance(row, PreferenceDataError):
        raise row
    if not isinstance(row, Mapping):
        raise PreferenceDataError(f"{where}: a prompt row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row:
        messages = row["prompt"]
    else:
        raise PreferenceDataError(f"{where}: a prompt row needs 'messages' or 'prompt' (has {sorted(row)})")
    if isinstance(messages, list):
        messages = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in messages
        ]
    messages = [dict(m) for m in validate_prompt(messages, where)]
    uid = row.get("uid") or row.get("id") or _uid(messages)
    meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "uid", "id", "responses")}
    return PromptSpec(str(uid), messages, source, meta)


def load_prompts(source: str, limit: int | None = None, seed: int = 0) -> list[PromptSpec]:
    """Prompts from ``world[:split[:n]]``, a JSONL file or a ``datasets`` folder (see the module doc)."""
    if source == "world" or source.startswith("world:"):
        from glmwb.pretrain.world import make_world

        parts = source.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        n = int(parts[2]) if len(parts) > 2 else (limit or 100)
        world = make_world(seed)
        return [
            PromptSpec(p.id, [dict(m) for m in p.messages], "world", {"world_prompt": p.to_dict()})
            for p in world.prompts(split, n, seed=seed)
        ][: limit or None]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no prompt file or folder at {source!r} (or use world[:split[:n]])")
    if path.is_dir():
        import datasets

        rows = datasets.load_from_disk(str(path))
        rows = ((f"{source}, row {i}", row) for i, row in enumerate(rows, 1))
    else:
        rows = iter_rows(path)
    out = []
    for where, row in rows:
        out.append(_prompt_from_row(row, where, path.name))
        if limit is not None and len(out) >= limit:
            break
    return out


def chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 2  # answers per prompt
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 16  # sequences per generate() call
    seed: int = 0


def sample_responses(
    prompts: Sequence[PromptSpec],
    model_dir: str | Path,
    config: SamplingConfig = SamplingConfig(),
    model_name: str | None = None,
    progress: bool = True,
) -> dict[str, list[NewResponse]]:
    """``config.k`` answers per prompt from the model folder; {prompt uid: answers}."""
    from tqdm.auto import tqdm

    from glmwb.pretrain.generate import generate
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.tokenizer import load_glm_tokenizer, render_chat, turn_terminator_ids

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {str(model_dir)!r} (expected config.json there)")
    tokenizer = load_glm_tokenizer(folder)
    model = load_pretrained(folder)
    name = model_name or folder.resolve().name
    template_sha = chat_template_sha256(tokenizer)
    stops = turn_terminator_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    jobs = [(p, j) for p in prompts for j in range(config.k)]  # (prompt, sample index)
    encoded = {
        p.uid: tokenizer(
            render_chat(tokenizer, p.messages, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        for p in prompts
    }
    out: dict[str, list[NewResponse]] = {p.uid: [] for p in prompts}
    batches = range(0, len(jobs), config.batch_size)
    for b, start in enumerate(tqdm(batches, desc=f"sampling {name}", unit="batch", disable=not progress)):
        batch = jobs[start : start + config.batch_size]
        seed = config.seed * 1_000_003 + b
        new_tokens = generate(
            model,
            [encoded[p.uid] for p, _ in batch],
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            stop_token_ids=stops,
            pad_token_id=pad,
            seed=seed,
        )
        for (p, j), ids in zip(batch, new_tokens, strict=True):
            out[p.uid].append(
                NewResponse(
                    text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    model=name,
                    checkpoint=str(folder.resolve()),
                    sampling={**asdict(config), "seed": seed, "sample": j},
                    chat_template_sha256=template_sha,
                    meta={"tokens": len(ids), "stopped": bool(ids) and ids[-1] in stops},
                )
            )
    return out


def read_responses(path: str | Path) -> tuple[list[PromptSpec], dict[str, list[NewResponse]]]:
    """Pre-generated answers from a JSONL (or JSON, parquet) file or a saved ``datasets`` folder (see the
    module doc)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no responses file or datasets folder at {path}")
    prompts, responses = [], {}
    for where, row in iter_rows(path):
        spec = _prompt_from_row(row, where, Path(path).name)
        answers = [
            _new_response(r, f"{where}: responses[{j}]") for j, r in enumerate(row.get("responses") or [])
        ]
        if len(answers) < 2:
            raise PreferenceDataError(f"{where}: needs at least two responses, has {len(answers)}")
        spec_meta = {k: v for k, v in spec.meta.items() if k != "responses"}
        spec = PromptSpec(spec.uid, spec.messages, spec.source, spec_meta)
        prompts.append(spec)
        responses.setdefault(spec.uid, []).extend(answers)
    return prompts, responses


def _new_response(r: Any, where: str) -> NewResponse:
    if isinstance(r, str):
        r = {"text": r}
    if not isinstance(r, Mapping) or not isinstance(r.get("text"), str):
        raise PreferenceDataError(f"{where}: each response is a string or an object with 'text'")
    return NewResponse(
        text=validate_text(r["text"], "'text'", where),
        model=str(r.get("model") or "unknown"),
        checkpoint=r.get("checkpoint"),
        sampling=dict(r.get("sampling") or {}),
        chat_template_sha256=r.get("chat_template_sha256"),
        meta={k: v for k, v in r.items() if k not in NewResponse.__dataclass_fields__},
    )


def make_items(
    prompts: Sequence[PromptSpec],
    responses: dict[str, list[NewResponse]],
    per_item: int = 2,
    items_per_prompt: int = 1,
    overlap: int = 3,
    priority_fn: PriorityFn | None = None,
    batch: str = "",
    seed: int = 0,
) -> list[NewItem]:
    """Comparison items from each prompt's answers: ``items_per_prompt`` distinct random groups of
    ``per_item`` distinct, non-empty answers (0 = every group). Prompts with too few answers give none."""
    rng = random.Random(seed)
    items = []
    for p in prompts:
        seen, answers = set(), []
        for r in responses.get(p.uid, []):
            if r.text.strip() and r.text not in seen:
                seen.add(r.text)
                answers.append(r)
        groups = list(itertools.combinations(range(len(answers)), per_item))
        if not groups:
            continue
        chosen = groups if items_per_prompt <= 0 else rng.sample(groups, min(items_per_prompt, len(groups)))
        for group in chosen:
            group_answers = [answers[i] for i in group]
            priority = priority_fn(p, [a.text for a in group_answers]) if priority_fn else 0.0
            items.append(
                NewItem(
                    prompt_uid=p.uid,
                    prompt=p.messages,
                    responses=group_answers,
                    source=p.source,
                    prompt_meta=p.meta,
                    overlap=overlap,
                    priority=priority,
                    batch=batch,
                )
            )
    return items


def items_from_sources(
    *,
    prompts: str | None = None,
    models: Sequence[str] = (),
    responses: str | None = None,
    world: int | None = None,
    gold: int = 0,
    split: str = "train",
    limit: int | None = None,
    sampling: SamplingConfig | None = None,
    per_item: int = 2,
    items_per_prompt: int = 1,
    overlap: int = 3,
    batch: str = "",
    seed: int = 0,
) -> list[NewItem]:
    """Comparison items from exactly one source, as ``glmwb annotation add-tasks`` and the admin page's
    import make them: ``responses`` (pre-generated answers, ``read_responses``), ``prompts`` with one or more
    ``models`` to sample from, or ``world`` (N items of the embedded world, ``gold`` of them gold). A wrong
    combination is a ``ConfigError``; a malformed file a ``PreferenceDataError`` naming the row and field."""
    from glmwb.pretrain.errors import ConfigError

    if sum(x is not None for x in (prompts, responses, world)) != 1:
        raise ConfigError("give exactly one of --prompts (with --model), --responses FILE, --world N")
    if world is not None:
        return world_items(world, split, gold, overlap, seed, batch or "world")
    if responses:
        specs, answers = read_responses(responses)
    else:
        if not models:
            raise ConfigError("--prompts needs --model DIR (one or more) to sample answers from")
        specs = load_prompts(prompts, limit=limit, seed=seed)
        answers = {p.uid: [] for p in specs}
        for model in models:
            for uid, sampled in sample_responses(specs, model, sampling or SamplingConfig(seed=seed)).items():
                answers[uid].extend(sampled)
    return make_items(specs, answers, per_item=per_item, items_per_prompt=items_per_prompt, overlap=overlap,
                      batch=batch, seed=seed)  # fmt: skip


def world_candidates(prompts: Sequence[PromptSpec], seed: int = 0) -> dict[str, list[NewResponse]]:
    """The embedded world's candidate answers (one of each kind: correct, wrong, verbose, ...)."""
    from glmwb.pretrain.world import Prompt
    from glmwb.pretrain.world.model import cached_world

    out = {}
    for p in prompts:
        prompt = Prompt.from_dict(p.meta["world_prompt"])
        world = cached_world(*prompt.world_key)
        out[p.uid] = [
            NewResponse(r.text, f"world:{r.kind}", meta={"kind": r.kind})
            for r in world.responses(prompt, seed)
        ]
    return out


def world_items(
    n: int,
    split: str = "train",
    gold: int = 0,
    overlap: int = 3,
    seed: int = 0,
    batch: str = "world",
) -> list[NewItem]:
    """``n`` regular items (two world candidates of different kinds per prompt) and ``gold`` gold items
    (a correct answer against an incorrect one: the rule's answer is certain) from the embedded world."""
    from glmwb.annotation.annotators import PreferenceRule
    from glmwb.pretrain.world import Prompt, check

    prompts = load_prompts(f"world:{split}:{n + gold}", seed=seed)
    candidates = world_candidates(prompts, seed)
    rng = random.Random(f"world-items|{seed}")
    rule = PreferenceRule()
    items = []
    for i, p in enumerate(prompts):
        answers = {r.meta["kind"]: r for r in candidates[p.uid]}
        if i < gold:
            pair = [answers["correct"], answers[rng.choice(["wrong", "refusal", "off_topic"])]]
            prompt = Prompt.from_dict(p.meta["world_prompt"])
            label = rule.label(check(prompt, pair[0].text), check(prompt, pair[1].text))
            gold_answer: int | str | None = {"A": 0, "B": 1}.get(label, label)
        else:
            pair = rng.sample(list(answers.values()), 2)
            gold_answer = None
        items.append(
            NewItem(
                prompt_uid=p.uid,
                prompt=p.messages,
                responses=pair,
                source="world",
                prompt_meta=p.meta,
                overlap=overlap,
                gold=gold_answer,
                batch=batch,
            )
        )
    return items


def simulate_votes(
    store: Store,
    annotators: Sequence[str],
    noise: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    strength: bool = False,
) -> int:
    """Let the world's simulated annotators (``SimulatedAnnotator``) judge their assignments through the
    store, as people would through the page (world prompts only); returns the number of votes cast.
    ``strength``: a winner's vote also says how much better it is (``judge_with_strength``)."""
    from glmwb.annotation.annotators import SimulatedAnnotator
    from glmwb.pretrain.world import Prompt

    items = store.items()
    cast = 0
    for i, name in enumerate(annotators):
        who = store.annotator(name)
        if who is None:
            raise ValueError(f"no annotator {name!r} in the store (create it first)")
        judge = SimulatedAnnotator(noise=noise, seed=seed * 1000 + i, name=name)
        while limit is None or cast < limit:
            task = store.next_task(who)
            if task is None:
                break
            world_prompt = items[task.item_id].prompt_meta.get("world_prompt")
            if world_prompt is None or len(task.responses) != 2:
                store.skip(who, task.assignment_id)
                break
            label, level = judge.judge_with_strength(Prompt.from_dict(world_prompt), *task.responses)
            uid = f"simulated-{who.id}-{task.assignment_id}"
            store.submit_vote(
                who,
                task.assignment_id,
                label,
                uid=uid,
                guideline_version="simulated",
                strength=level if strength else None,
            )
            cast += 1
    return cast
