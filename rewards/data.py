"""Preference records -> token ids for reward models, and annotator reliability weights.

Records come from ``annotation.preference_data.read_preferences`` (files) or the embedded world.

Tokenisation (``pretrain.tokenizer.encode_response``): ``prompt + [assistant response]`` through the GLM-4
chat template with control tokens in text escaped, plus ``<|endoftext|>``, the terminator GLM writes after
an assistant turn. The reward is read at that last token. Too long: ``truncation="left"`` keeps
``[gMASK]<sop>`` and the last ``max_length - 2`` tokens (the prompt loses its oldest turns, the response
and terminator stay), ``"drop"`` leaves the pair out (counted), ``"error"`` raises naming the row.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from glmwb.annotation.records import PreferenceDataError, PreferenceRecord
from glmwb.pretrain.tokenizer import encode_response

Truncation = Literal["left", "drop", "error"]
IGNORE_LABEL = -100  # an attribute head with no label for this pair

# ----------------------------------------------------------------------------------------------------------
# Annotator reliability


def _item_key(r: PreferenceRecord) -> tuple:
    return (json.dumps(r.prompt, sort_keys=True, ensure_ascii=False), frozenset((r.chosen, r.rejected)))


def _outcome(r: PreferenceRecord) -> str:
    return "\x00tie" if r.tie else r.chosen


def annotator_reliability(records: Sequence[PreferenceRecord]) -> dict[str, float]:
    """Each annotator's agreement with the other annotators' majority on the items several people labelled.

    For every label on an item with >= 2 labels, compare it with the majority of the *other* labels (skipped
    when they are split evenly); reliability = (agreements + 1) / (comparisons + 2) (Laplace), so an
    annotator never compared gets 0.5. A stand-in until annotation/'s agreement statistics provide one.
    """
    by_item: dict[tuple, list[PreferenceRecord]] = defaultdict(list)
    for r in records:
        by_item[_item_key(r)].append(r)
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for labels in by_item.values():
        if len(labels) < 2:
            continue
        for i, r in enumerate(labels):
            others = Counter(_outcome(o) for j, o in enumerate(labels) if j != i).most_common()
            if len(others) > 1 and others[0][1] == others[1][1]:
                continue
            name = r.annotator or "?"
            total[name] += 1
            agree[name] += _outcome(r) == others[0][0]
    names = {r.annotator or "?" for r in records}
    return {n: (agree[n] + 1) / (total[n] + 2) for n in sorted(names)}


def reliability_weights(
    records: Sequence[PreferenceRecord], reliability: Mapping[str, float], floor: float = 0.05
) -> list[PreferenceRecord]:
    """Records with weight *= max(floor, 2 a - 1), a = the annotator's reliability (0.5 = chance -> floor,
    1 = perfect -> 1): an annotator who agrees with the others no better than a coin counts (almost) nothing."""
    from dataclasses import replace

    out = []
    for r in records:
        a = reliability.get(r.annotator or "?", 0.5)
        out.append(replace(r, weight=r.weight * max(floor, 2 * a - 1)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenisation


def truncate(ids: list[int], max_length: int, policy: Truncation, where: str) -> list[int] | None:
    """Fit ``ids`` into ``max_length`` (see the module docstring); None means "drop this pair"."""
    if len(ids) <= max_length:
        return ids
    if policy == "left":
        return ids[:2] + ids[len(ids) - (max_length - 2) :]  # keep [gMASK]<sop>, then the newest tokens
    if policy == "drop":
        return None
    raise PreferenceDataError(f"{where}: {len(ids)} tokens > max_length {max_length} (truncation='error')")


@dataclass(frozen=True)
class EncodedPair:
    chosen_ids: tuple[int, ...]  # ends with the terminator, where the reward is read
    rejected_ids: tuple[int, ...]
    tie: bool
    weight: float
    margin: float  # 0 when the record has none
    labels: tuple[int, ...]  # one per head: +1 / -1 / 0 (tie) / IGNORE_LABEL
    chosen_start: int = 0  # index of the chosen response's first token (after "<|assistant|>"), for LM losses


def head_labels(record: PreferenceRecord, heads: Sequence[str]) -> tuple[int, ...]:
    """The first head learns the overall preference (+1, or 0 for a tie); every other head its attribute's
    label from ``record.attributes`` (IGNORE_LABEL when the record has none)."""
    first = 0 if record.tie else 1
    return (first, *(int(record.attributes.get(h, IGNORE_LABEL)) for h in heads[1:]))


def encode_pairs(
    tokenizer,
    records: Sequence[PreferenceRecord],
    max_length: int,
    truncation: Truncation = "left",
    heads: Sequence[str] = ("reward",),
    name: str = "data",
    terminator: str | None = "<|endoftext|>",
) -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenise every record (errors name ``name`` and the 1-based row); returns the pairs and counts
    {"pairs", "dropped_too_long", "truncated", "ties"}."""
    out: list[EncodedPair] = []
    stats = Counter(pairs=0, dropped_too_long=0, truncated=0, ties=0)
    for i, r in enumerate(records, 1):
        where = f"{name}, row {i}"
        encoded, cut = [], []
        for response in (r.chosen, r.rejected):
            ids = encode_response(tokenizer, r.prompt, response, terminator)
            fitted = truncate(ids, max_length, truncation, where)
            stats["truncated"] += fitted is not None and len(fitted) < len(ids)
            encoded.append(fitted)
            cut.append(0 if fitted is None else len(ids) - len(fitted))
        if encoded[0] is None or encoded[1] is None:
            stats["dropped_too_long"] += 1
            continue
        prompt_len = len(
            tokenizer.apply_chat_template(
                list(r.prompt), tokenize=True, return_dict=False, add_generation_prompt=True,
                sanitize_control_tokens=True,
            )
        )  # fmt: skip
        out.append(
            EncodedPair(
                tuple(encoded[0]),
                tuple(encoded[1]),
                r.tie,
                r.weight,
                r.margin or 0.0,
                head_labels(r, heads),
                chosen_start=max(2, prompt_len - cut[0]),
            )
        )
        stats["ties"] += r.tie
    stats["pairs"] = len(out)
    return out, dict(stats)
