"""Reading preference files into ``PreferenceRecord``s: the one loader every stage uses (reward models, the
DPO family, the store's import).

Readers (``read_preferences``; every error names the file, the 1-based row and the field):

- ``preference``: JSONL / JSON / ``datasets`` rows with ``prompt`` / ``chosen`` / ``rejected`` (TRL's format,
  strings or chat messages; the store's export, which is ``PreferenceRecord.to_dict()`` per line; and TRL's
  implicit-prompt form, where chosen / rejected are whole conversations sharing the prompt);
- ``hh_rlhf``: Anthropic HH-RLHF, ``{chosen, rejected}`` transcripts ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``,
  split into chat messages; the prompt is the turns both transcripts share, the responses the final
  assistant turns;
- ``oasst_zh``: OASST1-zh pairs ``{prompt, history: [[user, assistant], ...], chosen, rejected, chosen_rank,
  rejected_rank}``; the rank gap becomes the record's margin.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmwb.annotation.records import PreferenceDataError, PreferenceRecord


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a JSONL / JSON array file (``.gz`` allowed), a ``.parquet`` file or a
    ``datasets`` folder (``save_to_disk``); ``where`` is "FILE, row N" (1-based). A JSONL line that is not
    JSON comes as a ``PreferenceDataError`` in place of the row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir() or path.suffix == ".parquet":
        import datasets

        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise PreferenceDataError(f"{path}: a DatasetDict ({', '.join(ds)}); name one split's folder")
        for i, row in enumerate(ds, 1):
            yield f"{path}, row {i}", row
        return
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    with _open_text(path) as f:
        if stem_suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}: not valid JSON: {e}") from None
            if not isinstance(data, list):
                raise PreferenceDataError(f"{path}: a .json file must hold a list of rows")
            for i, row in enumerate(data, 1):
                yield f"{path}, row {i}", row
            return
        row_number = 0
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row_number += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # handed on, so that skip_invalid can skip it
                row = PreferenceDataError(f"{path}, row {row_number} (line {line_number}): not JSON: {e}")
            yield f"{path}, row {row_number}", row


# ----------------------------------------------------------------------------------------------------------
# Formats -> PreferenceRecord


def _require(row: Any, keys: Sequence[str], where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise PreferenceDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise PreferenceDataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    return row


def preference_record(row: Any, where: str) -> PreferenceRecord:
    """TRL's explicit-prompt rows, the store's export, and TRL's implicit-prompt conversations."""
    row = _require(row, ("chosen", "rejected"), where)
    if "prompt" in row:
        return PreferenceRecord.from_dict(row, where)
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise PreferenceDataError(
            f"{where}: missing field 'prompt' (without it, chosen and rejected must be whole conversations)"
        )
    n = 0  # the shared prefix of the two conversations is the prompt
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise PreferenceDataError(f"{where}: chosen and rejected conversations share no prompt")
    return PreferenceRecord.from_dict(
        {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}, where
    )


