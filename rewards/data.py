"""Preference data for reward models: readers -> ``PreferenceRecord`` -> token ids with the GLM chat template.

Readers (``read_preferences``; every error names the file, the 1-based row and the field):

- ``preference``: JSONL / JSON / ``datasets`` rows with ``prompt`` / ``chosen`` / ``rejected`` (TRL's format,
  strings or chat messages; the store's export, which is ``PreferenceRecord.to_dict()`` per line; and TRL's
  implicit-prompt form, where chosen / rejected are whole conversations sharing the prompt);
- ``hh_rlhf``: Anthropic HH-RLHF, ``{chosen, rejected}`` transcripts ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``,
  split into chat messages; the prompt is the turns both transcripts share, the responses the final
  assistant turns;
- ``oasst_zh``: OASST1-zh pairs ``{prompt, history: [[user, assistant], ...], chosen, rejected, chosen_rank,
  rejected_rank}``; the rank gap becomes the record's margin.

Tokenisation (``encode_response``): ``prompt + [assistant response]`` through the GLM-4 chat template with
control tokens in text escaped, plus ``<|endoftext|>``, the terminator GLM writes after an assistant turn.
The reward is read at that last token. Too long: ``truncation="left"`` keeps ``[gMASK]<sop>`` and the last
``max_length - 2`` tokens (the prompt loses its oldest turns, the response and terminator stay), ``"drop"``
leaves the pair out (counted), ``"error"`` raises naming the row.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmwb.annotation.records import PreferenceDataError, PreferenceRecord

Truncation = Literal["left", "drop", "error"]
IGNORE_LABEL = -100  # an attribute head with no label for this pair

# ----------------------------------------------------------------------------------------------------------
# Reading rows


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


def encode_response(
    tokenizer, prompt: Sequence[Mapping[str, Any]], response: str, terminator: str | None = "<|endoftext|>"
) -> list[int]:
    """Token ids of ``prompt + [assistant response]`` with the GLM-4 chat template, then ``<|endoftext|>``.

    The same ids as ``pretrain.tokenizer.encode_chat(...)["input_ids"]`` (tested) in one template render
    instead of one per message; control tokens inside text are escaped, so the last token is the only
    terminator of the judged turn and the reward position is always ``len(ids) - 1``. ``terminator``: the
    turn terminator appended (``<|endoftext|>``, or ``<|user|>``, which ends a turn a user follows up on),
    or None to end at the answer's last token.
    """
    messages = [*({k: v for k, v in m.items() if v is not None} for m in prompt)]
    messages.append({"role": "assistant", "content": response})
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    return list(ids) + ([tokenizer.convert_tokens_to_ids(terminator)] if terminator else [])


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
