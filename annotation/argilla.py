"""Argilla as a labeling front end: push the store's comparison items to an Argilla dataset, pull the
submitted responses back as votes (``glmwb argilla push | pull | status``; docs/argilla.md).

Needs the ``argilla`` extra (the Argilla 2.x SDK), imported inside the functions. The dataset's schema:

- fields: ``prompt`` (a chat field: the prompt's conversation), ``response_a`` and ``response_b`` (text) in
  the store's display order;
- questions: ``preference`` (a label question: A, B, tie, both_bad), ``<attribute>_a`` / ``<attribute>_b``
  (ratings 1..5, optional) per rated attribute, ``rationale`` (text, optional);
- metadata: ``item_id``, ``model_a``, ``model_b``, ``display_order`` (the generation ids in display order);
- suggestions: a reward model's preference with its probability as the score and its name as the agent;
- distribution: ``min_submitted`` = the store's overlap (an item is complete with that many submissions).

A record's id is ``item-<item id>``, so pushing again updates records instead of adding copies. Pulling
reads the *submitted* responses; each Argilla user becomes the store's "external" annotator
``<username>@argilla``, and each response a vote keyed on (item, user, content): pulling again adds nothing,
a changed response retracts the old vote (kept in the history) and stores the new one
(``Store.record_external_vote``); a response no longer submitted (discarded, made a draft, deleted) retracts
the vote it gave. Agreement and export then count these votes like the page's.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmwb.annotation.store import ItemInfo, Store, StoreError

LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
DEFAULT_ATTRIBUTES = ("correctness", "helpfulness", "language")
DEFAULT_GUIDELINES = (
    "Read the conversation and the two answers, A and B. Choose the better answer, or Tie when they are "
    "equally good, or Both are bad when neither is acceptable. Optionally rate each answer 1-5 per attribute "
    "and say why in the rationale."
)
USER_SUFFIX = "@argilla"
TIMEOUT_S = 30


class ArgillaError(StoreError):
    """A problem with the Argilla server or dataset; the message says what and what would be right."""


@dataclass(frozen=True)
class RMSuggestion:
    """A reward model's view of one item: its rewards for A and B and the model's name (the agent)."""

    reward_a: float
    reward_b: float
    agent: str

    @property
    def preference(self) -> str:
        return "A" if self.reward_a >= self.reward_b else "B"

    @property
    def score(self) -> float:
        """The Bradley-Terry probability of the suggested answer being the better one."""
        margin = abs(self.reward_a - self.reward_b)
        return 1.0 / (1.0 + math.exp(-margin))


@dataclass
class PushResult:
    dataset: str
    pushed: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass
class PullResult:
    submitted: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    withdrawn: int = 0
    skipped: Counter = field(default_factory=Counter)


def connect(api_url: str, api_key: str):
    """An ``argilla.Argilla`` client, with the server's reachability and the key checked."""
    try:
        import argilla as rg
    except ImportError:
        raise ArgillaError("the Argilla SDK is not installed: pip install 'glm-workbench[argilla]'") from None
    import httpx

    try:  # one quick probe first: the SDK retries a refused connection for several seconds
        httpx.get(f"{api_url.rstrip('/')}/api/v1/version", timeout=10)
        client = rg.Argilla(api_url=api_url, api_key=api_key, timeout=TIMEOUT_S)
        client.me  # noqa: B018 (one request: the key is checked here, not at the first push)
    except (httpx.TransportError, ConnectionError) as e:
        raise ArgillaError(
            f"cannot reach the Argilla server at {api_url} ({type(e).__name__}); is it running?"
        ) from None
    except httpx.InvalidURL:
        raise ArgillaError(f"--url {api_url!r} is not a URL; e.g. http://127.0.0.1:6900") from None
    except (rg._exceptions.UnauthorizedError, rg._exceptions.ArgillaCredentialsError):
        raise ArgillaError(
            f"the Argilla server at {api_url} refused the API key; use an owner or admin key"
        ) from None
    except rg._exceptions.ArgillaError as e:
        raise ArgillaError(f"Argilla at {api_url}: {_first_line(e)}") from None
    return client


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def settings(
    overlap: int, attributes: Sequence[str] = DEFAULT_ATTRIBUTES, guidelines: str = DEFAULT_GUIDELINES
):
    """The ``argilla.Settings`` of a comparison dataset (see the module docstring)."""
    import argilla as rg

    ratings = [
        rg.RatingQuestion(
            name=f"{a}_{x.lower()}", title=f"{a} of {x}", values=[1, 2, 3, 4, 5], required=False
        )
        for a in attributes
        for x in ("A", "B")
    ]
    return rg.Settings(
        guidelines=guidelines,
        fields=[
            rg.ChatField(name="prompt", title="Conversation"),
            rg.TextField(name="response_a", title="Answer A"),
            rg.TextField(name="response_b", title="Answer B"),
        ],
        questions=[
            rg.LabelQuestion(name="preference", title="Which answer is better?", labels=LABELS),
            *ratings,
            rg.TextQuestion(name="rationale", title="Why? (optional)", required=False),
        ],
        metadata=[
            rg.IntegerMetadataProperty(name="item_id"),
            rg.TermsMetadataProperty(name="model_a"),
            rg.TermsMetadataProperty(name="model_b"),
            rg.TermsMetadataProperty(name="display_order"),
        ],
        distribution=rg.TaskDistribution(min_submitted=overlap),
    )


