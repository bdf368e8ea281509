"""Export the store's votes as preference records; import public preference sets into the store.

Export (``export_records`` -> ``write_records``): one row per judged pair in TRL's conversational
preference format plus the shared record's columns (``annotation/records.py``)::

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [...], "tie": false, "annotator": "alice" | null, "weight": 1.0, "margin": null,
     "attributes": {"helpfulness": 1}, "provenance": {...}, "id": "item12"}

- ``mode="majority"``: one label per item, the plurality of its active votes (items whose top labels are
  tied are left out and counted); ``mode="all"``: one row per active vote, ``annotator`` set.
- A winner among k answers gives k - 1 rows (winner over each other answer). "tie" gives tie rows (chosen /
  rejected in display order); "both_bad" gives tie rows too (``both_bad="tie"``, the label stays in
  ``provenance.label``) or none (``both_bad="drop"``); ``ties="drop"`` leaves all ties out.
- ``margin``: how much better the winner is, the mean over its voters who said so of their strength's
  margin (``annotation.records.STRENGTH_MARGINS``: negligible 0, slight 1/3, clear 2/3, strong 1); else an
  imported item's own margin (e.g. an OASST rank gap); None for ties.
- ``attributes``: per attribute, the sign of (mean rating of chosen - mean rating of rejected) over the votes
  that rated both: +1 chosen better, -1 worse, 0 equal.
- ``provenance``: the store item, prompt uid, batch, label, vote counts and agreement, vote uids,
  annotators and their strengths ("" for none), guideline versions, and per answer (chosen first) the
  generation id, model, checkpoint, sampling parameters (JSON text) and chat-template hash.
  An imported item's provenance also holds the imported record's own id (``record_id``, e.g. an OASST pair id,
  or ``helpful-base/test.jsonl.gz:12`` for an HH-RLHF row) and provenance (``record_provenance``).
- ``chat_template_kwargs``: ``{"sanitize_control_tokens": true, "end_final_turn": true}``, which TRL's
  trainers pass to the chat template with every row: control tokens inside text stay text, and the GLM-4
  template ends the chosen / rejected answer with the eos token, so plain ``trl.DPOTrainer`` on this file
  trains the turn terminator (with a tokenizer carrying this project's template: docs/annotation.md).
- Gold items are left out unless ``include_gold`` (they are checks on annotators).
- Arena battles (``annotation/arena.py``) export like any item, their bookkeeping (mode, counted, leaks,
  display order, times) in ``provenance.arena`` as JSON text; a battle of more than one turn is left out
  (its two answers continued different conversations) and counted as ``arena_multi_turn``.

Every row passes ``records_from_dicts`` before it is written. Files: ``.jsonl``, ``.parquet``, or a folder
(``datasets.Dataset.save_to_disk``), each with every column; in the two Arrow formats ``attributes`` and
``provenance`` are JSON text (free-form objects: Arrow needs one schema for all rows, and an empty object has
none). The reward trainer's reader (``annotation.preference_data.read_preferences``) reads each of them as
is, to the same records.

Import (``import_preferences``): HH-RLHF transcripts (their text byte for byte), prompt / chosen / rejected
rows (strings or chat messages; this module's own export too) and OASST-zh ranked pairs, read with
``annotation.preference_data``'s readers; each pair becomes an item whose label is a vote by the external
account ``import:<source>``. Imported items are closed (never assigned) unless ``open=True``, to have people
label them again. A pair already in the store, or given twice in one file, is added once: the result names
every such duplicate by id (``ImportResult.duplicates``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmwb.annotation.records import STRENGTH_MARGINS, PreferenceRecord, records_from_dicts
from glmwb.annotation.schema import CHOICES
from glmwb.annotation.store import ItemInfo, NewItem, NewResponse, Store, VoteRow

SOURCE = "glmwb-annotation"
# Passed by TRL to the chat template with each exported row (see the module docstring).
CHAT_TEMPLATE_KWARGS: dict[str, bool] = {"sanitize_control_tokens": True, "end_final_turn": True}
# Free-form object columns, JSON text in the Arrow formats (Parquet, datasets).
JSON_COLUMNS = ("attributes", "provenance")


@dataclass
class ExportResult:
    rows: list[dict[str, Any]]
    items: int = 0  # items that gave rows
    skipped: Counter = field(default_factory=Counter)  # reason -> items (or votes) left out


def _majority(choices: Sequence[str]) -> str | None:
    top = Counter(choices).most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def _pairs(label: str, letters: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(chosen letter, rejected letter, tie) rows for one label over an item's answers."""
    if label in ("tie", "both_bad"):
        return [(a, b, True) for a, b in itertools.combinations(letters, 2)]
    return [(label, other, False) for other in letters if other != label]


