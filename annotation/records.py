"""The one preference record shared by annotation/ (store, export), rewards/ (reward models) and align/ (DPO).

A record is one judged pair: a prompt (chat messages), two responses, which one won (or a tie), who judged,
optional per-attribute labels and provenance. On disk it is TRL's preference format with extra columns:
``{"prompt": [{"role": "user", "content": ...}], "chosen": "...", "rejected": "...", "tie": false, ...}``.
For a tie, "chosen" / "rejected" are just the two responses in display order.

Pure Python, no heavy imports: every package may import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from glmwb.pretrain.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool", "observation")

# How much better the chosen answer is, as its annotator says (a four-point scale as in Llama 2, Touvron et
# al. 2023), and the reward margin each level asks of a margin loss (``loss.use_margin``; ``loss.margin_scale``
# multiplies it): a "negligible" win asks for no gap, a "strong" one for the largest.
STRENGTHS = ("negligible", "slight", "clear", "strong")
STRENGTH_MARGINS = {"negligible": 0.0, "slight": 1.0 / 3.0, "clear": 2.0 / 3.0, "strong": 1.0}


class PreferenceDataError(ConfigError):
    """A malformed preference record: the message names the row (and file, when known) and the field."""


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: tuple[dict[str, Any], ...]  # chat messages up to (not including) the judged assistant turn
    chosen: str  # the preferred response (or the first of a tie)
    rejected: str
    tie: bool = False
    annotator: str | None = None
    weight: float = 1.0  # e.g. the annotator's reliability; multiplies the pair's loss
    margin: float | None = None  # e.g. a rating gap; used by margin losses
    attributes: Mapping[str, int] = field(
        default_factory=dict
    )  # attribute -> +1 chosen better, -1 worse, 0 tie
    provenance: Mapping[str, Any] = field(default_factory=dict)  # source, model names, seeds, vote ids...
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt"] = [dict(m) for m in self.prompt]
        d["attributes"] = dict(self.attributes)
        d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], where: str = "row") -> PreferenceRecord:
        """Validate and build; `where` (e.g. "data.jsonl, row 12") is put in every error message."""
        if not isinstance(row, Mapping):
            raise PreferenceDataError(f"{where}: a record must be a mapping, got {type(row).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise PreferenceDataError(
                    f"{where}: missing field {key!r} (a record needs prompt, chosen, rejected; has {sorted(row)})"
                )
        prompt = validate_prompt(row["prompt"], where)
        chosen = _response(row["chosen"], "chosen", where)
        rejected = _response(row["rejected"], "rejected", where)
        tie = row.get("tie", False)
        if not isinstance(tie, bool):
            raise PreferenceDataError(f"{where}: field 'tie' must be true or false, got {tie!r}")
        weight = row.get("weight", 1.0)
        if not _finite_number(weight) or weight < 0:
            raise PreferenceDataError(f"{where}: field 'weight' must be a finite number >= 0, got {weight!r}")
        margin = row.get("margin")
        if margin is not None and not _finite_number(margin):
            raise PreferenceDataError(
                f"{where}: field 'margin' must be a finite number or null, got {margin!r}"
            )
        attributes = _json_object(row.get("attributes"), "attributes", where) or {}
        if isinstance(attributes, Mapping):
            # Arrow (Parquet, `datasets`) gives every row every attribute any row has, unrated ones as None.
            attributes = {k: v for k, v in attributes.items() if v is not None}
        if not isinstance(attributes, Mapping) or any(v not in (-1, 0, 1) for v in attributes.values()):
            raise PreferenceDataError(
                f"{where}: field 'attributes' must map attribute names to -1, 0 or +1, got {attributes!r}"
            )
        annotator = row.get("annotator")
        if annotator is not None and not isinstance(annotator, (str, int)) or isinstance(annotator, bool):
            raise PreferenceDataError(
                f"{where}: field 'annotator' must be a name (text) or null, got {annotator!r:.60}"
            )
        provenance = _json_object(row.get("provenance"), "provenance", where) or {}
        if not isinstance(provenance, Mapping):
            raise PreferenceDataError(
                f"{where}: field 'provenance' must be an object, got {type(provenance).__name__}"
            )
        record_id = row.get("id")
        if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
            raise PreferenceDataError(
                f"{where}: field 'id' must be text or an integer, got {record_id!r:.60}"
            )
        return cls(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            tie=tie,
            annotator=None if annotator is None else str(annotator),
            weight=float(weight),
            margin=None if margin is None else float(margin),
            attributes=dict(attributes),
            provenance=dict(provenance),
            id=None if record_id is None else str(record_id),
        )


def _json_object(value: Any, name: str, where: str) -> Any:
    """``attributes`` / ``provenance`` as JSON text (how Parquet and ``datasets`` exports hold these free-form
    objects: Arrow needs one schema for every row) -> the object; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except json.JSONDecodeError:
        raise PreferenceDataError(
            f"{where}: field {name!r} is text but not a JSON object: {value!r:.60}"
        ) from None


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_text(value: Any, field_name: str, where: str) -> str:
    """A non-empty string that is valid Unicode (no lone surrogates, which no file or database can store)."""
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: field {field_name} must be text, got {type(value).__name__}")
    if not value.strip():
        raise PreferenceDataError(f"{where}: field {field_name} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PreferenceDataError(
            f"{where}: field {field_name} has a lone surrogate at character {e.start} (not valid Unicode)"
        ) from None
    return value