def check_schema(dataset, attributes: Sequence[str] | None = None) -> None:
    """Refuse a dataset that is not a comparison dataset of this module (or lacks a rated attribute)."""
    s = dataset.settings
    fields = {f.name for f in s.fields}
    questions = {q.name: q for q in s.questions}
    problems = [f"no field {n!r}" for n in ("prompt", "response_a", "response_b") if n not in fields]
    pref = questions.get("preference")
    if pref is None or set(getattr(pref, "labels", None) or []) != set(LABELS):
        problems.append(f"no label question 'preference' with labels {', '.join(LABELS)}")
    for a in attributes or ():
        problems += [f"no rating question {a}_{x!r}" for x in "ab" if f"{a}_{x}" not in questions]
    if problems:
        raise ArgillaError(
            f"Argilla dataset {dataset.name!r} does not have the workbench's comparison schema: "
            f"{'; '.join(problems)}. Push to a new dataset name (glmwb argilla push --dataset NEW)."
        )


def _record(item: ItemInfo, suggestion: RMSuggestion | None):
    import argilla as rg

    a, b = item.responses
    suggestions = []
    if suggestion is not None:
        suggestions.append(
            rg.Suggestion(
                "preference", suggestion.preference, score=round(suggestion.score, 6), agent=suggestion.agent
            )
        )
    return rg.Record(
        id=f"item-{item.item_id}",
        fields={
            "prompt": [
                {"role": m.get("role", "user"), "content": str(m.get("content", ""))} for m in item.prompt
            ],
            "response_a": a.text,
            "response_b": b.text,
        },
        metadata={
            "item_id": item.item_id,
            "model_a": a.model,
            "model_b": b.model,
            "display_order": f"{a.generation_id},{b.generation_id}",
        },
        suggestions=suggestions,
    )


def _skip(item: ItemInfo, skipped: Counter) -> bool:
    """Gold items (the page's quality checks) and items with more than two answers stay in the workbench."""
    why = "gold" if item.gold_choice is not None else ("not_two_answers" if len(item.responses) != 2 else "")
    if why:
        skipped[why] += 1
    return bool(why)


def push(
    client,
    store: Store,
    name: str,
    workspace: str,
    *,
    overlap: int | None = None,
    attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
    guidelines: str = DEFAULT_GUIDELINES,
    suggestions: Mapping[int, RMSuggestion] | None = None,
    item_ids: Sequence[int] | None = None,
) -> PushResult:
    """Create (or reuse, after checking its schema) the dataset and upsert the store's two-answer items.
    ``overlap`` (the distribution's ``min_submitted``): default, the largest overlap of the items pushed."""
    import argilla as rg

    result = PushResult(dataset=name)
    items = [item for item in store.items(item_ids).values() if not _skip(item, result.skipped)]
    overlap = overlap or max((item.overlap for item in items), default=1)
    if client.workspaces(workspace) is None:
        raise ArgillaError(
            f"no Argilla workspace {workspace!r}; create it or pass --workspace with an existing one"
        )
    dataset = _find(client, name, workspace)
    if dataset is None:
        dataset = rg.Dataset(
            name=name, workspace=workspace, settings=settings(overlap, attributes, guidelines)
        )
        dataset = dataset.create()
    else:
        check_schema(dataset, attributes)
    records = [_record(item, (suggestions or {}).get(item.item_id)) for item in items]
    if records:
        dataset.records.log(records)
    result.pushed = len(records)
    return result