def _attributes(votes: Sequence[VoteRow], chosen: str, rejected: str) -> dict[str, int]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for v in votes:
        for attribute, per_letter in (v.ratings or {}).items():
            if chosen in per_letter and rejected in per_letter:
                acc = sums[attribute]
                acc[0] += per_letter[chosen]
                acc[1] += per_letter[rejected]
                acc[2] += 1
    out = {}
    for attribute, (c, r, _) in sorted(sums.items()):
        out[attribute] = (c > r) - (c < r)  # the means compare as the sums do (same votes)
    return out


def _row(
    item: ItemInfo,
    votes: Sequence[VoteRow],
    label: str,
    chosen: str,
    rejected: str,
    tie: bool,
    annotator: str | None,
    row_id: str,
) -> dict[str, Any]:
    by_letter = {r.letter: r for r in item.responses}
    answers = [by_letter[chosen], by_letter[rejected]]
    counts = Counter(v.choice for v in votes)
    # the margin: the mean of the winner's voters' strengths (those who gave one), else the item's own
    strengths = [STRENGTH_MARGINS[v.strength] for v in votes if v.choice == label and v.strength]
    margin = sum(strengths) / len(strengths) if strengths else item.meta.get("margin")
    return {
        "prompt": [dict(m) for m in item.prompt],
        "chosen": [{"role": "assistant", "content": answers[0].text}],
        "rejected": [{"role": "assistant", "content": answers[1].text}],
        "tie": tie,
        "annotator": annotator,
        "weight": 1.0,
        "margin": None if tie or not isinstance(margin, (int, float)) else float(margin),
        "attributes": _attributes(votes, chosen, rejected),
        "provenance": {
            "source": SOURCE,
            "item_id": item.item_id,
            "prompt_uid": item.prompt_uid,
            "prompt_source": item.source,
            "batch": item.batch,
            "label": label,
            "letters": [chosen, rejected],
            "votes": {c: counts.get(c, 0) for c in CHOICES},
            "agreement": counts.get(label, 0) / len(votes) if votes else 0.0,
            "vote_uids": [v.uid for v in votes],
            "annotators": [v.annotator for v in votes],
            "strengths": [v.strength or "" for v in votes],
            "guideline_versions": sorted({v.guideline_version for v in votes}),
            "gold_choice": item.gold_choice or "",
            "generation_ids": [a.generation_id for a in answers],
            "models": [a.model for a in answers],
            "checkpoints": [a.checkpoint or "" for a in answers],
            "sampling": [json.dumps(a.sampling, sort_keys=True) for a in answers],
            "chat_template_sha256": [a.chat_template_sha256 or "" for a in answers],
            # an arena battle's bookkeeping (annotation/arena.py) as JSON text, "" for other items
            "arena": json.dumps(item.meta["arena"], sort_keys=True) if "arena" in item.meta else "",
            **{
                k: item.meta[k]
                for k in ("record_id", "record_provenance")
                if item.meta.get(k) not in (None, {})
            },
        },
        "id": row_id,
        "chat_template_kwargs": dict(CHAT_TEMPLATE_KWARGS),
    }


def export_records(
    store: Store,
    mode: str = "majority",
    ties: str = "keep",
    both_bad: str = "tie",
    include_gold: bool = False,
    min_votes: int = 1,
) -> ExportResult:
    """Preference rows from the store's active votes (see the module docstring)."""
    if mode not in ("majority", "all"):
        raise ValueError(f"mode must be 'majority' or 'all', got {mode!r}")
    if ties not in ("keep", "drop") or both_bad not in ("tie", "drop"):
        raise ValueError("ties must be 'keep' or 'drop'; both_bad must be 'tie' or 'drop'")
    by_item: dict[int, list[VoteRow]] = defaultdict(list)
    for v in store.votes():
        by_item[v.item_id].append(v)
    items = store.items(by_item)
    result = ExportResult([])

    def keep(label: str) -> bool:
        if label == "both_bad" and both_bad == "drop":
            return False
        return not (label in ("tie", "both_bad") and ties == "drop")

    for item_id in sorted(by_item):
        item, votes = items[item_id], by_item[item_id]
        if item.gold_choice is not None and not include_gold:
            result.skipped["gold"] += 1
            continue
        if item.meta.get("arena", {}).get("turns", 1) > 1:  # the two answers had no common prompt
            result.skipped["arena_multi_turn"] += 1
            continue
        letters = [r.letter for r in item.responses]
        before = len(result.rows)
        if mode == "majority":
            if len(votes) < min_votes:
                result.skipped["too_few_votes"] += 1
                continue
            label = _majority([v.choice for v in votes])
            if label is None:
                result.skipped["no_majority"] += 1
                continue
            if not keep(label):
                result.skipped[label] += 1
                continue
            for chosen, rejected, tie in _pairs(label, letters):
                suffix = "" if len(letters) == 2 else f"-{chosen}{rejected}"
                result.rows.append(
                    _row(item, votes, label, chosen, rejected, tie, None, f"item{item_id}{suffix}")
                )
        else:
            for v in votes:
                if not keep(v.choice):
                    result.skipped[v.choice] += 1
                    continue
                for chosen, rejected, tie in _pairs(v.choice, letters):
                    suffix = "" if len(letters) == 2 else f"-{chosen}{rejected}"
                    result.rows.append(
                        _row(
                            item,
                            [v],
                            v.choice,
                            chosen,
                            rejected,
                            tie,
                            v.annotator,
                            f"vote{v.vote_id}{suffix}",
                        )
                    )
        result.items += len(result.rows) > before
    records_from_dicts(result.rows, source="export")  # every row is a valid shared record
    return result