def validate_prompt(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """A prompt as chat messages: a string (one user turn) or messages with known roles and text content,
    ending with a user, tool or observation turn."""
    if isinstance(value, str):
        return ({"role": "user", "content": validate_text(value, "'prompt'", where)},)
    if not isinstance(value, (list, tuple)) or not value:
        raise PreferenceDataError(
            f"{where}: field 'prompt' must be a non-empty string or list of chat messages, got {value!r:.80}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PreferenceDataError(
                f"{where}: field 'prompt'[{i}] must be a message {{'role': ..., 'content': ...}}, got {m!r:.80}"
            )
        if m["role"] not in ROLES:
            raise PreferenceDataError(
                f"{where}: field 'prompt'[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        calls_a_tool = m["role"] == "assistant" and (m.get("tool_calls") or m.get("metadata"))
        if not (
            calls_a_tool and m["content"] in ("", None)
        ):  # a tool call may carry its call outside content
            validate_text(m["content"], f"'prompt'[{i}].content", where)
        # keys without a value are no part of a message (Arrow gives every message every key any message has)
        out.append({k: v for k, v in m.items() if v is not None})
    if out[-1]["role"] == "assistant":
        raise PreferenceDataError(
            f"{where}: field 'prompt' ends with an assistant turn; the judged answers are the next assistant "
            "turn, so the prompt must end with a user, tool or observation message"
        )
    return tuple(out)


def _response(value: Any, name: str, where: str) -> str:
    # TRL's conversational format: [{"role": "assistant", "content": "..."}]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], Mapping):
        role = value[0].get("role", "assistant")
        if role != "assistant":
            raise PreferenceDataError(
                f"{where}: field {name!r} is a {role!r} message; the judged response must be the assistant's"
            )
        value = value[0].get("content")
    if not isinstance(value, str):
        raise PreferenceDataError(
            f"{where}: field {name!r} must be a string (or one assistant message), got {type(value).__name__}"
        )
    if not value.strip():
        raise PreferenceDataError(f"{where}: field {name!r} is an empty response")
    return validate_text(value, repr(name), where)


def records_from_dicts(rows: Iterable[Mapping[str, Any]], source: str = "data") -> list[PreferenceRecord]:
    """Validate every row (errors name `source` and the 1-based row number)."""
    return [PreferenceRecord.from_dict(row, where=f"{source}, row {i}") for i, row in enumerate(rows, 1)]
