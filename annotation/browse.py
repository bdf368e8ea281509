"""The admin's view of items: each item's state (open / complete / disputed / closed), search and filters,
disputed items first. Plain functions over ``Store.items()`` and ``Store.votes()`` (no UI imports).

- **disputed**: a regular item whose active votes disagree (annotators split), or a gold item with a vote
  against its gold answer; the reason says which ("split: A 2, B 1", "1 of 3 against gold A");
- **complete**: a regular item with at least ``overlap`` active votes, all agreeing;
- **closed**: never assigned (an imported public set, an arena battle);
- **open**: the rest (still collecting votes; gold items with no vote against gold).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from glmwb.annotation.store import ItemInfo, VoteRow

STATES = ("open", "complete", "disputed", "closed")


@dataclass(frozen=True)
class ItemState:
    item_id: int
    state: str  # one of STATES
    reason: str  # for disputed items: why
    votes: dict[str, int]  # choice -> active votes
    annotators: tuple[str, ...]
    models: tuple[str, ...]
    gold: str | None
    overlap: int


def item_state(item: ItemInfo, votes: Sequence[VoteRow]) -> ItemState:
    """One item's state from its active votes (see the module docstring)."""
    counts = Counter(v.choice for v in votes)
    state, reason = "open", ""
    if item.gold_choice is not None:
        wrong = sum(n for c, n in counts.items() if c != item.gold_choice)
        if wrong:
            state, reason = "disputed", f"{wrong} of {len(votes)} against gold {item.gold_choice}"
    elif len(counts) > 1:
        split = ", ".join(f"{c} {n}" for c, n in counts.most_common())
        state, reason = "disputed", f"split: {split}"
    elif item.status != "open":
        state = "closed"
    elif len(votes) >= item.overlap:
        state = "complete"
    return ItemState(
        item_id=item.item_id,
        state=state,
        reason=reason,
        votes=dict(counts),
        annotators=tuple(sorted({v.annotator for v in votes})),
        models=tuple(sorted({r.model for r in item.responses})),
        gold=item.gold_choice,
        overlap=item.overlap,
    )


def item_states(items: Mapping[int, ItemInfo], votes: Sequence[VoteRow]) -> dict[int, ItemState]:
    by_item: dict[int, list[VoteRow]] = defaultdict(list)
    for v in votes:
        if not v.retracted:
            by_item[v.item_id].append(v)
    return {i: item_state(item, by_item[i]) for i, item in items.items()}


def matches(item: ItemInfo, query: str) -> bool:
    """Case-insensitive substring search in the prompt's messages and every answer."""
    q = query.casefold()
    texts = [str(m.get("content", "")) for m in item.prompt] + [r.text for r in item.responses]
    return any(q in t.casefold() for t in texts)


def find_items(
    items: Mapping[int, ItemInfo],
    states: Mapping[int, ItemState],
    query: str = "",
    state: str = "any",
    model: str = "any",
    annotator: str = "any",
    gold: str = "any",
) -> list[int]:
    """Item ids that match every filter, disputed first, then by id. ``gold``: any / gold / regular."""
    found = []
    for i, item in items.items():
        s = states[i]
        if state != "any" and s.state != state:
            continue
        if model != "any" and model not in s.models:
            continue
        if annotator != "any" and annotator not in s.annotators:
            continue
        if gold != "any" and (s.gold is not None) != (gold == "gold"):
            continue
        if query.strip() and not matches(item, query.strip()):
            continue
        found.append(i)
    return sorted(found, key=lambda i: (states[i].state != "disputed", i))