def _arrow_ready(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # Arrow infers one struct for a column from every row's keys, fills the keys a row lacks with nulls and
    # cannot store a struct with no fields: the free-form objects go in as JSON text, so every row keeps
    # exactly its own keys and an empty `attributes` is still a column.
    return [
        {
            k: json.dumps(v, ensure_ascii=False, sort_keys=True) if k in JSON_COLUMNS else v
            for k, v in r.items()
        }
        for r in rows
    ]


def to_dataset(rows: Sequence[Mapping[str, Any]]):
    """A ``datasets.Dataset`` of export rows (``attributes`` / ``provenance`` as JSON text)."""
    import datasets

    return datasets.Dataset.from_list(_arrow_ready(rows))


def write_records(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``.jsonl`` / ``.parquet`` by suffix; anything else is a ``datasets`` folder (``save_to_disk``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    elif path.suffix == ".parquet":
        to_dataset(rows).to_parquet(str(path))
    else:
        to_dataset(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    items: int = 0
    already_imported: int = 0  # pairs left out as duplicates (of an item in the store, or of an earlier row)
    skipped: list[str] = field(default_factory=list)  # invalid rows (messages name file, row and field)
    # one line per duplicate pair, naming it by id: "ID: already in the store" or "ID: the same pair as ID2"
    duplicates: list[str] = field(default_factory=list)


def _pair_uid(source: str, record: PreferenceRecord) -> str:
    key = json.dumps(
        [list(record.prompt), record.chosen, record.rejected], ensure_ascii=False, sort_keys=True
    )
    return f"{source}:{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def import_records(
    store: Store,
    records: Iterable[PreferenceRecord],
    source: str,
    open_for_annotation: bool = False,
    overlap: int = 3,
    seed: int = 0,
) -> ImportResult:
    """Put preference records into the store, each as an item labelled by the account ``import:<source>``."""
    known = store.prompt_uids()
    result = ImportResult()

    def labeller(record: PreferenceRecord) -> str:  # the data set's own annotator ids, when it has them
        return f"import:{source}" + (f":{record.annotator}" if record.annotator else "")

    items = []
    first: dict[str, str] = {}  # pair uid -> the id of the row that brought it in this import
    for n, record in enumerate(records, 1):
        uid = _pair_uid(source, record)
        name = record.id if record.id is not None else f"record {n}"
        if uid in known:
            result.already_imported += 1
            earlier = first.get(uid)
            result.duplicates.append(
                f"{name}: the same pair as {earlier}" if earlier else f"{name}: already in the store ({uid})"
            )
            continue
        known.add(uid)
        first[uid] = name
        model = f"import:{source}"
        items.append(
            NewItem(
                prompt_uid=uid,
                prompt=[dict(m) for m in record.prompt],
                responses=[NewResponse(record.chosen, model), NewResponse(record.rejected, model)],
                source=source,
                status="open" if open_for_annotation else "closed",
                overlap=overlap,
                batch=f"import:{source}",
                meta={
                    k: v
                    for k, v in {
                        "margin": record.margin,
                        "record_id": record.id,
                        "annotator": record.annotator,
                        "record_provenance": dict(record.provenance),
                    }.items()
                    if v not in (None, {})
                },
                labels=[(labeller(record), "tie" if record.tie else 0)],
            )
        )
    store.add_items(items, seed=seed)
    result.items = len(items)
    return result


def import_preferences(
    store: Store,
    path: str | Path,
    format: str = "auto",
    source: str | None = None,
    limit: int | None = None,
    open_for_annotation: bool = False,
    overlap: int = 3,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import a preference file (JSONL / JSON / Parquet / ``datasets`` folder, ``.gz`` allowed)."""
    from glmwb.annotation.preference_data import read_preferences

    path = Path(path)
    read = read_preferences(path, format=format, skip_invalid=skip_invalid, limit=limit)
    name = source or path.name.split(".")[0]
    result = import_records(store, read.records, name, open_for_annotation, overlap)
    result.skipped = list(read.skipped)
    return result