def _find(client, name: str, workspace: str):
    with warnings.catch_warnings():  # the SDK warns when there is none; None says so here
        warnings.simplefilter("ignore")
        return client.datasets(name=name, workspace=workspace)


def _dataset(client, name: str, workspace: str):
    dataset = _find(client, name, workspace)
    if dataset is None:
        raise ArgillaError(f"no Argilla dataset {name!r} in workspace {workspace!r}; push it first")
    check_schema(dataset)
    return dataset


def _item_id(record_id: str) -> int | None:
    prefix, _, number = str(record_id).partition("-")
    return int(number) if prefix == "item" and number.isdigit() else None


def _vote(values: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, int]], str]:
    """(choice, ratings, rationale) from one user's response values ({question: {"value": ...}})."""
    plain = {k: (v or {}).get("value") for k, v in values.items()}
    ratings: dict[str, dict[str, int]] = {}
    for question, value in plain.items():
        stem, _, letter = question.rpartition("_")
        if stem and letter in ("a", "b") and isinstance(value, int) and not isinstance(value, bool):
            ratings.setdefault(stem, {})[letter.upper()] = value
    return str(plain.get("preference")), ratings, str(plain.get("rationale") or "")


def pull(client, store: Store, name: str, workspace: str) -> PullResult:
    """Store every submitted response of the dataset as a vote (idempotent; see the module docstring)."""
    dataset = _dataset(client, name, workspace)
    usernames = {str(u.id): u.username for u in client.users}
    result = PullResult()
    version = f"argilla:{name}"
    active = {(v.annotator, v.item_id) for v in store.votes() if v.guideline_version == version}
    seen = {(v.annotator, v.item_id) for v in store.votes(include_retracted=True)}
    submitted: set[tuple[str, int]] = set()
    for record in dataset.records(with_responses=True, with_suggestions=False):
        item_id = _item_id(record.id)
        if item_id is None:
            result.skipped["not_a_workbench_record"] += 1
            continue
        for response in record.responses.api_models():
            if (
                str(response.status.value if hasattr(response.status, "value") else response.status)
                != "submitted"
            ):
                result.skipped["not_submitted"] += 1
                continue
            result.submitted += 1
            choice, ratings, rationale = _vote(response.values or {})
            user = usernames.get(str(response.user_id), str(response.user_id))
            submitted.add((user + USER_SUFFIX, item_id))
            content = json.dumps([item_id, user, choice, ratings, rationale], sort_keys=True)
            key = "argilla:" + hashlib.sha256(content.encode()).hexdigest()[:40]
            receipt = store.record_external_vote(
                user + USER_SUFFIX, item_id, choice, key=key, ratings=ratings, rationale=rationale,
                guideline_version=version,
            )  # fmt: skip
            if not receipt.created:
                result.unchanged += 1
            elif (user + USER_SUFFIX, item_id) in seen:
                result.updated += 1
            else:
                result.created += 1
    for annotator, item_id in sorted(active - submitted):  # submitted before, withdrawn in Argilla since
        result.withdrawn += store.retract_external_vote(annotator, item_id)
    return result


def status(client, store: Store, name: str, workspace: str) -> dict[str, Any]:
    """The dataset's progress in Argilla next to what the store holds from it."""
    dataset = _dataset(client, name, workspace)
    progress = dataset.progress(with_users_distribution=True)
    pulled = [v for v in store.votes() if v.annotator.endswith(USER_SUFFIX)]
    return {
        "dataset": name,
        "workspace": workspace,
        "argilla": progress,
        "store_votes_from_argilla": len(pulled),
        "store_annotators_from_argilla": sorted({v.annotator for v in pulled}),
    }