_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_transcript(text: Any, where: str, field_name: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` -> [{"role": "user", ...}, {"role": "assistant", ...}, ...]."""
    if not isinstance(text, str):
        raise PreferenceDataError(
            f"{where}: field {field_name!r} must be a string, got {type(text).__name__}"
        )
    messages: list[dict[str, str]] = []
    pos = 0
    while True:
        starts = [(text.find(tag, pos), tag) for tag in (_HUMAN, _ASSISTANT)]
        starts = [(i, tag) for i, tag in starts if i >= 0]
        if not starts:
            break
        i, tag = min(starts)
        if not messages and text[:i].strip():
            raise PreferenceDataError(f"{where}: field {field_name!r} has text before the first turn")
        if messages:
            messages[-1]["content"] = text[pos:i].strip()
        messages.append({"role": "user" if tag == _HUMAN else "assistant", "content": ""})
        pos = i + len(tag)
    if not messages:
        raise PreferenceDataError(
            f"{where}: field {field_name!r} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
        )
    messages[-1]["content"] = text[pos:].strip()
    return messages


def hh_rlhf_record(row: Any, where: str) -> PreferenceRecord:
    """An HH-RLHF pair: the prompt is the turns both transcripts share up to the last user turn."""
    row = _require(row, ("chosen", "rejected"), where)
    chosen = parse_hh_transcript(row["chosen"], where, "chosen")
    rejected = parse_hh_transcript(row["rejected"], where, "rejected")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: field {name!r} does not end with an assistant turn")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        raise PreferenceDataError(
            f"{where}: fields 'chosen' and 'rejected' differ before their last assistant turn "
            "(not one prompt with two answers)"
        )
    return PreferenceRecord.from_dict(
        {
            "prompt": prompt,
            "chosen": chosen[-1]["content"],
            "rejected": rejected[-1]["content"],
            "provenance": {"source": "hh_rlhf"},
        },
        where,
    )


def oasst_zh_record(row: Any, where: str) -> PreferenceRecord:
    """An OASST1-zh ranked pair; margin = rejected_rank - chosen_rank (>= 1)."""
    row = _require(row, ("prompt", "chosen", "rejected"), where)
    history = row.get("history") or []
    if not isinstance(history, list):
        raise PreferenceDataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    messages = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise PreferenceDataError(f"{where}: field 'history'[{i}] must be [user text, assistant text]")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise PreferenceDataError(f"{where}: field 'prompt' must be a non-empty string")
    messages.append({"role": "user", "content": row["prompt"]})
    ranks = row.get("chosen_rank"), row.get("rejected_rank")
    margin = float(ranks[1] - ranks[0]) if all(isinstance(r, int) for r in ranks) else None
    return PreferenceRecord.from_dict(
        {
            "prompt": messages,
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "margin": margin,
            "id": row.get("id"),
            "provenance": {"source": row.get("source", "oasst_rm_zh")},
        },
        where,
    )


FORMATS = {"preference": preference_record, "hh_rlhf": hh_rlhf_record, "oasst_zh": oasst_zh_record}


def detect_format(row: Any) -> str:
    """Guess a row's format from its fields (``FORMATS`` key)."""
    if isinstance(row, Mapping):
        if "history" in row and "chosen_rank" in row:
            return "oasst_zh"
        if "prompt" not in row and isinstance(row.get("chosen"), str) and _HUMAN in row["chosen"]:
            return "hh_rlhf"
    return "preference"


@dataclass
class ReadResult:
    records: list[PreferenceRecord]
    skipped: list[str] = field(default_factory=list)  # one error message per skipped row


def read_preferences(
    source: str | Path | Iterable[Mapping[str, Any]],
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    name: str = "data",
) -> ReadResult:
    """Read preference pairs from a file / ``datasets`` folder path, or from rows (a ``datasets.Dataset`` or a
    list of dicts, named ``name`` in errors). ``format``: "auto" (per file, from its first row) or a
    ``FORMATS`` key. Invalid rows raise ``PreferenceDataError`` (file, row, field), or with ``skip_invalid``
    are left out and reported in ``skipped``. ``limit``: stop after that many records."""
    if isinstance(source, (str, Path)):
        rows: Iterable[tuple[str, Any]] = iter_rows(source)
    else:
        rows = ((f"{name}, row {i}", row) for i, row in enumerate(source, 1))
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    result = ReadResult([])
    reader = None if format == "auto" else FORMATS[format]
    for where, row in rows:
        if reader is None and not isinstance(row, PreferenceDataError):
            reader = FORMATS[detect_format(row)]
        try:
            if isinstance(row, PreferenceDataError):
                raise row
            result.records.append(reader(row, where))
        except PreferenceDataError as e:
            if not skip_invalid:
                raise
            result.skipped.append(str(e))
        if limit is not None and len(result.records) >= limit:
            break
    return result


# ----------------------------------------------------------------------------------------------------------
# Annotator reliability -> per-pair weights
